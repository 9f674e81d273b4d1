"""Two hosts on one machine: network namespaces joined by a veth pair, one torchrun in each.

Each namespace sees only its own end of the veth (and its loopback), so the ranks of the two
"nodes" can reach each other over that link alone, as two machines on a network would. The 4-rank
job (tp=2 x pp=2, each node holding one pipeline stage) must print the very losses of the same
layout run by one torchrun on this host.
"""
import os
import shutil
import subprocess
import uuid

import pytest

from tests.launch_utils import Job, TINY_ARGS, losses_by_iteration, run_job, torchrun_node, \
    torchrun_single_node

SUBNET_HOSTS = ("10.77.0.1", "10.77.0.2")  # only ever assigned inside the namespaces made here
MASTER_PORT = 29500  # free for sure: the namespaces are new
ITERS = 3
ARGS = [*TINY_ARGS, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
        "--sequence-parallel", "--global-batch-size", "4", "--train-iters", str(ITERS)]
JOB_TIMEOUT_S = 180


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


class TwoHosts:
    """Two namespaces, ``<name>a`` and ``<name>b``, with a veth end and an address in each."""

    def __init__(self):
        token = uuid.uuid4().hex[:6]
        self.namespaces = [f"slt{token}a", f"slt{token}b"]
        self.links = [f"slt{token}va", f"slt{token}vb"]  # interface names: at most 15 characters
        self.made: list[str] = []

    def create(self):
        first = ip("netns", "add", self.namespaces[0])
        if first.returncode != 0:
            pytest.skip(f"cannot create a network namespace: {first.stderr.strip()}")
        self.made.append(self.namespaces[0])
        self._must("netns", "add", self.namespaces[1])
        self.made.append(self.namespaces[1])
        self._must("link", "add", self.links[0], "type", "veth", "peer", "name", self.links[1])
        for ns, link, addr in zip(self.namespaces, self.links, SUBNET_HOSTS):
            self._must("link", "set", link, "netns", ns)
            self._must("-n", ns, "addr", "add", f"{addr}/24", "dev", link)
            self._must("-n", ns, "link", "set", link, "up")
            self._must("-n", ns, "link", "set", "lo", "up")

    def _must(self, *args: str):
        out = ip(*args)
        if out.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)} failed: {out.stderr.strip()}")

    def destroy(self):
        """Deleting a namespace deletes the veth end in it; a veth never moved is deleted here."""
        for ns in self.made:
            ip("netns", "delete", ns)
        if ip("link", "show", self.links[0]).returncode == 0:
            ip("link", "delete", self.links[0])

    def command(self, node: int, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[node], *cmd]


def require_namespaces():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2)")


def run_two_nodes(hosts: TwoHosts) -> list[str]:
    """Both torchruns at once; each node's output (node 1 holds the last rank, which logs)."""
    jobs = []
    try:
        for node in range(2):
            env = dict(os.environ, GLOO_SOCKET_IFNAME=hosts.links[node])
            cmd = torchrun_node(2, node, 2, SUBNET_HOSTS[0], MASTER_PORT, ARGS)
            jobs.append(Job(hosts.command(node, cmd), env))
        codes = [job.wait(JOB_TIMEOUT_S) for job in jobs]
        outputs = [job.output for job in jobs]
        assert codes == [0, 0], f"exit codes {codes}:\n" + "\n".join(o[-3000:] for o in outputs)
        return outputs
    finally:
        for job in jobs:
            job.stop()


def test_two_nodes_over_veth_match_one_host():
    require_namespaces()
    hosts = TwoHosts()
    try:
        hosts.create()  # first: skips before any job runs where namespaces cannot be made
        code, single = run_job(torchrun_single_node(4, ARGS), JOB_TIMEOUT_S)
        assert code == 0, single[-3000:]
        outputs = run_two_nodes(hosts)
    finally:
        hosts.destroy()
    expected = losses_by_iteration(single)
    assert sorted(expected) == list(range(1, ITERS + 1)), single[-3000:]
    assert "world 4 = tp 2 x pp 2 x dp 1" in outputs[1], outputs[1][-3000:]
    assert losses_by_iteration(outputs[1]) == expected
    assert hosts.namespaces[0][:-1] not in ip("netns", "list").stdout  # both namespaces gone
