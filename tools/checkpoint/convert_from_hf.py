#!/usr/bin/env python
"""Import a local Hugging Face Llama or GPT-2 directory as a slimtron checkpoint.

    python tools/checkpoint/convert_from_hf.py --hf hf_dir/ --save ckpt/ [--tokenizer-model PATH]
        [--ckpt-format torch --tensor-model-parallel-size T --pipeline-model-parallel-size P]

Writes iteration 0 with no optimizer state. Continue from it with
``pretrain_gpt.py --load ckpt/ --finetune ...``. The model's shape comes from config.json; the
weights go through ``slimtron.hf_mapping``'s table in the HF -> slimtron direction, in the dtype
they are stored in, one tensor at a time (memory: the largest tensor, not the model).

- ``--ckpt-format torch_dist`` (default): format 2, written as by one rank; any layout loads it
  and each rank reads only the bytes of its own shards.
- ``--ckpt-format torch``: format 1, the files ``save_checkpoint`` writes for a (T, P) layout
  (any layout loads it too, but every rank reads whole tensors of its stage). The shard structure
  (which parameters a stage holds, how each is split) is read from the model itself, built on the
  meta device for every (tp, pp) rank.

The tokenizer recorded in the checkpoint: --tokenizer-model (a sentencepiece .model file or a
tokenizer directory) when given, else the HF directory itself when it holds a tokenizer.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Optional

import torch

from slimtron import checkpointing, hf_mapping
from slimtron.cli import run_tool
from slimtron.config import Config, ConfigError, DataConfig, ModelConfig, ParallelConfig
from slimtron.parallel.sharding import shard_like
from slimtron.parallel.state import ParallelState

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# Buffers some HF checkpoints carry that are not parameters.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


class HFWeights:
    """Lazy access to the safetensors weights of an HF directory (single file or indexed)."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.exists(single):
            weight_map = None
        else:
            raise ConfigError(f"--hf {hf_dir}: no model.safetensors or {os.path.basename(index)} "
                              "(only safetensors weights are read)")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.handles = {f: safe_open(os.path.join(hf_dir, f), framework="pt") for f in files}
        self.where = weight_map or {k: "model.safetensors" for k in self.handles[files[0]].keys()}
        self.used: set[str] = set()
        self.hf_dir = hf_dir

    def get(self, name: str) -> torch.Tensor:
        stored = self._stored_name(name)
        self.used.add(stored)
        return self.handles[self.where[stored]].get_tensor(stored)

    def _stored_name(self, name: str) -> str:
        """Weights saved from the bare base model (e.g. the original GPT-2 files) lack the
        ``transformer.`` / ``model.`` prefix of the LM-head class."""
        if name in self.where:
            return name
        base, _, rest = name.partition(".")
        if base in ("transformer", "model") and rest in self.where:
            return rest
        raise ConfigError(f"--hf {self.hf_dir}: weights have no tensor {name}")

    def unused(self) -> list[str]:
        return sorted(n for n in self.where
                      if n not in self.used and not n.endswith(IGNORED_SUFFIXES))


def read_hf_config(hf_dir: str) -> tuple[ModelConfig, list[str]]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--hf {hf_dir}: no config.json (not a Hugging Face model directory)")
    with open(path) as f:
        return hf_mapping.model_config_from_hf(json.load(f), path)


def tokenizer_setting(hf_dir: str, tokenizer_model: Optional[str], tokenizer_type: Optional[str],
                      arch: str) -> tuple[Optional[str], Optional[str]]:
    """(tokenizer_type, tokenizer_model) to record in the checkpoint's config."""
    if tokenizer_model is None:
        if not any(os.path.exists(os.path.join(hf_dir, f)) for f in TOKENIZER_FILES):
            return None, None
        tokenizer_model = hf_dir
    if not os.path.exists(tokenizer_model):
        raise ConfigError(f"--tokenizer-model {tokenizer_model}: no such file or directory")
    if tokenizer_type is None:
        if os.path.isdir(tokenizer_model):
            tokenizer_type = "HuggingFaceTokenizer"
        else:
            tokenizer_type = "SentencePieceTokenizer" if arch == "llama" else "GPTSentencePieceTokenizer"
    return tokenizer_type, os.path.abspath(tokenizer_model)


def stage_parameters(cfg: ModelConfig, tp: int, pp: int, pp_rank: int) -> list[dict]:
    """For each TP rank of stage ``pp_rank``: global name -> meta parameter (shape + attributes)."""
    from slimtron.model import build_model_chunks

    out = []
    for tp_rank in range(tp):
        pstate = ParallelState.for_planning(tp, pp, 1, rank=pp_rank * tp + tp_rank)
        chunks = build_model_chunks(cfg, pstate, device="meta")
        params = {}
        for chunk in chunks:
            for p in chunk.parameters():
                params.setdefault(p.global_name, p)
        out.append(params)
    return out


def write_stage(weights: HFWeights, cfg: ModelConfig, rules: dict, tp: int, pp: int,
                pp_rank: int, out_dir: str):
    per_rank = stage_parameters(cfg, tp, pp, pp_rank)
    shards = [{"params": {}, "meta": {}, "tp_rank": r, "tp_size": tp, "pp_rank": pp_rank}
              for r in range(tp)]
    for name, meta_param in per_rank[0].items():
        full = hf_tensor(weights, cfg, rules, name, meta_param)
        for tp_rank, params in enumerate(per_rank):
            p = params[name]
            shards[tp_rank]["params"][name] = shard_like(full, p, tp, tp_rank).clone()
            shards[tp_rank]["meta"][name] = checkpointing.v1.param_meta(p)
    for tp_rank, shard in enumerate(shards):
        torch.save(shard, os.path.join(out_dir, checkpointing.model_file(tp_rank, pp_rank)))


