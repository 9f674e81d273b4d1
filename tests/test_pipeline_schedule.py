"""Pipeline schedules as data: properties of each stage's list and of all stages run together."""
import pytest

from slimtron.config import ConfigError
from slimtron.parallel.pipeline_schedules import (
    Action, Kind, ScheduleError, build_schedule, expected_bubble_fraction, interleaved_rounds,
    simulate, with_transfers)

# (p, m, v): non-interleaved for any m, interleaved for m a multiple of p.
LAYOUTS = ([(p, m, 1) for p in (1, 2, 3, 4, 8) for m in (1, 2, 3, 4, 5, 8, 13)]
           + [(p, m, v) for p in (2, 3, 4, 8) for v in (2, 3, 4) for m in (p, 2 * p, 3 * p)])


def computes(actions, kind):
    return [(a.microbatch, a.chunk) for a in actions if a.kind is kind]


def all_schedules(p, m, v, forward_only=False):
    return [build_schedule(p, stage, m, v, forward_only) for stage in range(p)]


@pytest.mark.parametrize("p,m,v", LAYOUTS)
def test_each_forward_and_backward_once_and_forward_first(p, m, v):
    expected = sorted((i, c) for i in range(m) for c in range(v))
    for actions in all_schedules(p, m, v):
        forwards, backwards = computes(actions, Kind.FORWARD), computes(actions, Kind.BACKWARD)
        assert sorted(forwards) == expected and sorted(backwards) == expected
        position = {(a.kind, a.microbatch, a.chunk): i for i, a in enumerate(actions)}
        assert all(position[(Kind.FORWARD, *key)] < position[(Kind.BACKWARD, *key)]
                   for key in expected)
    for actions in all_schedules(p, m, v, forward_only=True):
        assert sorted(computes(actions, Kind.FORWARD)) == expected
        assert not computes(actions, Kind.BACKWARD)
        assert not [a for a in actions if a.kind in (Kind.SEND_BWD, Kind.RECV_BWD)]


def max_in_flight(actions):
    live = peak = 0
    for a in actions:
        live += {Kind.FORWARD: 1, Kind.BACKWARD: -1}.get(a.kind, 0)
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("p,m,v", LAYOUTS)
def test_micro_batches_in_flight_are_bounded(p, m, v):
    for stage, actions in enumerate(all_schedules(p, m, v)):
        if v == 1:
            assert max_in_flight(actions) == min(p - stage, m)
        else:  # chunk activations: the first stage fills every chunk's pipeline, plus one group
            assert max_in_flight(actions) <= (v + 1) * p - 1


def test_one_f_one_b_shape():
    # Stage 1 of 4 with 6 micro-batches: 2 warm-up forwards, 1F1B, 2 cool-down backwards.
    order = [str(a) for a in build_schedule(4, 1, 6) if a.kind.is_compute]
    assert order == ["F(0,c0)", "F(1,c0)", "F(2,c0)", "B(0,c0)", "F(3,c0)", "B(1,c0)", "F(4,c0)",
                     "B(2,c0)", "F(5,c0)", "B(3,c0)", "B(4,c0)", "B(5,c0)"]
    single = [str(a) for a in build_schedule(1, 0, 3)]
    assert single == ["F(0,c0)", "B(0,c0)", "F(1,c0)", "B(1,c0)", "F(2,c0)", "B(2,c0)"]


def test_interleaved_forwards_walk_chunks_in_groups_of_p():
    forwards = computes(build_schedule(2, 0, 4, 2, forward_only=True), Kind.FORWARD)
    assert forwards == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1)]
    backwards = computes(build_schedule(2, 1, 4, 2), Kind.BACKWARD)
    assert backwards == [(0, 1), (1, 1), (0, 0), (1, 0), (2, 1), (3, 1), (2, 0), (3, 0)]


@pytest.mark.parametrize("p,m,v", LAYOUTS)
def test_transfers_surround_their_computes(p, m, v):
    for stage, actions in enumerate(all_schedules(p, m, v)):
        position = {(a.kind, a.microbatch, a.chunk): i for i, a in enumerate(actions)}
        for (kind, i, c), at in position.items():
            if kind is Kind.RECV_FWD:
                assert at < position[(Kind.FORWARD, i, c)]
            elif kind is Kind.SEND_FWD:
                assert at > position[(Kind.FORWARD, i, c)]
            elif kind is Kind.RECV_BWD:
                assert at < position[(Kind.BACKWARD, i, c)]
            elif kind is Kind.SEND_BWD:
                assert at > position[(Kind.BACKWARD, i, c)]
        # The pipeline's two ends neither receive nor send past the model's ends.
        ends = {(Kind.RECV_FWD, 0, 0), (Kind.SEND_BWD, 0, 0), (Kind.SEND_FWD, p - 1, v - 1),
                (Kind.RECV_BWD, p - 1, v - 1)}
        assert not [a for a in actions if (a.kind, stage, a.chunk) in ends]


