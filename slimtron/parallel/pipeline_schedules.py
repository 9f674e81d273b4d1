"""Pipeline schedules as data: per-stage lists of actions, and a simulator that runs them.

A schedule is the list of actions one pipeline stage performs, in order: ``FORWARD`` / ``BACKWARD``
of a (micro-batch, model chunk), and the point-to-point transfers around them. A run of consecutive
transfer actions is one *batch*: the executor posts all of them together and waits for all, so two
neighbours that send to each other at the same moment never deadlock.

A compute order is a list of *rounds* (one compute, or in the interleaved steady state a forward
and a backward). Transfers are placed by one rule: before the first round, receive its inputs; after
every round, send its outputs and receive the next round's inputs, all in one batch. (Interleaving
needs the two-compute rounds: sending a forward's output before the backward that follows it would
wait on a neighbour that is itself waiting to send, and the pipeline deadlocks.)

Direction and routing: activations travel forward (stage s -> s+1), their grads backward. With
interleaving (``num_chunks`` = v > 1) stage s holds chunks 0..v-1; the last stage's chunk c output
goes to the first stage's chunk c+1 (and its grad comes back the same way).

``simulate`` runs every stage's list against the others with rendezvous semantics (a send completes
only when the matching receive is posted; messages match in order per sender, receiver and
direction) and returns the timeline, so deadlock freedom and the bubble are checked without
processes.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from slimtron.config import ConfigError


class Kind(enum.Enum):
    FORWARD = "F"
    BACKWARD = "B"
    SEND_FWD = "send_fwd"
    RECV_FWD = "recv_fwd"
    SEND_BWD = "send_bwd"
    RECV_BWD = "recv_bwd"

    @property
    def is_compute(self) -> bool:
        return self in (Kind.FORWARD, Kind.BACKWARD)


@dataclass(frozen=True)
class Action:
    kind: Kind
    microbatch: int
    chunk: int = 0

    def __str__(self) -> str:
        return f"{self.kind.value}({self.microbatch},c{self.chunk})"


# ---------------------------------------------------------------------------------------------
# Building schedules

def build_schedule(pp_size: int, stage: int, num_microbatches: int, num_chunks: int = 1,
                   forward_only: bool = False) -> list[Action]:
    """The actions of pipeline stage ``stage``: 1F1B (``num_chunks`` = 1) or interleaved 1F1B."""
    _validate(pp_size, stage, num_microbatches, num_chunks)
    if num_chunks == 1:
        rounds = one_f_one_b_rounds(pp_size, stage, num_microbatches, forward_only)
    else:
        rounds = interleaved_rounds(pp_size, stage, num_microbatches, num_chunks, forward_only)
    return with_transfers(rounds, pp_size, stage, num_chunks)


def _validate(pp_size: int, stage: int, num_microbatches: int, num_chunks: int) -> None:
    if pp_size < 1 or not 0 <= stage < pp_size:
        raise ConfigError(f"pipeline stage {stage} is outside 0..{pp_size - 1} "
                          f"(pipeline-model-parallel size {pp_size})")
    if num_microbatches < 1:
        raise ConfigError(f"number of micro-batches must be at least 1, got {num_microbatches}")
    if num_chunks < 1:
        raise ConfigError(f"number of model chunks per stage must be at least 1, got {num_chunks}")
    if num_chunks > 1 and pp_size == 1:
        raise ConfigError(f"interleaved schedule ({num_chunks} model chunks per stage) needs "
                          "pipeline-model-parallel size > 1")
    if num_chunks > 1 and num_microbatches % pp_size:
        raise ConfigError(f"interleaved schedule needs the number of micro-batches "
                          f"({num_microbatches}) to be a multiple of the pipeline-model-parallel "
                          f"size ({pp_size})")


def one_f_one_b_rounds(pp_size: int, stage: int, num_microbatches: int,
                       forward_only: bool = False) -> list[list[Action]]:
    """Compute order of non-interleaved 1F1B: warm-up forwards, steady one-forward-one-backward,
    cool-down backwards. Stage s keeps at most p - s micro-batches in flight."""
    m = num_microbatches
    forwards = [Action(Kind.FORWARD, i) for i in range(m)]
    if forward_only:
        return [[f] for f in forwards]
    backwards = [Action(Kind.BACKWARD, i) for i in range(m)]
    return _warmup_steady_cooldown(forwards, backwards, min(pp_size - stage - 1, m),
                                   pair_steady=False)


def interleaved_rounds(pp_size: int, stage: int, num_microbatches: int, num_chunks: int,
                       forward_only: bool = False) -> list[list[Action]]:
    """Compute order of Megatron's interleaved 1F1B over ``num_chunks`` model chunks per stage.

    Forwards walk the chunks in groups of p micro-batches (chunk 0 for micro-batches 0..p-1, then
    chunk 1 for the same ones, ...); backwards walk the chunks in reverse. The longer warm-up lets
    the first stage fill the pipeline of every chunk before its first backward arrives.
    """
    p, m, v = pp_size, num_microbatches, num_chunks
    total = m * v
    forwards = [Action(Kind.FORWARD, *_virtual_to_microbatch_chunk(k, p, v, forward=True))
                for k in range(total)]
    if forward_only:
        return [[f] for f in forwards]
    backwards = [Action(Kind.BACKWARD, *_virtual_to_microbatch_chunk(k, p, v, forward=False))
                 for k in range(total)]
    warmup = min((p - stage - 1) * 2 + (v - 1) * p, total)
    return _warmup_steady_cooldown(forwards, backwards, warmup, pair_steady=True)


def _virtual_to_microbatch_chunk(k: int, p: int, v: int, forward: bool) -> tuple[int, int]:
    """The (micro-batch, chunk) of the k-th forward (or backward) of a stage when interleaving."""
    group, within = divmod(k, p * v)
    chunk = within // p
    microbatch = group * p + within % p
    return microbatch, chunk if forward else v - 1 - chunk


def _warmup_steady_cooldown(forwards: list[Action], backwards: list[Action], warmup: int,
                            pair_steady: bool) -> list[list[Action]]:
    rounds = [[f] for f in forwards[:warmup]]
    for fwd, bwd in zip(forwards[warmup:], backwards):
        rounds += [[fwd, bwd]] if pair_steady else [[fwd], [bwd]]
    rounds += [[b] for b in backwards[len(forwards) - warmup:]]
    return rounds


def with_transfers(rounds: list[list[Action]], pp_size: int, stage: int,
                   num_chunks: int) -> list[Action]:
    """Insert transfers between rounds: the batch before a round receives its inputs, the batch
    after it sends its outputs (and receives the next round's inputs)."""
    actions: list[Action] = []
    for i, computes in enumerate(rounds):
        if i == 0:
            actions += _receives(computes, pp_size, stage, num_chunks)
        actions += computes
        actions += [send for c in computes for send in _send_after(c, pp_size, stage, num_chunks)]
        if i + 1 < len(rounds):
            actions += _receives(rounds[i + 1], pp_size, stage, num_chunks)
    return actions


def _receives(computes: list[Action], p: int, stage: int, v: int) -> list[Action]:
    return [recv for c in computes for recv in _receive_for(c, p, stage, v)]


def _receive_for(compute: Action, p: int, stage: int, v: int) -> list[Action]:
    if compute.kind is Kind.FORWARD and not (stage == 0 and compute.chunk == 0):
        return [Action(Kind.RECV_FWD, compute.microbatch, compute.chunk)]
    if compute.kind is Kind.BACKWARD and not (stage == p - 1 and compute.chunk == v - 1):
        return [Action(Kind.RECV_BWD, compute.microbatch, compute.chunk)]
    return []


def _send_after(compute: Action, p: int, stage: int, v: int) -> list[Action]:
    if compute.kind is Kind.FORWARD and not (stage == p - 1 and compute.chunk == v - 1):
        return [Action(Kind.SEND_FWD, compute.microbatch, compute.chunk)]
    if compute.kind is Kind.BACKWARD and not (stage == 0 and compute.chunk == 0):
        return [Action(Kind.SEND_BWD, compute.microbatch, compute.chunk)]
    return []


def steps(actions: list[Action]) -> list[list[Action]]:
    """Group a schedule into steps: each compute alone, each run of transfers as one batch."""
    grouped: list[list[Action]] = []
    for action in actions:
        if action.kind.is_compute or not grouped or grouped[-1][0].kind.is_compute:
            grouped.append([action])
        else:
            grouped[-1].append(action)
    return grouped


# ---------------------------------------------------------------------------------------------
# Routing of transfers between stages

def transfer_peer(action: Action, pp_size: int, stage: int) -> tuple[int, int, str]:
    """(sender stage, receiver stage, direction) of a transfer action."""
    nxt, prev = (stage + 1) % pp_size, (stage - 1) % pp_size
    return {
        Kind.SEND_FWD: (stage, nxt, "fwd"),
        Kind.RECV_FWD: (prev, stage, "fwd"),
        Kind.SEND_BWD: (stage, prev, "bwd"),
        Kind.RECV_BWD: (nxt, stage, "bwd"),
    }[action.kind]


def delivered_as(send: Action, pp_size: int, stage: int) -> Action:
    """The receive action the peer must post for ``send`` (the chunk index changes across the
    wrap-around from the last stage to the first when interleaving)."""
    if send.kind is Kind.SEND_FWD:
        chunk = send.chunk + 1 if stage == pp_size - 1 else send.chunk
        return Action(Kind.RECV_FWD, send.microbatch, chunk)
    chunk = send.chunk - 1 if stage == 0 else send.chunk
    return Action(Kind.RECV_BWD, send.microbatch, chunk)


# ---------------------------------------------------------------------------------------------
# Simulation

class ScheduleError(RuntimeError):
    """The stages' schedules deadlock or disagree about what they exchange."""


@dataclass
class Timeline:
    """Start and end time of every compute action of every stage, and the makespan."""
    intervals: list[list[tuple[float, float, Action]]]
    makespan: float

    def busy(self, stage: int) -> float:
        return sum(end - start for start, end, _ in self.intervals[stage])

    def bubble_fraction(self) -> float:
        """Idle share of the stages' time, averaged over stages."""
        stages = len(self.intervals)
        return sum(1 - self.busy(s) / self.makespan for s in range(stages)) / stages


def simulate(schedules: list[list[Action]], num_chunks: int = 1, forward_cost: float = 1.0,
             backward_cost: float = 1.0, transfer_cost: float = 0.0,
             tagged: bool = True) -> Timeline:
    """Run every stage's schedule with blocking batched transfers.

    A batch completes once every one of its transfers has its counterpart posted by the peer (the
    k-th send on a (sender, receiver, direction) channel meets the k-th receive on it); it ends
    ``transfer_cost`` after the latest posting time. ``tagged=False`` matches messages by sender
    and receiver only, as a backend without tags would. Raises ``ScheduleError`` on deadlock, on
    a transfer whose two ends disagree about the micro-batch or chunk, or on messages that would
    be left unmatched. ``num_chunks`` is not read: the actions alone give the routing.
    """
    p = len(schedules)
    programs = [steps(s) for s in schedules]
    counterpart = _match_transfers(programs, tagged)
    pc = [0] * p
    posted_at: list[list[float]] = [[0.0] for _ in range(p)]  # start time of each reached step
    intervals: list[list[tuple[float, float, Action]]] = [[] for _ in range(p)]
    cost = {Kind.FORWARD: forward_cost, Kind.BACKWARD: backward_cost}
    progress = True
    while progress:
        progress = False
        for s in range(p):
            while pc[s] < len(programs[s]):
                step, now = programs[s][pc[s]], posted_at[s][pc[s]]
                if step[0].kind.is_compute:
                    end = now + cost[step[0].kind]
                    intervals[s].append((now, end, step[0]))
                else:
                    peers = [counterpart[(s, pc[s], action)] for action in step]
                    if any(pc[peer] < peer_step for peer, peer_step in peers):
                        break
                    end = transfer_cost + max(
                        [now] + [posted_at[peer][peer_step] for peer, peer_step in peers])
                pc[s] += 1
                posted_at[s].append(end)
                progress = True
    stuck = [s for s in range(p) if pc[s] < len(programs[s])]
    if stuck:
        detail = "; ".join(f"stage {s} waits at {' + '.join(map(str, programs[s][pc[s]]))}"
                           for s in stuck)
        raise ScheduleError(f"pipeline schedule deadlocks: {detail}")
    return Timeline(intervals, max(times[-1] for times in posted_at))


def _match_transfers(programs: list[list[list[Action]]], tagged: bool) -> dict:
    """Pair every transfer with its counterpart: (stage, step, action) -> (peer, peer's step)."""
    p = len(programs)
    channels: dict[tuple, dict[str, list[tuple[int, int, Action]]]] = {}
    for s, program in enumerate(programs):
        for index, step in enumerate(program):
            for action in step:
                if not action.kind.is_compute:
                    side = "send" if action.kind in (Kind.SEND_FWD, Kind.SEND_BWD) else "recv"
                    src, dst, direction = transfer_peer(action, p, s)
                    key = (src, dst, direction if tagged else "all")
                    channel = channels.setdefault(key, {"send": [], "recv": []})
                    channel[side].append((s, index, action))
    counterpart = {}
    for (src, dst, direction), sides in channels.items():
        if len(sides["send"]) != len(sides["recv"]):
            raise ScheduleError(f"stage {src} sends {len(sides['send'])} {direction} messages to "
                                f"stage {dst}, which receives {len(sides['recv'])}")
        for send, recv in zip(sides["send"], sides["recv"]):
            if delivered_as(send[2], p, src) != recv[2]:  # also catches a grad met by an activation
                raise ScheduleError(f"stage {src} sends {send[2]} to stage {dst}, "
                                    f"which expects {recv[2]}")
            counterpart[send] = recv[:2]
            counterpart[recv] = send[:2]
    return counterpart


def expected_bubble_fraction(pp_size: int, num_microbatches: int, num_chunks: int = 1) -> float:
    """Idle share of 1F1B with equal forward/backward costs: (p-1)/(v*m + p - 1); for v = 1 this
    is (p-1)/(m+p-1), and interleaving shrinks the ideal idle time v-fold."""
    p, m, v = pp_size, num_microbatches, num_chunks
    return (p - 1) / (v * m + p - 1)
