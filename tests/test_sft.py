"""SFT data: the loss mask covers exactly the answers, packing keeps conversations apart (positions
restart, labels never cross a boundary), and a packed batch gives the same per-token losses, hence
the same loss, as each conversation run on its own; chat templates; one-line errors; the cache."""
import json
import os

import pytest
import torch

from slimtron.config import ConfigError, ModelConfig
from slimtron.data.sft_dataset import (SFTDataset, build_sft_datasets, encode_conversation,
                                       encode_prompt, pack, read_conversations, tokenize_file)
from slimtron.data.tokenizers import build_tokenizer
from slimtron.model import build_model_chunks
from slimtron.parallel.state import ParallelState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SP_MODEL = os.path.join(ROOT, "data", "tokenizer", "kjv_bpe8k.model")

PAIRS = [("Complete the verse: In the beginning God", "created the heaven and the earth."),
         ("Who divided the light from the darkness?", "God."),
         ("Say amen.", "Amen."),
         ("Complete the verse: And God said, Let there be", "light: and there was light."),
         ("Name the first book.", "Genesis, the book of the beginning of all things.")]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("SentencePieceTokenizer", SP_MODEL)


def write_jsonl(path, pairs, as_messages=()):
    with open(path, "w") as f:
        for i, (p, r) in enumerate(pairs):
            record = ({"messages": [{"role": "system", "content": "Answer briefly."},
                                    {"role": "user", "content": p},
                                    {"role": "assistant", "content": r}]}
                      if i in as_messages else {"prompt": p, "response": r})
            f.write(json.dumps(record) + "\n")
    return str(path)


def test_default_template_trains_on_answers_and_eos_only(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Amen."},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "Selah."}]
    ids, trained = encode_conversation(messages, tok)
    answers = [i for i, t in zip(ids, trained) if t]
    plain = lambda text: tok.tokenize(text)  # noqa: E731 - this tokenizer adds no bos/eos
    assert answers == plain("Amen.") + [tok.eos] + plain("Selah.") + [tok.eos]
    assert tok.detokenize([i for i, t in zip(ids, trained) if not t]).split() == \
        "### User: hi ### Assistant: ### User: again ### Assistant:".split()
    # The generation prompt is the conversation's own prefix up to the answer.
    prompt = encode_prompt(messages[:1], tok)
    assert ids[:len(prompt)] == prompt and trained[len(prompt)]


def test_hf_chat_template_finds_assistant_turns(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<|user|>", "<|assistant|>", "<|end|>", "hi", "there", "amen", "again"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|end|>",
                                 additional_special_tokens=["<|user|>", "<|assistant|>"])
    hf.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
                        "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
    hf.save_pretrained(str(tmp_path))
    tok = build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "amen"},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "there amen"}]
    ids, trained = encode_conversation(messages, tok)
    w = {x: i for i, x in enumerate(words)}
    assert ids == [w[x] for x in "<|user|> hi <|end|> <|assistant|> amen <|end|> <|user|> again "
                   "<|end|> <|assistant|> there amen <|end|>".split()]
    assert [i for i, t in zip(ids, trained) if t] == [w["amen"], w["<|end|>"], w["there"],
                                                      w["amen"], w["<|end|>"]]
    assert encode_prompt(messages[:1], tok) == ids[:4]


def test_packing_boundaries_and_efficiency(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", PAIRS, as_messages=(1, 3))
    conv = tokenize_file(path, tok, str(tmp_path / "cache"))
    ds = SFTDataset(conv, range(len(conv)), 48, num_samples=6, seed=0)
    assert len(ds) >= 6
    real = 0
    for i in range(len(ds)):
        s = ds[i]
        at = 0
        for segment, c in enumerate(ds.samples[i]):
            ids, trained = conv.get(c)
            n = min(len(ids) - 1, 48)
            sl = slice(at, at + n)
            assert s["tokens"][sl].tolist() == ids[:n].tolist()
            assert s["labels"][sl].tolist() == ids[1:n + 1].tolist()  # never the next conversation
            assert s["loss_mask"][sl].tolist() == trained[1:n + 1].astype(float).tolist()
            assert s["position_ids"][sl].tolist() == list(range(n))
            assert (s["segment_ids"][sl] == segment).all()
            at += n
        real += at
        assert (s["loss_mask"][at:] == 0).all() and (s["segment_ids"][at:] == segment + 1).all()
    assert ds.packing_efficiency == pytest.approx(real / (len(ds) * 48))
    assert pack([3, 5, 2, 4, 1], 6) == [[0, 2, 4], [1], [3]]


def test_reading_errors_are_one_line(tmp_path):
    cases = {"not json\n": "a.jsonl:1: not JSON",
             '{"prompt": "x"}\n': "a.jsonl:1: expected",
             '{"messages": [{"role": "user", "content": "x"}]}\n': "no assistant message",
             '{"messages": [{"role": "bot", "content": "x"}]}\n': "each message needs a role"}
    for text, message in cases.items():
        (tmp_path / "a.jsonl").write_text('{"prompt": "p", "response": "r"}\n\n' * 0 + text)
        with pytest.raises(ConfigError, match=message):
            read_conversations(str(tmp_path / "a.jsonl"))


def test_cache_and_weighted_blend(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", PAIRS)
    b = write_jsonl(tmp_path / "b.jsonl", PAIRS[::-1] * 2)
    cache = str(tmp_path / "cache")
    first = tokenize_file(a, tok, cache)
    assert len(os.listdir(cache)) == 1
    again = tokenize_file(a, tok, cache)
    assert (first.tokens == again.tokens).all() and len(os.listdir(cache)) == 1
    lines = []
    train, valid, test = build_sft_datasets(["0.25", a, "0.75", b], "100,0,0", 64, 3, (40, 0, 0),
                                            tok, cache, log=lines.append)
    assert valid is None and test is None and len(train) == 40
    assert all("packing efficiency" in line for line in lines) and len(lines) == 2
    from_a = sum(int(d) == 0 for d in train.dataset_index)
    assert from_a == 10


def llama() -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                       num_query_groups=2, seq_length=128, vocab_size=8000,
                       normalization="RMSNorm", position_embedding_type="rope", swiglu=True,
                       add_bias_linear=False, untie_embeddings_and_output_weights=True,
                       hidden_dropout=0.0, attention_dropout=0.0)


def gpt2() -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=128,
                       vocab_size=8000, hidden_dropout=0.0, attention_dropout=0.0)


