"""Run a function on N forked ranks joined by a real gloo process group.

Forked workers start in well under a second (torchrun would re-import torch in every rank), so
tests spawn few groups and check several things in each. Results come back in rank order; an
exception on any rank fails the caller with that rank's traceback.
"""
from __future__ import annotations

import os
import pickle
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # Plain pickle copies tensors by value: torch's shared-memory hand-off would break if
        # this process exits before the parent has read them.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank.

    ``fn`` must be a module-level function; its return value must be picklable (tensors are fine).
    """
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    import time
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        if time.monotonic() > deadline:
            break
        if queue.empty():
            if any(p.exitcode not in (None, 0) for p in procs) and queue.empty():
                time.sleep(0.5)
                if queue.empty():
                    break
            time.sleep(0.01)
            continue
        rank, status, payload = queue.get()
        if status == "ok":
            results[rank] = pickle.loads(payload)
        else:
            errors.append(f"--- rank {rank} ---\n{payload}")
        if errors:  # one failure usually hangs the rest in a collective
            break
    for p in procs:
        p.join(timeout=1 if errors or len(results) < world_size else 30)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("distributed test failed:\n" + "\n".join(errors))
    if len(results) < world_size:
        missing = sorted(set(range(world_size)) - set(results))
        codes = [p.exitcode for p in procs]
        raise AssertionError(f"ranks {missing} did not report (exit codes {codes}, timeout {timeout}s)")
    return [results[r] for r in range(world_size)]
