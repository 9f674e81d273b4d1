"""Supervised fine-tuning data: conversations from .jsonl, loss on the answers only, packed.

Input: one JSON object per line, either ``{"messages": [{"role": ..., "content": ...}, ...]}``
(roles ``system``, ``user``, ``assistant``) or ``{"prompt": ..., "response": ...}`` (a user turn and
an assistant turn).

Template: a Hugging Face tokenizer's own chat template when it has one; otherwise this default::

    <bos>### System:\\n{content}\\n\\n### User:\\n{content}\\n\\n### Assistant:\\n{content}<eos>...

Each header and content is tokenized on its own (headers are never part of the loss). The loss
covers the assistant contents and the eos that ends each of them, so a model learns to stop.

Packing: conversations (each shifted into tokens/labels on its own) are packed first-fit, in a
seeded random order per epoch, into samples of exactly ``seq_length`` slots. Every sample carries
``segment_ids`` (equal ids = same conversation; attention stays inside a conversation, see
docs/CONVENTIONS.md) and ``position_ids`` that restart at 0 for each conversation; the rest of a
sample is padding with no loss, in a segment of its own. A conversation longer than ``seq_length``
keeps its first ``seq_length`` tokens. ``packing_efficiency`` is real tokens / slots.

Tokenized conversations are cached (``.npz`` next to the cache directory's other indices, keyed by
the file's size and mtime, the tokenizer and the template), so later runs start without tokenizing.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from slimtron.config import ConfigError

ROLES = ("system", "user", "assistant")
DEFAULT_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
TEMPLATE_VERSION = 1
OPEN_BINS = 64  # first-fit looks at this many of the newest unfilled samples


# ---- reading --------------------------------------------------------------------------------

def read_conversations(path: str) -> list[list[dict]]:
    """Every line of a .jsonl as a list of messages; ConfigError naming file and line otherwise."""
    if not os.path.isfile(path):
        raise ConfigError(f"--data-path: {path} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not JSON ({e.msg})") from None
            out.append(_messages_of(record, where))
    if not out:
        raise ConfigError(f"--data-path: {path} holds no conversations")
    return out


def _messages_of(record, where: str) -> list[dict]:
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ConfigError(f"{where}: 'messages' must be a non-empty list")
        for m in messages:
            if (not isinstance(m, dict) or m.get("role") not in ROLES
                    or not isinstance(m.get("content"), str)):
                raise ConfigError(f"{where}: each message needs a role ({', '.join(ROLES)}) and a "
                                  "string content")
        if not any(m["role"] == "assistant" for m in messages):
            raise ConfigError(f"{where}: no assistant message, so nothing to learn from")
        return messages
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) \
            and isinstance(record.get("response"), str):
        return [{"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["response"]}]
    raise ConfigError(f"{where}: expected {{\"messages\": [...]}} or {{\"prompt\": ..., "
                      "\"response\": ...}}")


# ---- templates ------------------------------------------------------------------------------

def _hf_chat_tokenizer(tokenizer):
    """The transformers tokenizer behind ``tokenizer`` when it has a chat template, else None."""
    hf = getattr(tokenizer, "_tok", None)
    return hf if hf is not None and getattr(hf, "chat_template", None) else None


def _plain(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without the special tokens ``tokenize`` may add around it."""
    ids = list(tokenizer.tokenize(text))
    if ids and tokenizer.bos is not None and ids[0] == tokenizer.bos:
        ids = ids[1:]
    if ids and tokenizer.eos is not None and ids[-1] == tokenizer.eos:
        ids = ids[:-1]
    return ids


def encode_conversation(messages: Sequence[dict], tokenizer) -> tuple[list[int], list[bool]]:
    """(token ids, trained flag per token) of one conversation."""
    hf = _hf_chat_tokenizer(tokenizer)
    if hf is not None:
        return _encode_with_chat_template(messages, hf)
    ids, trained = [], []
    if tokenizer.bos is not None:
        ids, trained = [tokenizer.bos], [False]
    for i, m in enumerate(messages):
        header = _plain(tokenizer, DEFAULT_HEADERS[m["role"]])
        ids += header
        trained += [False] * len(header)
        if m["role"] == "assistant":
            body = _plain(tokenizer, m["content"]) + ([tokenizer.eos] if tokenizer.eos is not None
                                                      else [])
            ids += body
            trained += [True] * len(body)
        else:
            body = _plain(tokenizer, m["content"] + "\n\n")
            ids += body
            trained += [False] * len(body)
    return ids, trained


def encode_prompt(messages: Sequence[dict], tokenizer) -> list[int]:
    """The tokens a model continues to answer ``messages`` (ending in the assistant header)."""
    hf = _hf_chat_tokenizer(tokenizer)
    if hf is not None:
        return _render(hf, messages, add_generation_prompt=True)
    ids = [tokenizer.bos] if tokenizer.bos is not None else []
    for m in messages:
        ids += _plain(tokenizer, DEFAULT_HEADERS[m["role"]]) + _plain(tokenizer, m["content"] + "\n\n")
    return ids + _plain(tokenizer, DEFAULT_HEADERS["assistant"])


