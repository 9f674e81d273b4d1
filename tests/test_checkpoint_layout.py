"""Format 2's arithmetic and storage, without process groups: flat ranges as rectangles, TP shards
as rectangles of layout-independent entries (SwiGLU blocks, unpadded vocabulary), and byte-range
reads that read only the requested bytes."""
import itertools
import os

import pytest
import torch

from slimtron.checkpointing import dist_format
from slimtron.checkpointing.layout import Box, ParamLayout, flat_offset, flat_range_boxes
from slimtron.parallel import sharding


@pytest.mark.parametrize("shape", [(7,), (5, 6), (3, 4, 5)])
def test_flat_range_boxes_are_the_range_in_order(shape):
    x = torch.arange(torch.Size(shape).numel()).reshape(shape)
    n = x.numel()
    for start, end in itertools.combinations_with_replacement(range(n + 1), 2):
        boxes = flat_range_boxes(shape, start, end)
        got = [v for b in boxes for v in x[b.slices()].reshape(-1).tolist()]
        assert got == list(range(start, end))
        assert len(boxes) <= 2 * len(shape) - 1
        for b in boxes:  # each is contiguous, starting where flat_offset says
            first = flat_offset(shape, b)
            assert x[b.slices()].reshape(-1).tolist() == list(range(first, first + b.numel))


def _param(full: torch.Tensor, name: str, dim: int, chunks: int, tp: int, rank: int):
    local = sharding.shard(full, dim, tp, rank, chunks) if dim >= 0 else full.clone()
    p = torch.nn.Parameter(local)
    p.global_name, p.full_shape = name, tuple(full.shape)
    p.tensor_model_parallel, p.partition_dim, p.partition_chunks = dim >= 0, dim, chunks
    return p


CASES = [  # name, full shape, partition dim, chunks, vocab rows kept
    ("decoder.layers.0.mlp.linear_fc1.weight", (16, 6), 0, 2, None),  # SwiGLU [gate; up]
    ("decoder.layers.0.self_attention.linear_proj.weight", (6, 8), 1, 1, None),  # row-parallel
    ("output_layer.weight", (16, 6), 0, 1, 13),  # padded vocabulary: 13 real rows
    ("decoder.final_layernorm.weight", (6,), -1, 1, None),  # replicated
]


