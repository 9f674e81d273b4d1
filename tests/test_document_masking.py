"""Document masking (--reset-position-ids, --reset-attention-mask, --eod-mask-loss).

- The masks equal Megatron-LM's ``get_ltor_masks_and_position_ids`` (its loop is repeated below).
- A packed sample gives the same per-token losses and gradients as running each of its documents
  on its own (fp32, 1e-5), for Llama (RoPE) and GPT-2 (learned positions).
- Training with document masking under TP+SP+PP with full recompute, PP=4 (middle stages) with
  selective recompute, and CP=2 (ring attention) equals one process within 1e-5, and differs from
  training without it.
"""
import numpy as np
import pytest
import torch

from slimtron.config import DataConfig
from slimtron.data.gpt_dataset import GPTDataset, get_ltor_masks_and_position_ids
from slimtron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from slimtron.model import GPTModel
from slimtron.model.kernels import document_causal_mask
from slimtron.parallel.state import ParallelState
from tests.test_training_parity import assert_close_params, run_layout, tiny_config

EOD = 199  # NullTokenizer(200)'s eod


def megatron_ltor(data: torch.Tensor, eod: int, reset_position_ids: bool,
                  reset_attention_mask: bool, eod_mask_loss: bool):
    """Megatron-LM's get_ltor_masks_and_position_ids (megatron/core/datasets/gpt_dataset.py) for
    one sample, step by step: a dense lower-triangular mask cut after each eod, positions shifted
    after each eod. Returns (attention allowed [s, s], loss_mask, position_ids)."""
    s = data.numel()
    attention_mask = torch.tril(torch.ones((s, s))).unsqueeze(0)
    loss_mask = torch.ones(s, dtype=torch.float)
    if eod_mask_loss:
        loss_mask[data == eod] = 0.0
    position_ids = torch.arange(s, dtype=torch.long)
    if reset_position_ids or reset_attention_mask:
        eod_index = position_ids[data == eod].clone()
        prev_index = 0
        for j in range(eod_index.numel()):
            i = int(eod_index[j])
            if reset_attention_mask:
                attention_mask[0, (i + 1):, :(i + 1)] = 0
            if reset_position_ids:
                position_ids[(i + 1):] -= i + 1 - prev_index
                prev_index = i + 1
    return attention_mask[0] > 0.5, loss_mask, position_ids


def test_masks_equal_megatrons():
    rng = np.random.default_rng(0)
    samples = [torch.tensor([EOD, 1, 2, EOD, EOD, 3, 4, 5, EOD]), torch.tensor([1, 2, 3, 4]),
               *(torch.from_numpy(np.where(rng.random(24) < 0.2, EOD, rng.integers(0, 50, 24)))
                 for _ in range(20))]
    for tokens in samples:
        for reset_pos, reset_attn, mask_loss in [(True, True, True), (True, False, False),
                                                 (False, True, True), (False, False, True)]:
            allowed, loss_mask, positions = megatron_ltor(tokens, EOD, reset_pos, reset_attn,
                                                          mask_loss)
            ours_loss, ours_pos, segments = get_ltor_masks_and_position_ids(
                tokens, EOD, reset_position_ids=reset_pos, reset_attention_mask=reset_attn,
                eod_mask_loss=mask_loss)
            assert torch.equal(ours_loss, loss_mask) and torch.equal(ours_pos, positions)
            if reset_attn:
                assert torch.equal(document_causal_mask(segments.unsqueeze(0))[0, 0], allowed)
            else:
                assert segments is None and torch.equal(allowed, torch.ones(len(tokens), len(tokens)).tril().bool())


