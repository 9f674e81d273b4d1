"""tools/preprocess_data.py and tools/merge_datasets.py, run as subprocesses on small inputs."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard

from slimtron.data.indexed_dataset import IndexedDataset
from slimtron.data.tokenizers import GPTSentencePieceTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import merge_datasets  # noqa: E402  (tools/ is not a package; error paths run in-process)
import preprocess_data  # noqa: E402

MODEL = str(REPO / "data" / "tokenizer" / "kjv_bpe8k.model")
SPLIT_KEY = "meta.redpajama_set_name"


def run_tool(tool, *args, check=True):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / tool), *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def preprocess_args(inputs, prefix, *extra):
    inputs = inputs if isinstance(inputs, list) else [inputs]
    return [str(a) for a in ("--input", *inputs, "--output-prefix", prefix, "--tokenizer-type",
                             "GPTSentencePieceTokenizer", "--tokenizer-model", MODEL, *extra)]


def preprocess(inputs, prefix, *extra, check=True):
    return run_tool("preprocess_data.py", *preprocess_args(inputs, prefix, *extra), check=check)


@pytest.fixture(scope="module")
def records():
    """Every 20th chapter of the bundled corpus: 60 documents from all six sets."""
    raw = zstandard.ZstdDecompressor().decompress(
        (REPO / "data" / "corpus" / "kjv.jsonl.zst").read_bytes(), max_output_size=1 << 26)
    return [json.loads(line) for line in raw.decode().splitlines()[::20]]


@pytest.fixture(scope="module")
def tokenizer():
    return GPTSentencePieceTokenizer(MODEL)


def write_jsonl(path: Path, lines) -> Path:
    payload = b"".join((ln if isinstance(ln, bytes) else json.dumps(ln).encode()) + b"\n"
                       for ln in lines)
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload)
    elif path.name.endswith(".zst"):
        payload = zstandard.ZstdCompressor().compress(payload)
    path.write_bytes(payload)
    return path


def read_files(prefix) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def test_workers_give_identical_output_and_eod(tmp_path, records, tokenizer):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", records)
    one = preprocess(corpus, tmp_path / "w1", "--append-eod", "--workers", 1,
                     "--lines-per-batch", 7, "--log-interval", 20)
    two = preprocess(corpus, tmp_path / "w2", "--append-eod", "--workers", 2,
                     "--lines-per-batch", 7, "--log-interval", 20)
    assert read_files(tmp_path / "w1_text_document") == read_files(tmp_path / "w2_text_document")
    assert "processed 21 documents (" in one.stderr and "MB/s" in one.stderr
    assert "tokens/s)" in two.stderr

    ds = IndexedDataset(str(tmp_path / "w1_text_document"))
    assert ds.dtype == np.uint16 and len(ds) == ds.num_documents == len(records)
    for i, record in enumerate(records):  # input order, eod after each document
        assert ds[i].tolist() == tokenizer.tokenize(record["text"]) + [tokenizer.eod]
    assert f"w1_text_document: {len(records)} documents, {ds.num_tokens} tokens" in one.stdout

    preprocess(corpus, tmp_path / "noeod", "--workers", 2, "--lines-per-batch", 7)
    plain = IndexedDataset(str(tmp_path / "noeod_text_document"))
    assert plain[5].tolist() == tokenizer.tokenize(records[5]["text"])
    assert plain.num_tokens == ds.num_tokens - len(records)


def test_split_by_meta_and_merge(tmp_path, records, tokenizer):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", records)
    (tmp_path / "out").mkdir()
    proc = preprocess(corpus, tmp_path / "out" / "kjv", "--split-by-meta", SPLIT_KEY,
                      "--workers", 2, "--lines-per-batch", 9, "--append-eod")
    by_set: dict = {}
    for record in records:
        by_set.setdefault(record["meta"]["redpajama_set_name"], []).append(record["text"])
    assert len(by_set) == 6
    for name, texts in by_set.items():
        prefix = tmp_path / "out" / f"kjv_{name}_text_document"
        ds = IndexedDataset(str(prefix))
        assert len(ds) == len(texts)
        assert [tokenizer.detokenize(ds[i]) for i in range(len(ds))] == texts
        assert f"{prefix}: {len(texts)} documents, {ds.num_tokens} tokens" in proc.stdout
    assert not (tmp_path / "out" / "kjv_text_document.idx").exists()

    merged = run_tool("merge_datasets.py", "--input", tmp_path / "out",
                      "--output-prefix", tmp_path / "merged")
    ds = IndexedDataset(str(tmp_path / "merged"))
    expected = [t for name in sorted(by_set) for t in by_set[name]]  # directory: name order
    assert ds.num_documents == len(ds) == len(records)
    assert [tokenizer.detokenize(ds[i]) for i in range(len(ds))] == expected
    assert f"merged 6 datasets, {len(records)} sequences" in merged.stdout

    pair = run_tool("merge_datasets.py", "--input", tmp_path / "out" / "kjv_wisdom_text_document",
                    tmp_path / "out" / "kjv_law_text_document", "--output-prefix", tmp_path / "p")
    assert f"{len(by_set['wisdom']) + len(by_set['law'])} documents" in pair.stdout


BAD_LINES = [  # (line, reason); each is a separate kind
    (b"\xff\xfe not utf-8", "not valid UTF-8"),
    (b'{"text": "unterminated', "not valid JSON"),
    (b'["a", "list"]', "not a JSON object"),
    (b'{"body": "no text key", "meta": {"redpajama_set_name": "a"}}', "lacks key 'text'"),
    (b'{"text": 42, "meta": {"redpajama_set_name": "a"}}', "key 'text' is not a string"),
    (b'{"text": "no meta"}', f"lacks split key '{SPLIT_KEY}'"),
    (b'{"text": "meta not str", "meta": {"redpajama_set_name": 7}}',
     f"split key '{SPLIT_KEY}' is not a string"),
]


def test_bad_lines_are_counted_or_stop_a_strict_run(tmp_path, tokenizer):
    good = [{"text": f"good document {i}", "meta": {"redpajama_set_name": "a"}} for i in range(4)]
    empty = {"text": "", "meta": {"redpajama_set_name": "a"}}
    lines = [good[0], good[1], empty, b"", *[b for b, _ in BAD_LINES], good[2], good[3]]
    corpus = write_jsonl(tmp_path / "bad.jsonl", lines)
    proc = preprocess(corpus, tmp_path / "lenient", "--split-by-meta", SPLIT_KEY)
    assert f"skipped {len(BAD_LINES)} bad lines" in proc.stdout
    for lineno, (_, reason) in enumerate(BAD_LINES, start=5):
        assert f"{corpus}:{lineno}: {reason}\n" in proc.stdout
    assert "1 documents without tokens (written empty" in proc.stdout
    ds = IndexedDataset(str(tmp_path / "lenient_a_text_document"))
    assert [tokenizer.detokenize(ds[i]) for i in range(len(ds))] == [g["text"] for g in good]
    assert ds.num_documents == 5  # the empty text is a document without sequences (as Megatron)

    strict = preprocess(corpus, tmp_path / "strict", "--split-by-meta", SPLIT_KEY, "--strict",
                        "--workers", 2, "--lines-per-batch", 2, check=False)
    assert strict.returncode == 1
    assert f"{corpus}:5: not valid UTF-8" in strict.stderr
    # Documents were written before line 5; neither final nor temporary files remain.
    assert list(tmp_path.glob("strict*")) == []


def test_gzip_zst_and_glob_inputs_match_plain(tmp_path, records):
    write_jsonl(tmp_path / "a.jsonl", records[:30])
    write_jsonl(tmp_path / "b.jsonl", records[30:])
    write_jsonl(tmp_path / "a.jsonl.gz", records[:30])
    write_jsonl(tmp_path / "b.jsonl.zst", records[30:])
    preprocess([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "plain", "--append-eod")
    proc = preprocess([tmp_path / "*.gz", tmp_path / "b.jsonl.zst"], tmp_path / "packed",
                      "--append-eod", "--workers", 2)
    assert f"total: {len(records)} documents" in proc.stdout
    assert read_files(tmp_path / "plain_text_document") == \
        read_files(tmp_path / "packed_text_document")


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.gz"])
def test_truncated_compressed_input_stops_the_run(tmp_path, records, capsys, suffix):
    """A download cut short: an error naming the file, exit 2, and no output left behind."""
    whole = write_jsonl(tmp_path / f"whole{suffix}", records)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) * 2 // 3])
    assert preprocess_data.main(preprocess_args(cut, tmp_path / "out", "--append-eod")) == 2
    err = capsys.readouterr().err
    assert f"{cut}: cannot read" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.glob("out*")) == []
    # Several complete frames back to back are one valid input.
    if suffix == ".jsonl.zst":
        two = write_jsonl(tmp_path / "a.jsonl.zst", records[:20]).read_bytes() + \
            write_jsonl(tmp_path / "b.jsonl.zst", records[20:]).read_bytes()
        (tmp_path / "two.jsonl.zst").write_bytes(two)
        assert preprocess_data.main(preprocess_args(tmp_path / "two.jsonl.zst",
                                                    tmp_path / "two")) == 0
        assert len(IndexedDataset(str(tmp_path / "two_text_document"))) == len(records)


def test_tokenizer_that_is_not_one_is_one_line(tmp_path, capsys):
    (tmp_path / "c.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "bogus.model").write_bytes(b"\x00garbage")
    args = ["--input", str(tmp_path / "c.jsonl"), "--output-prefix", str(tmp_path / "o"),
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
            str(tmp_path / "bogus.model")]
    assert preprocess_data.main(args) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'bogus.model'}: not a sentencepiece model" in err
    assert len(err.strip().splitlines()) == 1 and list(tmp_path.glob("o_*")) == []


def test_unusable_inputs_fail_with_one_line(tmp_path, capsys):
    (tmp_path / "broken.jsonl.zst").write_bytes(b"not zstd at all")
    assert preprocess_data.main(preprocess_args(tmp_path / "broken.jsonl.zst", tmp_path / "b")) == 2
    assert "broken.jsonl.zst: cannot read" in capsys.readouterr().err
    assert preprocess_data.main(preprocess_args(tmp_path / "absent*.jsonl", tmp_path / "a")) == 2
    assert "--input " + str(tmp_path / "absent*.jsonl") + ": no such file" in capsys.readouterr().err
    assert list(tmp_path.glob("b_*")) == [] and list(tmp_path.glob("a_*")) == []
    with pytest.raises(SystemExit):
        preprocess_data.main(preprocess_args(tmp_path / "broken.jsonl.zst", tmp_path / "no" / "x"))
    assert "directory" in capsys.readouterr().err
    assert merge_datasets.main(["--input", str(tmp_path / "nope"), "--output-prefix",
                                str(tmp_path / "q")]) == 2
    assert "nope.bin does not exist" in capsys.readouterr().err