@pytest.mark.parametrize("forward_only", [False, True])
def test_all_stages_run_together_without_deadlock(forward_only):
    for p, m, v in LAYOUTS:
        schedules = all_schedules(p, m, v, forward_only)
        timeline = simulate(schedules, v)  # raises on deadlock or unmatched messages
        for stage in range(p):
            ran = [action for _, _, action in timeline.intervals[stage]]
            assert ran == [a for a in schedules[stage] if a.kind.is_compute]


def test_transfers_match_even_without_tags():
    # With two stages (or interleaving) a neighbour is both next and previous stage; the schedules
    # keep activations and grads in the same order on both ends, so tags are only a second guard.
    for p, m, v in LAYOUTS:
        for forward_only in (False, True):
            simulate(all_schedules(p, m, v, forward_only), v, tagged=False)


@pytest.mark.parametrize("backward_cost", [1.0, 2.0])
def test_bubble_of_one_f_one_b_is_p_minus_1_over_m_plus_p_minus_1(backward_cost):
    for p in (1, 2, 3, 4, 8):
        for m in (1, 2, 4, 8, 16, 32):
            timeline = simulate(all_schedules(p, m, 1), backward_cost=backward_cost)
            assert timeline.bubble_fraction() == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
            assert timeline.makespan == pytest.approx((m + p - 1) * (1 + backward_cost))


def test_transfer_cost_lies_on_the_critical_path():
    # p=2, m=1: F on stage 0, activation over, F and B on stage 1, grad back, B on stage 0.
    timeline = simulate(all_schedules(2, 1, 1), transfer_cost=0.5)
    assert timeline.makespan == pytest.approx(4 + 2 * 0.5)
    assert timeline.intervals[0][-1][:2] == pytest.approx((5 - 1, 5))


def test_interleaving_divides_the_ideal_bubble_by_v():
    for p, m, v in LAYOUTS:
        if v == 1:
            continue
        bubble = simulate(all_schedules(p, m, v), v).bubble_fraction()
        assert bubble == pytest.approx(expected_bubble_fraction(p, m, v), abs=1e-12)
        assert bubble < expected_bubble_fraction(p, m)


def test_simulator_detects_deadlock_and_unmatched_messages():
    # Interleaving with a batch after every single compute (sending a forward's output before the
    # backward that follows it) deadlocks: the simulator must say so.
    p, m, v = 2, 4, 2
    unpaired = [with_transfers([[c] for rnd in interleaved_rounds(p, s, m, v) for c in rnd],
                               p, s, v) for s in range(p)]
    with pytest.raises(ScheduleError, match="deadlocks"):
        simulate(unpaired, v)
    schedules = all_schedules(3, 4, 1)
    schedules[1] = [a for a in schedules[1] if a != Action(Kind.SEND_FWD, 2)]
    with pytest.raises(ScheduleError, match="stage 1 sends 3 fwd messages to stage 2"):
        simulate(schedules)
    schedules = all_schedules(2, 2, 1)
    swapped = {Action(Kind.RECV_FWD, 0): Action(Kind.RECV_FWD, 1),
               Action(Kind.RECV_FWD, 1): Action(Kind.RECV_FWD, 0)}
    schedules[1] = [swapped.get(a, a) for a in schedules[1]]
    with pytest.raises(ScheduleError, match="expects"):
        simulate(schedules)


@pytest.mark.parametrize("args,message", [
    ((4, 0, 6, 2), "multiple of the pipeline-model-parallel size"),
    ((1, 0, 4, 2), "needs pipeline-model-parallel size > 1"),
    ((2, 2, 4, 1), "stage 2 is outside 0..1"),
    ((2, 0, 0, 1), "at least 1"),
])
def test_bad_layouts_raise_config_error(args, message):
    with pytest.raises(ConfigError, match=message):
        build_schedule(*args)