def _render(hf, messages, add_generation_prompt: bool) -> list[int]:
    """Token ids of ``messages`` in the chat template (transformers 5 returns a BatchEncoding)."""
    out = hf.apply_chat_template(list(messages), tokenize=True,
                                 add_generation_prompt=add_generation_prompt)
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return [int(i) for i in out]


def _encode_with_chat_template(messages, hf) -> tuple[list[int], list[bool]]:
    """Assistant turns found by rendering growing prefixes of the conversation: the tokens a turn
    adds after the generation prompt of the turns before it are that turn's."""
    ids, trained = [], []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            before = _render(hf, messages[:i], add_generation_prompt=True) if i else []
            head = before[len(ids):] if before[:len(ids)] == ids else []
            ids, trained = ids + head, trained + [False] * len(head)
        upto = _render(hf, messages[:i + 1], add_generation_prompt=False)
        if upto[:len(ids)] != ids:
            raise ConfigError("the tokenizer's chat template does not render a conversation as "
                              "a prefix of its continuation; SFT cannot find the assistant turns")
        new = upto[len(ids):]
        ids, trained = upto, trained + [m["role"] == "assistant"] * len(new)
    return ids, trained


# ---- tokenized conversations, cached -------------------------------------------------------

@dataclass
class Conversations:
    """Every conversation of a file as one token array with per-token trained flags."""
    tokens: np.ndarray  # int64, all conversations concatenated
    trained: np.ndarray  # bool
    offsets: np.ndarray  # int64 [n + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.trained[a:b]


def _tokenizer_key(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(f"{type(tokenizer).__name__}:{tokenizer.vocab_size}:{TEMPLATE_VERSION}".encode())
    model = getattr(tokenizer, "model_file", None)
    paths = [model] if model and os.path.isfile(model) else (
        [os.path.join(model, n) for n in sorted(os.listdir(model))] if model and os.path.isdir(model)
        else [])
    for path in paths:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def tokenize_file(path: str, tokenizer, cache_dir: Optional[str] = None) -> Conversations:
    """The file's conversations tokenized, from the cache when it is there."""
    st = os.stat(path) if os.path.isfile(path) else None
    if st is None:
        raise ConfigError(f"--data-path: {path} does not exist")
    key = hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}:"
                         f"{_tokenizer_key(tokenizer)}".encode()).hexdigest()[:20]
    cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(path)), "sft_cache")
    cache = os.path.join(cache_dir, f"{os.path.basename(path)}.{key}.npz")
    if os.path.isfile(cache):
        with np.load(cache, allow_pickle=False) as z:
            return Conversations(z["tokens"], z["trained"], z["offsets"])
    tokens, trained, offsets = [], [], [0]
    for messages in read_conversations(path):
        ids, flags = encode_conversation(messages, tokenizer)
        tokens += ids
        trained += flags
        offsets.append(len(tokens))
    conv = Conversations(np.asarray(tokens, dtype=np.int64), np.asarray(trained, dtype=bool),
                         np.asarray(offsets, dtype=np.int64))
    if len(conv.tokens) and int(conv.tokens.max()) >= tokenizer.vocab_size:
        raise ConfigError(f"{path}: token id {int(conv.tokens.max())} outside the vocabulary")
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{cache}.{uuid.uuid4().hex}.tmp.npz"
    np.savez(tmp, tokens=conv.tokens, trained=conv.trained, offsets=conv.offsets)
    os.replace(tmp, cache)
    return conv


# ---- packing --------------------------------------------------------------------------------

def pack(lengths: Sequence[int], seq_length: int) -> list[list[int]]:
    """First-fit packing of items (in the given order) into bins of ``seq_length`` slots;
    returns each bin's item indices. Items must be 1..seq_length long."""
    bins, room = [], []
    open_bins: list[int] = []
    for item, n in enumerate(lengths):
        target = next((b for b in open_bins if room[b] >= n), None)
        if target is None:
            bins.append([])
            room.append(seq_length)
            open_bins.append(len(bins) - 1)
            if len(open_bins) > OPEN_BINS:
                open_bins.pop(0)
            target = len(bins) - 1
        bins[target].append(item)
        room[target] -= n
        if room[target] == 0:
            open_bins.remove(target)
    return bins


