#!/usr/bin/env python
"""Export a slimtron checkpoint (any tensor/pipeline layout) to a Hugging Face model directory.

    python tools/checkpoint/convert_to_hf.py --load ckpt/ --output hf/ [--dtype bf16]
        [--max-shard-size 2GB] [--tokenizer-type T --tokenizer-model PATH]

Runs in one process and reads the checkpoint files (no process group): every parameter is
reassembled from its TP shards and pipeline stages, mapped by ``slimtron.hf_mapping`` and written
as safetensors (sharded with ``model.safetensors.index.json`` above --max-shard-size), with
config.json, generation_config.json and the tokenizer (from the checkpoint's sentencepiece model, or
its Hugging Face tokenizer directory) so that ``from_pretrained`` loads the directory offline.
The directory is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from typing import Iterator, Optional

import torch

from slimtron import hf_mapping
from slimtron.checkpointing import load_common, open_checkpoint
from slimtron.cli import run_tool
from slimtron.config import Config, ConfigError, ModelConfig
from slimtron.training import DTYPES

INDEX_FILE = "model.safetensors.index.json"


def parse_size(text: str) -> int:
    """'2GB', '500MB', '10KB' or a byte count -> bytes (decimal units, as transformers)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise ConfigError(f"--max-shard-size {text!r}: expected a size such as 2GB, 500MB or 1000")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[m.group(2)]
    return int(float(m.group(1)) * unit)


# ------------------------------------------------------------------------------------ weights
def hf_tensors(saved, cfg: ModelConfig, dtype: torch.dtype
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every parameter, one table row at a time."""
    for rule in hf_mapping.mapping(cfg):
        full = hf_mapping.drop_vocab_padding(rule.ours, saved.full(rule.ours), cfg)
        for name, t in hf_mapping.to_hf(rule, full, cfg).items():
            yield name, t.to(dtype).contiguous()


def write_safetensors(tensors: Iterator[tuple[str, torch.Tensor]], out_dir: str,
                      max_shard_bytes: int) -> list[str]:
    """Write shards of at most ``max_shard_bytes`` (a larger single tensor gets its own shard),
    each as soon as it is full, so that memory holds one shard. Returns the file names; with more
    than one, ``model.safetensors.index.json`` maps every tensor to its file."""
    from safetensors.torch import save_file

    written: list[tuple[str, list[str]]] = []  # (temporary file, tensor names)
    shard: dict[str, torch.Tensor] = {}
    total = size = 0

    def flush():
        path = os.path.join(out_dir, f"shard{len(written):05d}.part")
        save_file(shard, path, metadata={"format": "pt"})
        written.append((path, list(shard)))

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = t
        size += nbytes
        total += nbytes
    flush()
    n = len(written)
    names = (["model.safetensors"] if n == 1 else
             [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)])
    for (path, _), file_name in zip(written, names):
        os.replace(path, os.path.join(out_dir, file_name))
    if n > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {t: f for (_, ts), f in zip(written, names) for t in ts}}
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    return names


# ---------------------------------------------------------------------------------- tokenizer
def sentencepiece_to_hf(model_file: str, add_bos: bool, model_max_length: int):
    """A ``PreTrainedTokenizerFast`` that tokenizes exactly as the sentencepiece BPE model does:
    the sentencepiece whitespace rules (dummy prefix, spaces as '▁') are a normalizer, not
    transformers' newer Metaspace pre-tokenizer, which drops the dummy prefix before a leading space."""
    import sentencepiece.sentencepiece_model_pb2 as sp_pb
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    proto = sp_pb.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    if proto.trainer_spec.model_type != sp_pb.TrainerSpec.BPE:
        raise ConfigError(f"--tokenizer-model {model_file}: only sentencepiece BPE models are "
                          "exported (this one is not BPE)")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=_bpe_merges(vocab), fuse_unk=True,
                                   byte_fallback=proto.trainer_spec.byte_fallback,
                                   unk_token=proto.pieces[proto.trainer_spec.unk_id].piece))
    norm = proto.normalizer_spec
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    backend.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decode)
    special = _special_pieces(proto)
    backend.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in special.values()])
    bos = special.get("bos")
    if add_bos and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=special.get("eos"),
        unk_token=special.get("unk"), pad_token=special.get("pad"),
        model_max_length=model_max_length, clean_up_tokenization_spaces=False)


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Sentencepiece BPE stores pieces, not merges: every split of a piece into two pieces is a
    merge, ranked by the merged piece's id (its score order)."""
    merges = []
    for piece, rank in vocab.items():
        splits = [(vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
                  for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(rank, a, b) for _, _, a, b in sorted(splits)]
    merges.sort(key=lambda m: m[0])
    return [(a, b) for _, a, b in merges]


def _special_pieces(proto) -> dict[str, str]:
    spec = proto.trainer_spec
    out = {}
    for role, idx in (("unk", spec.unk_id), ("bos", spec.bos_id), ("eos", spec.eos_id),
                      ("pad", spec.pad_id)):
        if 0 <= idx < len(proto.pieces):
            out[role] = proto.pieces[idx].piece
    return out


def export_tokenizer(tokenizer_type: Optional[str], tokenizer_model: Optional[str], out_dir: str,
                     cfg: ModelConfig):
    """Save the tokenizer into ``out_dir``; returns it (None when the checkpoint names none)."""
    if not tokenizer_model:
        return None
    if tokenizer_type == "HuggingFaceTokenizer":
        from transformers import AutoTokenizer

        if not os.path.isdir(tokenizer_model):
            raise ConfigError(f"tokenizer directory {tokenizer_model!r} does not exist (pass "
                              "--tokenizer-model)")
        tok = AutoTokenizer.from_pretrained(tokenizer_model, local_files_only=True)
    elif tokenizer_type in (None, "SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                            "Llama2Tokenizer"):
        if not os.path.isfile(tokenizer_model):
            raise ConfigError(f"sentencepiece model {tokenizer_model!r} does not exist (pass "
                              "--tokenizer-model)")
        # No bos added: these types tokenize the corpus without one (Megatron-LM main's wrapper).
        tok = sentencepiece_to_hf(tokenizer_model, False, cfg.max_position_embeddings)
    else:
        raise ConfigError(f"--tokenizer-type {tokenizer_type!r} cannot be exported")
    if len(tok) > cfg.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer_model} has {len(tok)} tokens, more than the "
                          f"model's vocabulary {cfg.vocab_size}")
    tok.save_pretrained(out_dir)
    _portable_tokenizer_class(out_dir)
    return tok


