#!/usr/bin/env python
"""Continue a prompt with a slimtron checkpoint.

    python tools/generate.py --load ckpt/ --prompt "In the beginning" --max-new-tokens 32 --greedy
    torchrun --nproc-per-node 2 tools/generate.py --load ckpt/ --prompt "..." --top-p 0.9 --seed 7

Every rank is one tensor-parallel rank (TP size = the world size); the checkpoint may have been
saved in any layout. The tokenizer is the checkpoint's (its config's data.tokenizer_type and
tokenizer_model) unless --tokenizer-type / --tokenizer-model are given; a checkpoint imported from
Hugging Face without a tokenizer needs them. Rank 0 prints the completion.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from slimtron.checkpointing import load_checkpoint, load_common
from slimtron.cli import run_tool
from slimtron.config import Config
from slimtron.data.tokenizers import build_model_tokenizer
from slimtron.generation import generate
from slimtron.model import build_model_chunks
from slimtron.parallel.state import ParallelState, init_distributed
from slimtron.training import DTYPES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="checkpoint directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (no sampling)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0: no nucleus filter")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--ignore-eod", action="store_true", help="do not stop at end-of-document")
    p.add_argument("--tokenizer-type", default=None)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = p.parse_args(argv)
    if args.greedy and (args.temperature != 1.0 or args.top_k or args.top_p != 1.0):
        p.error("--greedy does not combine with --temperature / --top-k / --top-p")
    return args


def load_model(args, config: Config, pstate: ParallelState):
    cfg = config.model
    cfg.hidden_dropout = cfg.attention_dropout = 0.0
    model = build_model_chunks(cfg, pstate, params_dtype=DTYPES[args.dtype],
                               device=pstate.device)[0]
    load_checkpoint(args.load, [model], None, pstate=pstate, config=config, finetune=True)
    return model.eval()


def run(args) -> list[int]:
    """Generate; returns the new token ids (every rank) and prints the completion (rank 0)."""
    device = init_distributed()
    world = dist.get_world_size() if dist.is_initialized() else 1
    pstate = ParallelState.build(tp=world, pp=1, device=device)
    _, common = load_common(args.load)
    config = Config.from_dict(common["config"])
    tokenizer = build_model_tokenizer(args.tokenizer_type or config.data.tokenizer_type,
                                      args.tokenizer_model or config.data.tokenizer_model,
                                      config.model.vocab_size, args.load,
                                      vocab_file=config.data.vocab_file,
                                      merge_file=config.data.merge_file)
    model = load_model(args, config, pstate)
    prompt = torch.tensor([tokenizer.tokenize(args.prompt)], dtype=torch.long, device=device)
    out = generate(model, prompt, args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, greedy=args.greedy, seed=args.seed,
                   eod=None if args.ignore_eod else tokenizer.eod)
    new_ids = out[0, prompt.shape[1]:].tolist()
    if pstate.rank == 0:
        print(completion_text(tokenizer, prompt[0].tolist(), new_ids), flush=True)
    return new_ids


def completion_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new tokens add to the prompt. Decoded together with the prompt, because a
    tokenizer decoding the new tokens alone may drop the space that starts them."""
    before = tokenizer.detokenize(prompt_ids)
    after = tokenizer.detokenize(prompt_ids + new_ids)
    return after[len(before):] if after.startswith(before) else tokenizer.detokenize(new_ids)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_tool("generate", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