class SFTDataset(torch.utils.data.Dataset):
    """Packed samples of the conversations ``indices`` of ``conversations``, at least
    ``num_samples`` of them (more epochs, each in its own seeded order, as needed)."""

    def __init__(self, conversations: Conversations, indices: Sequence[int], seq_length: int,
                 num_samples: int, seed: int, pad_id: int = 0, name: str = "sft"):
        self.conversations = conversations
        self.seq_length = seq_length
        self.pad_id = pad_id
        self.name = name
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) == 0:
            raise ConfigError(f"{name}: no conversations in this split")
        # A conversation of n tokens gives n - 1 (token, label) pairs; one token gives none.
        raw = conversations.offsets[indices + 1] - conversations.offsets[indices]
        keep = raw >= 2
        indices, raw = indices[keep], raw[keep]
        if len(indices) == 0:
            raise ConfigError(f"{name}: every conversation is shorter than two tokens")
        lengths = np.minimum(raw - 1, seq_length)
        self.truncated = int((raw - 1 > seq_length).sum())
        self.samples: list[list[int]] = []  # conversation ids per packed sample
        epoch = 0
        while len(self.samples) < max(num_samples, 1):
            order = np.random.RandomState(seed + epoch).permutation(len(indices))
            for members in pack(lengths[order].tolist(), seq_length):
                self.samples.append(indices[order[members]].tolist())
            epoch += 1
        real = sum(min(int(conversations.offsets[c + 1] - conversations.offsets[c]) - 1, seq_length)
                   for s in self.samples for c in s)
        self.packing_efficiency = real / (len(self.samples) * seq_length)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range ({len(self)} samples)")
        s = self.seq_length
        tokens = np.full(s, self.pad_id, dtype=np.int64)
        labels = np.zeros(s, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        positions = np.zeros(s, dtype=np.int64)
        segments = np.zeros(s, dtype=np.int64)
        at = 0
        for segment, c in enumerate(self.samples[i]):
            ids, trained = self.conversations.get(c)
            n = min(len(ids) - 1, s)
            tokens[at:at + n] = ids[:n]
            labels[at:at + n] = ids[1:n + 1]
            loss_mask[at:at + n] = trained[1:n + 1]
            positions[at:at + n] = np.arange(n)
            segments[at:at + n] = segment
            at += n
        if at < s:  # padding: its own segment, no loss
            positions[at:] = np.arange(s - at)
            segments[at:] = len(self.samples[i])
        return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                "loss_mask": torch.from_numpy(loss_mask), "position_ids": torch.from_numpy(positions),
                "segment_ids": torch.from_numpy(segments)}


def _tokenize_on_rank_zero_first(paths: Sequence[str], tokenizer, cache_dir: Optional[str]):
    """Collective when torch.distributed is initialised: rank 0 fills the cache, then the others
    read it instead of tokenizing the same files again."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    if dist.get_rank() == 0:
        for path in paths:
            tokenize_file(path, tokenizer, cache_dir)
    dist.barrier()


def build_sft_datasets(data_path: Sequence[str], split: str, seq_length: int, seed: int,
                       num_samples: Sequence[int], tokenizer, cache_dir: Optional[str] = None,
                       log=print) -> list[Optional[torch.utils.data.Dataset]]:
    """[train, valid, test] packed SFT datasets of .jsonl files (blended by weight as
    ``--data-path`` blends corpora); None where a split is empty or not wanted. Collective when
    torch.distributed is initialised (every rank calls it)."""
    from slimtron.data.blended_dataset import BlendedDataset, parse_data_path
    from slimtron.data.gpt_dataset import SPLIT_NAMES, split_document_ranges

    paths, weights = parse_data_path(data_path)
    if tokenizer is None:
        raise ConfigError("--sft needs a tokenizer (--tokenizer-type, --tokenizer-model)")
    _tokenize_on_rank_zero_first(paths, tokenizer, cache_dir)
    per_file = []
    for path in paths:
        conv = tokenize_file(path, tokenizer, cache_dir)
        ranges = split_document_ranges(split, len(conv))
        datasets = []
        for name, rng, n in zip(SPLIT_NAMES, ranges, num_samples):
            if rng is None or n == 0 or rng[0] == rng[1]:
                datasets.append(None)
                continue
            ds = SFTDataset(conv, range(*rng), seq_length, n, seed, pad_id=_pad_id(tokenizer),
                            name=f"{path} ({name})")
            log(f" sft: {path} {name}: {rng[1] - rng[0]} conversations -> {len(ds)} packed "
                f"samples of {seq_length}, packing efficiency {ds.packing_efficiency:.3f} (real "
                f"tokens / slots){f', {ds.truncated} truncated' if ds.truncated else ''}")
            datasets.append(ds)
        per_file.append(datasets)
    if len(per_file) == 1:
        return per_file[0]
    if weights is None:
        weights = [float(len(tokenize_file(p, tokenizer, cache_dir).tokens)) for p in paths]
    out = []
    for s, n in enumerate(num_samples):
        parts = [d[s] for d in per_file]
        if n == 0 or all(p is None for p in parts):
            out.append(None)
        elif any(p is None for p in parts):
            raise ConfigError(f"--data-path: the {SPLIT_NAMES[s]} split ({split!r}) of "
                              f"{paths[parts.index(None)]} is empty, so it cannot be blended")
        else:
            out.append(BlendedDataset(parts, weights, n))
    return out


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad, tokenizer.eos, 0):
        if candidate is not None:
            return int(candidate)
    return 0
