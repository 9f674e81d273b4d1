"""Run pretrain_gpt.py under torchrun from a test: command lines, a live job, its workers, its log.

A ``Job`` reads the job's combined output as it comes, so a test can wait for a log line and then
act on the running job (signal one worker), and always stops what it started (``stop``).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "pretrain_gpt.py")

# Tiny Llama on synthetic tokens, deterministic (no dropout), one log line per iteration.
TINY_ARGS = ["--preset", "tiny-llama", "--mock-data", "--micro-batch-size", "2",
             "--lr", "1e-3", "--log-interval", "1", "--hidden-dropout", "0",
             "--attention-dropout", "0"]

ITERATION_LINE = re.compile(r"\] iteration +(\d+)/ *\d+ \|.*\| lm loss: (\S+) \|")
LOADED_LINE = re.compile(r"loaded checkpoint from (\S+) at iteration (\d+)")


def torchrun_single_node(nproc: int, args: list[str]) -> list[str]:
    """torchrun on this host; ``--standalone`` picks a free rendezvous port itself."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(nproc), SCRIPT, *args]


def torchrun_node(nnodes: int, node_rank: int, nproc: int, master_addr: str, master_port: int,
                  args: list[str]) -> list[str]:
    """One node of a multi-node job with static rendezvous at ``master_addr:master_port``."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
            "--node-rank", str(node_rank), "--nproc-per-node", str(nproc),
            "--master-addr", master_addr, "--master-port", str(master_port), SCRIPT, *args]


def losses_by_iteration(output: str) -> dict[int, str]:
    """Iteration -> the lm loss exactly as printed."""
    return {int(m.group(1)): m.group(2) for m in ITERATION_LINE.finditer(output)}


def child_pids(parent: int) -> list[int]:
    """Live processes whose parent is ``parent`` (from /proc; needs no psutil)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name (field 2) may hold spaces; the fields after its ')' are fixed.
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == parent and state not in ("Z", "X"):
            out.append(int(entry))
    return out


def process_rank(pid: int) -> Optional[int]:
    """The RANK in a torchrun worker's environment (None if it has none or is gone)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


class Job:
    """A torchrun job started in its own session, its output collected line by line."""

    def __init__(self, cmd: list[str], env: Optional[dict] = None):
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, cwd=REPO, env=env, start_new_session=True)
        self._workers: dict[int, int] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first output line matching ``pattern``; fails if the job ends or time runs out."""
        regex, seen, deadline = re.compile(pattern), 0, time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line matching {pattern!r} in {timeout}s; "
                                         f"output:\n{''.join(self.lines)[-3000:]}")
                self._changed.wait(min(left, 1.0))

    def workers(self) -> dict[int, int]:
        """Rank -> pid of this job's torchrun workers (running now or seen before)."""
        for pid in child_pids(self.proc.pid):
            rank = process_rank(pid)
            if rank is not None:
                self._workers[rank] = pid
        return dict(self._workers)

    def wait(self, timeout: float) -> int:
        """torchrun's exit code; fails (after stopping the job) if it runs past ``timeout``."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"job still running after {timeout}s; output:\n"
                                 f"{self.output[-3000:]}") from None
        self._reader.join(timeout=10)
        return code

    def stop(self):
        """Kill torchrun and every worker it started (each worker has a session of its own)."""
        # A worker pid is signalled only while it still holds its rank (pids get reused).
        pids = [pid for rank, pid in self.workers().items() if process_rank(pid) == rank]
        if self.proc.poll() is None:
            pids.append(self.proc.pid)
        for pid in pids:
            if is_running(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc):
        self.stop()


def run_job(cmd: list[str], timeout: float, env: Optional[dict] = None) -> tuple[int, str]:
    """Run a job to its end: (exit code, combined output)."""
    with Job(cmd, env) as job:
        code = job.wait(timeout)
        return code, job.output
