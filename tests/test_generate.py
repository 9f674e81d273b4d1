"""Generation with a KV cache: equal to recomputing the whole sequence, to transformers' greedy
generate on the exported model, and under TP=2 to TP=1."""
import os

import pytest
import torch

from slimtron.checkpointing import save_checkpoint
from slimtron.config import Config, ModelConfig
from slimtron.data.tokenizers import SentencePieceTokenizer
from slimtron.generation import KVCache, filter_logits, generate, sample
from slimtron.model import build_model_chunks
from slimtron.parallel.state import ParallelState
from tests.distributed import run_distributed
from tests.test_hf_conversion import (SP_MODEL, gpt2_config, llama_config, perturb,
                                      save_reference_checkpoint, tool)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "And God said, Let there be light"


gen_tool = tool("generate", "tools")


def small(cfg: ModelConfig) -> ModelConfig:
    cfg.vocab_size = 300  # no tokenizer needed for the in-process checks
    return cfg


def built(cfg: ModelConfig, tp_state=None):
    pstate = tp_state or ParallelState.single()
    model = build_model_chunks(cfg, pstate)[0]
    perturb([model], cfg, pstate)
    return model.eval()


@torch.no_grad()
def without_cache(model, tokens, steps, choose):
    """The reference: the whole sequence through the model at every step."""
    for _ in range(steps):
        logits = model(tokens)[:, -1, :model.config.vocab_size].float()
        tokens = torch.cat([tokens, choose(logits)[:, None]], dim=1)
    return tokens


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cached_generation_equals_recomputing_everything(kind):
    cfg = small(llama_config() if kind == "llama" else gpt2_config())
    model = built(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    out = generate(model, prompt, 12, greedy=True)
    assert out.shape == (2, 17) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, without_cache(model, prompt, 12, lambda l: l.argmax(-1)))

    options = dict(temperature=0.7, top_k=40, top_p=0.9)
    sampled = generate(model, prompt, 12, seed=3, **options)
    g = torch.Generator().manual_seed(3)
    expected = without_cache(model, prompt, 12,
                             lambda l: sample(l, greedy=False, generator=g, **options))
    assert torch.equal(sampled, expected)
    assert not torch.equal(sampled, out)  # sampling did sample
    assert torch.equal(generate(model, prompt, 12, seed=3, **options), sampled)  # seeded

    # End of document: a sequence that produced it is padded with it; all done -> stop early.
    eod = int(out[0, 8])  # sequence 0's 4th new token
    stopped = generate(model, prompt, 12, greedy=True, eod=eod)
    first = int((out[0, 5:] == eod).nonzero()[0]) + 5
    assert torch.equal(stopped[0, :first + 1], out[0, :first + 1])
    assert (stopped[0, first:] == eod).all()
    assert torch.equal(generate(model, prompt[:1], 12, greedy=True, eod=eod), out[:1, :first + 1])


def test_cache_attends_causally_within_a_chunk_after_a_prefix():
    """A multi-token step after cached positions (not used by generate, which feeds one token at a
    time after the prompt) gives the logits of the full forward."""
    cfg = small(llama_config())
    model = built(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    cache = KVCache(9)
    with torch.no_grad():
        model(tokens[:, :4], kv_cache=cache)
        cache.advance(4)
        positions = torch.arange(4, 9)[None]
        chunk = model(tokens[:, 4:], position_ids=positions, kv_cache=cache)
        cache.advance(5)
        full = model(tokens)
    torch.testing.assert_close(chunk, full[:, 4:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exceed its length 9"):
        model(tokens[:, :1], kv_cache=cache)


def test_filters_and_argument_errors():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.6)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.9)).tolist() == [[True, True, True, False]]
    g = torch.Generator().manual_seed(0)
    draws = [int(sample(logits, greedy=False, temperature=1.0, top_k=1, top_p=1.0, generator=g))
             for _ in range(5)]
    assert draws == [0] * 5
    model = built(small(gpt2_config()))
    prompt = torch.zeros((1, 30), dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        generate(model, prompt, 3, greedy=True)
    with pytest.raises(ValueError, match="temperature > 0"):
        generate(model, prompt[:, :2], 3, temperature=0.0)
    with pytest.raises(SystemExit):
        gen_tool.parse_args(["--load", "x", "--prompt", "p", "--greedy", "--top-k", "5"])


# ------------------------------------------------------------- the tool, transformers, TP=2
@pytest.fixture(scope="module")
def llama_files(tmp_path_factory):
    """A tiny Llama checkpoint with the bundled tokenizer, and its Hugging Face export."""
    root = tmp_path_factory.mktemp("generate")
    ckpt, hf_dir = str(root / "ckpt"), str(root / "hf")
    save_reference_checkpoint(ckpt, llama_config())
    assert tool("convert_to_hf").main(["--load", ckpt, "--output", hf_dir]) == 0
    return ckpt, hf_dir


GREEDY = ["--prompt", PROMPT, "--max-new-tokens", "16", "--greedy"]
SAMPLED = ["--prompt", PROMPT, "--max-new-tokens", "16", "--temperature", "0.8", "--top-k", "50",
           "--top-p", "0.95", "--seed", "11"]


def test_generate_tool_greedy_equals_transformers_generate(llama_files, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, hf_dir = llama_files
    ours = gen_tool.run(gen_tool.parse_args(["--load", ckpt] + GREEDY))
    printed = capsys.readouterr().out
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    prompt = tok(PROMPT, return_tensors="pt").input_ids
    assert prompt[0].tolist() == SentencePieceTokenizer(SP_MODEL).tokenize(PROMPT)
    theirs = hf.generate(prompt, do_sample=False, max_new_tokens=16)[0, prompt.shape[1]:].tolist()
    assert len(ours) >= 4 and ours == theirs
    full = tok.decode(prompt[0].tolist() + theirs, skip_special_tokens=True)
    assert printed == full[len(PROMPT):] + "\n"


def _tool_on_ranks(rank, world, ckpt):
    return [gen_tool.run(gen_tool.parse_args(["--load", ckpt] + argv)) for argv in (GREEDY, SAMPLED)]


def test_tp2_generation_equals_tp1(llama_files, capsys):
    ckpt, _ = llama_files
    tp1 = [gen_tool.run(gen_tool.parse_args(["--load", ckpt] + argv)) for argv in (GREEDY, SAMPLED)]
    assert tp1[0] != tp1[1]
    tp2 = run_distributed(_tool_on_ranks, 2, ckpt)
    assert tp2[0] == tp2[1] == tp1


def test_generate_tool_needs_a_tokenizer(tmp_path, capsys):
    cfg = small(gpt2_config())
    model = built(cfg)
    save_checkpoint(str(tmp_path), 1, [model], None, pstate=ParallelState.single(),
                    config=Config(model=cfg), consumed_samples=0)
    assert gen_tool.main(["--load", str(tmp_path)] + GREEDY) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "names no tokenizer: pass --tokenizer-type" in err