@pytest.mark.parametrize("arch", ["llama", "gpt"])
def test_packed_sample_equals_documents_run_separately(arch):
    config = tiny_config(arch=arch).model
    config.num_layers = 2
    torch.manual_seed(0)
    lengths = [5, 1, 7, 3]  # a one-token document too
    docs = [torch.cat([torch.randint(0, 150, (n - 1,)), torch.tensor([EOD])]) for n in lengths]
    docs[-1] = torch.randint(0, 150, (lengths[-1],))  # the last one is cut by the sample's end
    tokens = torch.cat(docs).unsqueeze(0)
    labels = torch.randint(0, 150, tokens.shape)
    _, positions, segments = get_ltor_masks_and_position_ids(
        tokens[0], EOD, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=False)

    packed_model = GPTModel(config, ParallelState.single(), seed=3)
    packed = packed_model(tokens=tokens, position_ids=positions.unsqueeze(0), labels=labels,
                          segment_ids=segments.unsqueeze(0))
    packed.sum().backward()

    alone_model = GPTModel(config, ParallelState.single(), seed=3)
    alone, start = [], 0
    for doc in docs:
        n = len(doc)
        alone.append(alone_model(tokens=tokens[:, start:start + n],
                                 labels=labels[:, start:start + n]))
        start += n
    alone = torch.cat(alone, dim=1)
    alone.sum().backward()

    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(packed_model.named_parameters(), alone_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    # Without the masks the first token of a later document sees the earlier ones.
    crossing = GPTModel(config, ParallelState.single(), seed=3)(tokens=tokens, labels=labels)
    assert not torch.allclose(crossing, alone, rtol=1e-3)


def write_corpus(prefix: str, num_documents: int = 120, seed: int = 0) -> None:
    """Short documents (2-12 tokens) each closed by eod, so every 16-token sample packs several."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix, np.uint16)
    for _ in range(num_documents):
        body = rng.integers(0, EOD, int(rng.integers(1, 12)))
        builder.add_document(np.append(body, EOD))
    builder.finalize()


def test_dataset_emits_segments_and_checks_the_vocabulary(tmp_path):
    prefix = str(tmp_path / "docs")
    write_corpus(prefix)
    indexed = IndexedDataset(prefix)
    ds = GPTDataset(indexed, (0, 120), 40, 16, seed=1, cache_dir=str(tmp_path / "c"), eod_id=EOD,
                    eod_mask_loss=True, reset_position_ids=True, reset_attention_mask=True,
                    vocab_size=200)
    for i in range(len(ds)):
        sample = ds[i]
        _, loss_mask, positions = megatron_ltor(sample["tokens"], EOD, True, True, True)
        assert torch.equal(sample["position_ids"], positions)
        assert torch.equal(sample["loss_mask"], loss_mask)
        allowed = document_causal_mask(sample["segment_ids"].unsqueeze(0))[0, 0]
        assert torch.equal(allowed, megatron_ltor(sample["tokens"], EOD, True, True, True)[0])
    assert "segment_ids" not in GPTDataset(indexed, (0, 120), 40, 16, seed=1,
                                           cache_dir=str(tmp_path / "c"), eod_id=EOD)[0]
    small = GPTDataset(indexed, (0, 120), 40, 16, seed=1, cache_dir=str(tmp_path / "c"),
                       eod_id=EOD, vocab_size=100)
    with pytest.raises(ValueError, match=f"{prefix}: sample 0 holds token id .* outside the "
                                         "model's vocabulary of 100"):
        for i in range(len(small)):
            small[i]


def _document_config(prefix, masking=True, **layout):
    config = tiny_config(**layout)
    config.data = DataConfig(data_path=[prefix], split="100,0,0", tokenizer_type="NullTokenizer",
                             reset_position_ids=masking, reset_attention_mask=masking,
                             eod_mask_loss=masking, data_cache_path=prefix + "-cache")
    return config


def test_document_masking_composes_with_tp_sp_pp_cp_and_recompute(tmp_path):
    prefix = str(tmp_path / "docs")
    write_corpus(prefix, num_documents=400)
    ref_losses, ref_params = run_layout(_document_config(prefix), 1)
    for layout, recompute in [(dict(tp=2, pp=2, sp=True), ("full", "uniform", 1)),
                              (dict(pp=4), ("selective", None, None))]:
        config = _document_config(prefix, **layout)
        t = config.training
        t.recompute_granularity, t.recompute_method, t.recompute_num_layers = recompute
        losses, params = run_layout(config, 4)
        for (loss, norm), (ref_loss, ref_norm) in zip(losses, ref_losses):
            assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-5)
        assert_close_params(params, ref_params)
    context_parallel = _document_config(prefix)
    context_parallel.parallel.context_parallel_size = 2  # ring attention with segment ids
    losses, params = run_layout(context_parallel, 2)
    for (loss, norm), (ref_loss, ref_norm) in zip(losses, ref_losses):
        assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-5)
    assert_close_params(params, ref_params)
    plain_losses, _ = run_layout(_document_config(prefix, masking=False), 1)
    assert plain_losses[0][0] != pytest.approx(ref_losses[0][0], rel=1e-3)


def test_mock_data_masks_documents_at_the_tokenizers_eod():
    from slimtron.config import ConfigError
    from slimtron.data.mock_dataset import MockGPTDataset

    ds = MockGPTDataset(30, 24, 20, seed=3, eod_id=19, eod_mask_loss=True,
                        reset_position_ids=True, reset_attention_mask=True)
    closed = 0
    for i in range(len(ds)):
        sample = ds[i]
        allowed, loss_mask, positions = megatron_ltor(sample["tokens"], 19, True, True, True)
        assert torch.equal(sample["position_ids"], positions)
        assert torch.equal(sample["loss_mask"], loss_mask)
        assert torch.equal(document_causal_mask(sample["segment_ids"].unsqueeze(0))[0, 0], allowed)
        closed += int((sample["tokens"] == 19).sum())
    assert closed > 0  # some samples do hold several documents
    with pytest.raises(ConfigError, match="need a tokenizer with an end-of-document id"):
        MockGPTDataset(4, 24, 20, reset_attention_mask=True)
