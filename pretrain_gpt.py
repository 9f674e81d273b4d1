#!/usr/bin/env python
"""Pretrain a GPT or Llama model.

    torchrun --nproc-per-node 8 pretrain_gpt.py --preset tiny-llama --tensor-model-parallel-size 2 ...
    python pretrain_gpt.py ...            (one process)

Flags follow Megatron-LM's names; `python pretrain_gpt.py --help` lists them.
"""
from slimtron.arguments import parse_args
from slimtron.training import pretrain

if __name__ == "__main__":
    pretrain(parse_args())