def write_dist(weights: HFWeights, cfg: ModelConfig, rules: dict, out_dir: str) -> dict:
    """Format 2 as written by the one rank of a tp=1, pp=1 layout; returns its layout."""
    writer = checkpointing.dist_format.SingleRankWriter(out_dir, cfg.vocab_size)
    for name, meta_param in stage_parameters(cfg, 1, 1, 0)[0].items():
        writer.add(meta_param, hf_tensor(weights, cfg, rules, name, meta_param))
    layout = checkpointing.common.layout_of(ParallelState.for_planning(1, 1, 1))
    writer.finish(layout)
    return layout


def hf_tensor(weights: HFWeights, cfg: ModelConfig, rules: dict, name: str,
              meta_param) -> torch.Tensor:
    """The full tensor of slimtron parameter ``name`` from the HF weights (vocabulary padded)."""
    if name not in rules:
        raise ConfigError(f"slimtron parameter {name} has no row in the Hugging Face mapping")
    rule = rules[name]
    full = hf_mapping.from_hf(rule, {n: weights.get(n) for n in rule.theirs}, cfg)
    return hf_mapping.pad_to(name, full, meta_param.full_shape)


def convert(hf_dir: str, save: str, tp: int = 1, pp: int = 1,
            tokenizer_model: Optional[str] = None, tokenizer_type: Optional[str] = None,
            ckpt_format: str = "torch_dist") -> Config:
    """Write the checkpoint; returns its Config."""
    if ckpt_format not in checkpointing.CKPT_FORMATS:
        raise ConfigError(f"--ckpt-format {ckpt_format!r}: expected one of "
                          f"{', '.join(checkpointing.CKPT_FORMATS)}")
    if ckpt_format == "torch_dist" and (tp, pp) != (1, 1):
        raise ConfigError("--tensor-model-parallel-size / --pipeline-model-parallel-size choose "
                          "the files of --ckpt-format torch only: a torch_dist checkpoint loads "
                          "into any layout")
    cfg, warnings = read_hf_config(hf_dir)
    for w in warnings:
        print(f"convert_from_hf: warning: {w}", file=sys.stderr)
    arch = hf_mapping.architecture(cfg)
    from slimtron.model import validate_parallel_config

    validate_parallel_config(cfg, tp, pp)
    if checkpointing.latest_iteration(save) is not None:
        raise ConfigError(f"--save {save}: already holds a checkpoint")
    tok_type, tok_model = tokenizer_setting(hf_dir, tokenizer_model, tokenizer_type, arch)
    config = Config(model=cfg, parallel=ParallelConfig(tensor_model_parallel_size=tp,
                                                       pipeline_model_parallel_size=pp),
                    data=DataConfig(tokenizer_type=tok_type, tokenizer_model=tok_model))
    weights = HFWeights(hf_dir)
    rules = {r.ours: r for r in hf_mapping.mapping(cfg)}
    final = checkpointing.iteration_dir(save, 0)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if ckpt_format == "torch_dist":
        layout = write_dist(weights, cfg, rules, tmp)
    else:
        for pp_rank in range(pp):
            write_stage(weights, cfg, rules, tp, pp, pp_rank, tmp)
        layout = checkpointing.common.layout_of(ParallelState.for_planning(tp, pp, 1))
    left = weights.unused()
    if left:
        raise ConfigError(f"--hf {hf_dir}: {len(left)} tensors have no slimtron parameter, "
                          f"e.g. {', '.join(left[:3])}")
    common = {"format_version": checkpointing.CKPT_FORMATS[ckpt_format], "iteration": 0,
              "consumed_samples": 0, "config": config.to_dict(), "layout": layout,
              "optimizer": None, "extra": {"converted_from": "huggingface"}}
    torch.save(common, os.path.join(tmp, "common.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    checkpointing.common.write_tracker(save, 0)
    return config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", required=True, help="local Hugging Face model directory")
    p.add_argument("--save", required=True, help="checkpoint directory to create")
    p.add_argument("--ckpt-format", default="torch_dist",
                   choices=sorted(checkpointing.CKPT_FORMATS),
                   help="torch_dist (format 2, default): any layout loads it reading only its "
                        "own bytes; torch: format 1's files for the layout given next")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="with --ckpt-format torch: the TP size whose files are written")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="with --ckpt-format torch: the PP size whose files are written")
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--tokenizer-type", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def work():
        m = convert(args.hf, args.save, args.tensor_model_parallel_size,
                    args.pipeline_model_parallel_size, args.tokenizer_model,
                    args.tokenizer_type, args.ckpt_format).model
        files = ("any layout loads it" if args.ckpt_format == "torch_dist" else
                 f"files of tp={args.tensor_model_parallel_size} "
                 f"pp={args.pipeline_model_parallel_size}")
        print(f"wrote {hf_mapping.architecture(m)} checkpoint ({m.num_layers} layers, hidden "
              f"{m.hidden_size}) to {args.save}, --ckpt-format {args.ckpt_format} ({files})")

    return run_tool("convert_from_hf", work)


if __name__ == "__main__":
    sys.exit(main())