@pytest.mark.parametrize("name,shape,dim,chunks,vocab", CASES)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shards_and_dp_ranges_cover_every_entry_once(name, shape, dim, chunks, vocab, tp):
    """Every TP rank's flat ranges (3 DP parts) put into the entries rebuild the full tensor
    (blocks as separate entries, padding rows dropped), each element written exactly once."""
    full = torch.randn(shape)
    vocab_size = vocab if vocab is not None else 10 ** 6
    entries, counts = {}, {}
    for rank in range(tp if dim >= 0 else 1):
        p = _param(full, name, dim, chunks, tp, rank)
        lay = ParamLayout.of(p, rank, vocab_size)
        for key, entry_shape in lay.entries(tp).items():
            entries.setdefault(key, torch.zeros(entry_shape))
            counts.setdefault(key, torch.zeros(entry_shape))
        n = p.numel()
        for part in range(3):
            for box in flat_range_boxes(tuple(p.shape), n * part // 3, n * (part + 1) // 3):
                for key, entry_box, local_box in lay.pieces(box):
                    entries[key][entry_box.slices()] = p.detach()[local_box.slices()]
                    counts[key][entry_box.slices()] += 1
    assert all(bool((c == 1).all()) for c in counts.values())
    rows = vocab if vocab is not None else shape[0]
    blocks = [entries[k] for k in sorted(entries)]
    rebuilt = torch.cat(blocks, dim=max(dim, 0)) if len(blocks) > 1 else blocks[0]
    assert torch.equal(rebuilt, full[:rows])
    if chunks > 1:
        assert sorted(entries) == [f"{name}#0", f"{name}#1"]


def test_reader_reads_only_the_bytes_it_needs(tmp_path):
    """Chunks of a bf16 entry written by write_chunks; rectangles read back equal the source,
    and a column slice reads exactly its own bytes (rchar)."""
    full = torch.randn(12, 10).to(torch.bfloat16)
    boxes = [Box((0, 0), (5, 10)), Box((5, 0), (7, 4)), Box((5, 4), (7, 6))]
    chunks = [dist_format.Chunk("model/w", b, full[b.slices()].contiguous()) for b in boxes]
    dist_format.write_chunks(str(tmp_path / dist_format.shard_file(0)), chunks)
    meta = dist_format.metadata([{"model/w": ([12, 10], "bfloat16", None)}],
                                [dist_format.chunk_records(chunks)], {})
    assert meta["files"] == {dist_format.shard_file(0): full.numel() * 2}
    dist_format.write_metadata(str(tmp_path / dist_format.METADATA_FILE), meta)
    reader = dist_format.Reader(str(tmp_path))
    for want in (Box((0, 0), (12, 10)), Box((3, 2), (6, 5)), Box((11, 9), (1, 1))):
        out = torch.zeros(want.sizes, dtype=torch.float32)
        reader.read_into("model/w", want, out, "w")
        assert torch.equal(out, full[want.slices()].float())

    def rchar():
        return int(next(l for l in open("/proc/self/io") if l.startswith("rchar")).split()[1])
    out = torch.zeros((10, 3), dtype=torch.bfloat16)
    first = rchar()
    before = rchar()  # reading /proc/self/io counts too: once between these two calls
    reader.read_into("model/w", Box((1, 6), (10, 3)), out, "w")
    assert rchar() - before - (before - first) == 10 * 3 * 2
    assert torch.equal(out, full[1:11, 6:9])
    with pytest.raises(ValueError, match="holds only 0 of the 4 elements of w"):
        reader.read_into("model/w", Box((12, 0), (2, 2)), torch.zeros(2, 2), "w")
    reader.close()
    os.truncate(str(tmp_path / dist_format.shard_file(0)), 100)
    damaged = r"shard_00000.bin is damaged: 100 bytes, metadata.json says 240"
    reader = dist_format.Reader(str(tmp_path))  # opens no shard file: a load opens its own only
    with pytest.raises(ValueError, match=damaged):
        reader.read_into("model/w", Box((0, 0), (1, 1)), torch.zeros(1, 1), "w")
    with pytest.raises(ValueError, match=damaged):
        reader.check_files()
    os.remove(str(tmp_path / dist_format.shard_file(0)))
    with pytest.raises(ValueError, match=r"shard_00000.bin is missing"):
        dist_format.Reader(str(tmp_path)).check_files()


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo unpickled",))


def test_no_load_path_unpickles_objects(tmp_path):
    """common.pt is read with weights_only, and metadata.json is JSON whose file names cannot
    leave the checkpoint directory."""
    from slimtron import checkpointing

    ckpt_dir = tmp_path / "iter_0000001"
    ckpt_dir.mkdir()
    (tmp_path / checkpointing.TRACKER).write_text("1\n")
    torch.save({"format_version": 2, "evil": _Payload()}, str(ckpt_dir / "common.pt"))
    with pytest.raises(ValueError, match=r"common.pt is damaged: UnpicklingError"):
        checkpointing.load_common(str(tmp_path))
    dist_format.write_metadata(str(ckpt_dir / dist_format.METADATA_FILE),
                               {"files": {"../../etc/passwd": 1}, "entries": {}})
    with pytest.raises(ValueError, match=r"names a shard file '../../etc/passwd'"):
        dist_format.Reader(str(ckpt_dir))


def test_ckpt_format_flags():
    from slimtron.arguments import parse_args, validate
    from slimtron.config import ConfigError

    base = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--micro-batch-size", "1"]
    config = validate(parse_args(base), 1, check_files=False)
    assert (config.training.ckpt_format, config.training.async_save) == ("torch_dist", False)
    config = validate(parse_args(base + ["--ckpt-format", "torch_dist", "--async-save"]), 1,
                      check_files=False)
    assert (config.training.ckpt_format, config.training.async_save) == ("torch_dist", True)
    with pytest.raises(ConfigError, match="--async-save needs --ckpt-format torch_dist, not torch"):
        validate(parse_args(base + ["--ckpt-format", "torch", "--async-save"]), 1,
                 check_files=False)