@pytest.mark.parametrize("cfg", [llama(), gpt2()], ids=["llama", "gpt2"])
def test_packed_loss_equals_per_conversation_loss(tmp_path, tok, cfg):
    path = write_jsonl(tmp_path / "a.jsonl", PAIRS, as_messages=(0, 2))
    conv = tokenize_file(path, tok, str(tmp_path / "cache"))
    ds = SFTDataset(conv, range(len(conv)), 128, num_samples=2, seed=1)
    model = build_model_chunks(cfg, ParallelState.single())[0].eval()
    batch = {k: torch.stack([ds[i][k] for i in range(2)]) for k in ds[0]}
    assert (batch["segment_ids"].max(dim=1).values >= 2).all()  # two conversations + padding
    with torch.no_grad():
        packed = model(tokens=batch["tokens"], position_ids=batch["position_ids"],
                       labels=batch["labels"], segment_ids=batch["segment_ids"])
    num, den = 0.0, 0.0
    for i in range(2):
        at = 0
        for c in ds.samples[i]:
            ids, trained = conv.get(c)
            n = len(ids) - 1
            x = torch.as_tensor(ids, dtype=torch.long)[None]
            with torch.no_grad():
                alone = model(tokens=x[:, :-1], labels=x[:, 1:])[0]
            torch.testing.assert_close(packed[i, at:at + n], alone, rtol=1e-5, atol=1e-5)
            mask = torch.as_tensor(trained[1:], dtype=torch.float32)
            num, den = num + (alone * mask).sum(), den + mask.sum()
            at += n
    mask = batch["loss_mask"]
    torch.testing.assert_close((packed * mask).sum() / mask.sum(), num / den, rtol=1e-5, atol=0)


def test_sft_training_tp2_sp_equals_one_process(tmp_path):
    """Three real --sft steps under tp=2 with sequence parallelism against one process: the packed
    batches (segment_ids, restarting positions, answer-only mask) reach every layer alike."""
    from slimtron.config import DataConfig
    from tests.test_training_parity import assert_close_params, run_layout, tiny_config

    path = write_jsonl(tmp_path / "a.jsonl", PAIRS * 8, as_messages=(1, 4, 7))

    def sft(config):
        config.model.seq_length = config.model.max_position_embeddings = 64
        config.model.num_layers = 2
        config.data = DataConfig(sft=True, data_path=[path], split="100,0,0",
                                 tokenizer_type="SentencePieceTokenizer", tokenizer_model=SP_MODEL,
                                 data_cache_path=str(tmp_path / "cache"))
        config.training.train_iters = 3
        return config

    ref_losses, ref_params = run_layout(sft(tiny_config()), 1)
    losses, params = run_layout(sft(tiny_config(tp=2, sp=True)), 2)
    # Losses and parameters at 1e-5; the grad norm (second column) is left out: at this
    # vocabulary (8000) it differs by ~2e-5 relative between tp=1 and tp=2 with mock data too.
    torch.testing.assert_close(torch.tensor(losses)[:, 0], torch.tensor(ref_losses)[:, 0],
                               rtol=1e-5, atol=0)
    assert_close_params(params, ref_params)


def test_sft_flag_rules_are_one_line_errors(tmp_path):
    from slimtron.arguments import parse_args, validate
    path = write_jsonl(tmp_path / "a.jsonl", PAIRS)
    tok = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", SP_MODEL]
    cases = [(["--sft", "--mock-data"] + tok, "cannot use --mock-data"),
             (["--sft", "--data-path", path], "pass --tokenizer-type"),
             (["--sft", "--data-path", path, "--eod-mask-loss"] + tok, "does not apply to --sft"),
             (["--sft", "--data-path", str(tmp_path / "b.jsonl")] + tok, "b.jsonl does not exist"),
             (["--mock-data", "--kd-alpha", "0.5"], "--kd-alpha needs --kd-teacher-load"),
             (["--mock-data", "--kd-teacher-load", str(tmp_path), "--kd-alpha", "2"],
              "--kd-alpha must be in"),
             (["--mock-data", "--kd-teacher-load", str(tmp_path / "none")], "does not exist")]
    for argv, message in cases:
        with pytest.raises(ConfigError, match=message):
            validate(parse_args(argv), 1)
    config = validate(parse_args(["--sft", "--data-path", path] + tok), 1)
    assert config.data.sft and config.training.kd_alpha is None