def _portable_tokenizer_class(out_dir: str):
    """Name the generic fast class, which every transformers release resolves."""
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(path, "w") as f:
            json.dump(config, f, indent=2)


# -------------------------------------------------------------------------------------- main
def convert(load: str, output: str, dtype: str = "fp32", max_shard_size: str = "2GB",
            tokenizer_type: Optional[str] = None, tokenizer_model: Optional[str] = None) -> str:
    """Write the HF directory ``output`` from the newest checkpoint in ``load``; returns its
    architecture ("llama" or "gpt2")."""
    from transformers import GenerationConfig

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    ckpt_dir, common = load_common(load)
    config = Config.from_dict(common["config"])
    cfg = config.model
    arch = hf_mapping.architecture(cfg)
    if os.path.isdir(output) and os.listdir(output):
        raise ConfigError(f"--output {output}: directory exists and is not empty")
    tmp = output.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    saved = open_checkpoint(ckpt_dir, common)
    write_safetensors(hf_tensors(saved, cfg, DTYPES[dtype]), tmp, max_bytes)
    tok = export_tokenizer(tokenizer_type or config.data.tokenizer_type,
                           tokenizer_model or config.data.tokenizer_model, tmp, cfg)
    ids = {} if tok is None else dict(bos=tok.bos_token_id, eos=tok.eos_token_id,
                                      pad=tok.pad_token_id)
    hf_mapping.hf_config(cfg, DTYPES[dtype], **ids).save_pretrained(tmp)
    GenerationConfig(**{f"{k}_token_id": v for k, v in ids.items()}).save_pretrained(tmp)
    if os.path.isdir(output):
        os.rmdir(output)
    os.replace(tmp, output)
    return arch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="slimtron checkpoint directory")
    p.add_argument("--output", required=True, help="Hugging Face directory to create")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--tokenizer-type", default=None, help="override the checkpoint's")
    p.add_argument("--tokenizer-model", default=None, help="override the checkpoint's")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def work():
        arch = convert(args.load, args.output, args.dtype, args.max_shard_size,
                       args.tokenizer_type, args.tokenizer_model)
        print(f"wrote {arch} model to {args.output}")

    return run_tool("convert_to_hf", work)


if __name__ == "__main__":
    sys.exit(main())
