"""Checkpoints that resume exactly, load under any parallel layout, and save in parallel.

``save_checkpoint`` writes format 2 (``--ckpt-format torch_dist``, ``dist_format.py``): every rank
writes only its share, and a load reads only the bytes that overlap what the rank needs, in any
(tp, pp, dp, cp) layout, with or without the distributed optimizer. ``--ckpt-format torch`` writes
format 1 (``v1.py``, one file per (tp, pp)), and checkpoints of either format load.

Layout of ``DIR``::

    latest_checkpointed_iteration.txt    the newest complete iteration (written last, atomically)
    iter_0000010/                        one iteration (files: dist_format.py or v1.py)

A save goes to ``iter_0000010.tmp``, renamed when every rank has written and synced its files;
only then does the tracker move, so a run killed mid-save leaves the previous checkpoint newest.
With ``AsyncSaver`` (``--async-save``) the save returns once this rank's share is copied to host
memory; the write, the rename and the tracker follow in a background thread, a second save first
waits for the previous one, and ``AsyncSaver.wait`` (also run at exit) completes the last.
"""
from __future__ import annotations

import atexit
import copy
import os
import shutil
import threading
from typing import Optional

import torch
import torch.distributed as dist

from slimtron.checkpointing import dist_format, v1
from slimtron.checkpointing.common import (COMMON_FILE, OPTIM_KEYS, TRACKER, barrier,
                                           check_same_model, fsync_dir, has_rng_states,
                                           iteration_dir, latest_iteration, layout_of,
                                           load_common, load_file,
                                           optimizer_reload_main_params, rng_file, rng_state,
                                           set_rng_state, write_atomic, write_tracker)
from slimtron.config import ConfigError

FORMAT_VERSION = dist_format.FORMAT_VERSION
CKPT_FORMATS = {"torch_dist": dist_format.FORMAT_VERSION, "torch": v1.FORMAT_VERSION}
model_file = v1.model_file  # format 1's file names, for tools that read them

__all__ = ["save_checkpoint", "load_checkpoint", "latest_iteration", "load_common",
           "open_checkpoint", "AsyncSaver", "iteration_dir", "rng_state", "set_rng_state",
           "TRACKER", "FORMAT_VERSION", "CKPT_FORMATS", "OPTIM_KEYS", "model_file"]


def _common_dict(iteration, consumed_samples, config, optimizer, pstate, extra) -> dict:
    return {"format_version": FORMAT_VERSION, "iteration": iteration,
            "consumed_samples": consumed_samples, "config": config.to_dict(),
            "layout": layout_of(pstate),
            "optimizer": copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None,
            "extra": extra or {}}


class _Job:
    """One format-2 save of one rank, after planning: what to write and how to commit it."""

    def __init__(self, root, iteration, rank, chunks, rng, common, meta):
        self.root, self.iteration, self.rank = root, iteration, rank
        self.final = iteration_dir(root, iteration)
        self.tmp = self.final + ".tmp"
        self.chunks, self.rng, self.common, self.meta = chunks, rng, common, meta

    def write_and_commit(self, group=None):
        dist_format.write_chunks(os.path.join(self.tmp, dist_format.shard_file(self.rank)),
                                 self.chunks)
        write_atomic(self.rng, os.path.join(self.tmp, rng_file(self.rank)))
        if self.rank == 0:
            write_atomic(self.common, os.path.join(self.tmp, COMMON_FILE))
            dist_format.write_metadata(os.path.join(self.tmp, dist_format.METADATA_FILE),
                                       self.meta)
        barrier(group)  # every rank's files are written and synced
        if self.rank == 0:
            fsync_dir(self.tmp)
            shutil.rmtree(self.final, ignore_errors=True)
            os.replace(self.tmp, self.final)
            fsync_dir(self.root)
            write_tracker(self.root, self.iteration)
        barrier(group)  # ... and committed
        self.chunks = None


def _plan_job(root, iteration, model_chunks, optimizer, pstate, config, consumed_samples,
              extra, rng_tracker) -> _Job:
    """Collective: make the temporary directory, plan every rank's chunks, gather the metadata."""
    final = iteration_dir(root, iteration)
    if pstate.rank == 0:
        shutil.rmtree(final + ".tmp", ignore_errors=True)
        os.makedirs(final + ".tmp")
    barrier()
    entries, chunks = dist_format.plan(model_chunks, optimizer, pstate, config.model.vocab_size)
    records = dist_format.chunk_records(chunks)
    gathered = [None] * pstate.world_size if pstate.rank == 0 else None
    if dist.is_initialized() and pstate.world_size > 1:
        dist.gather_object((entries, records), gathered, dst=0)
    else:
        gathered = [(entries, records)]
    common = meta = None
    if pstate.rank == 0:
        common = _common_dict(iteration, consumed_samples, config, optimizer, pstate, extra)
        meta = dist_format.metadata([e for e, _ in gathered], [r for _, r in gathered],
                                    common["layout"])
    return _Job(root, iteration, pstate.rank, chunks, rng_state(pstate.device, rng_tracker),
                common, meta)


def save_checkpoint(root: str, iteration: int, model_chunks, optimizer, pstate, config,
                    consumed_samples: int, extra: Optional[dict] = None, rng_tracker=None,
                    ckpt_format: str = "torch_dist") -> str:
    """Collective: every rank calls it; returns the directory written (synchronously)."""
    if ckpt_format not in CKPT_FORMATS:
        raise ConfigError(f"--ckpt-format {ckpt_format!r}: expected one of "
                          f"{', '.join(CKPT_FORMATS)}")
    if ckpt_format == "torch":
        common = _common_dict(iteration, consumed_samples, config, optimizer, pstate, extra)
        return v1.save(root, iteration, model_chunks, optimizer, pstate, common, rng_tracker)
    job = _plan_job(root, iteration, model_chunks, optimizer, pstate, config, consumed_samples,
                    extra, rng_tracker)
    job.write_and_commit()
    return job.final


class AsyncSaver:
    """``--async-save``: format-2 saves whose write and commit run in a background thread.

    The thread's barriers use a process group of their own (gloo), so that they never interleave
    with the training's collectives. The staged copy (this rank's share: its optimizer range and
    its part of the weights) lives in one host buffer kept from save to save. Every rank holds
    one saver and calls ``save`` together."""

    def __init__(self):
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._group = None
        self._group_made = False
        self._staging: Optional[torch.Tensor] = None
        atexit.register(self.wait)

    def save(self, root: str, iteration: int, model_chunks, optimizer, pstate, config,
             consumed_samples: int, extra: Optional[dict] = None, rng_tracker=None) -> str:
        """Collective: stage this rank's share in host memory and start writing it; returns the
        directory the save will be renamed to once complete."""
        self.wait()
        if not self._group_made:
            if dist.is_initialized() and pstate.world_size > 1:
                self._group = dist.new_group(backend="gloo")
            self._group_made = True
        job = _plan_job(root, iteration, model_chunks, optimizer, pstate, config,
                        consumed_samples, extra, rng_tracker)
        job.chunks = dist_format.stage(job.chunks, self._staging_buffer(job.chunks, pstate))
        self._thread = threading.Thread(target=self._run, args=(job,), daemon=True,
                                        name=f"checkpoint-save-{iteration}")
        self._thread.start()
        return job.final

    def _staging_buffer(self, chunks: list, pstate):
        """This rank's share in host memory, kept for the next save (pinned for a GPU)."""
        size = dist_format.staging_size(chunks)
        if self._staging is None or self._staging.numel() != size:
            self._staging = None
            self._staging = torch.empty(size, dtype=torch.uint8, device="cpu",
                                        pin_memory=pstate.device.type == "cuda")
        return self._staging

    def _run(self, job: _Job):
        try:
            job.write_and_commit(self._group)
        except BaseException as e:  # noqa: BLE001 - reported by wait()
            self._error = e

    @property
    def in_progress(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self):
        """Block until the pending save (if any) is committed; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


# -------------------------------------------------------------------------------------- load
def _format_of(common: dict, ckpt_dir: str) -> int:
    version = common.get("format_version")
    if version not in CKPT_FORMATS.values():
        raise ValueError(f"{ckpt_dir}: unknown checkpoint format version {version!r}")
    return version


def open_checkpoint(ckpt_dir: str, common: dict):
    """Whole tensors of a checkpoint of either format, for single-process tools:
    ``.full(name, key=None)`` (``key``: an optimizer tensor) and ``.names()``."""
    if _format_of(common, ckpt_dir) == v1.FORMAT_VERSION:
        return v1.SavedShards(ckpt_dir, common["layout"])
    return _FullTensors(dist_format.Reader(ckpt_dir))


class _FullTensors:
    def __init__(self, reader):
        self.reader = reader
        self.ckpt_dir = reader.ckpt_dir

    def names(self) -> list:
        return sorted({k[len("model/"):].split("#")[0] for k in self.reader.entries
                       if k.startswith("model/")})

    def full(self, name: str, key: Optional[str] = None):
        return dist_format.full_tensor(self.reader, name, key)


def load_checkpoint(root: str, model_chunks, optimizer, pstate, config,
                    load_optim: bool = True, load_rng: bool = True, finetune: bool = False,
                    rng_tracker=None) -> dict:
    """Load the newest complete checkpoint into this layout. Returns {"iteration",
    "consumed_samples", "extra", "rng_restored"}; with finetune, which loads weights only,
    {"iteration": 0, "consumed_samples": 0, "extra": {}}. RNG states are restored only into the
    layout (world, tp, pp) that saved them."""
    ckpt_dir, common = load_common(root)
    version = _format_of(common, ckpt_dir)
    check_same_model(common, config.model, ckpt_dir)
    vocab = config.model.vocab_size
    if version == v1.FORMAT_VERSION:
        source = v1.load_weights(ckpt_dir, common, model_chunks, pstate)
    else:
        source = dist_format.Reader(ckpt_dir)
        dist_format.load_weights(source, model_chunks, pstate, vocab)
    try:
        if finetune:
            optimizer_reload_main_params(optimizer)
            return {"iteration": 0, "consumed_samples": 0, "extra": {}}
        if load_optim and optimizer is not None:
            if version == v1.FORMAT_VERSION:
                v1.load_optimizer(source, optimizer, model_chunks, pstate)
            else:
                dist_format.load_optimizer(source, optimizer, model_chunks, pstate, vocab)
            optimizer.load_state_dict(common["optimizer"])  # counters, LR schedule, loss scale
        else:
            optimizer_reload_main_params(optimizer)
    finally:
        if version != v1.FORMAT_VERSION:
            source.close()
    layout = common["layout"]
    same_layout = (layout["world"] == pstate.world_size and layout["tp"] == pstate.tp.size
                   and layout["pp"] == pstate.pp.size)
    restored = load_rng and same_layout and has_rng_states(common) and set_rng_state(
        load_file(os.path.join(ckpt_dir, rng_file(pstate.rank))), pstate.device, rng_tracker)
    return {"iteration": common["iteration"], "consumed_samples": common["consumed_samples"],
            "extra": common.get("extra", {}), "rng_restored": restored}
