import pytest

from slimtron.config import ConfigError
from slimtron.parallel.state import ParallelState, coordinates, group_ranks, rank_grid
from tests.distributed import run_distributed


def test_grid_order_tp_then_dp_then_pp():
    grid = rank_grid(16, tp=2, pp=4)
    assert grid.shape == (4, 2, 2)
    groups = group_ranks(grid)
    assert groups["tensor"][:3] == [[0, 1], [2, 3], [4, 5]]
    assert groups["data"][:2] == [[0, 2], [1, 3]]
    assert groups["pipeline"][0] == [0, 4, 8, 12]
    assert groups["model"][0] == [0, 1, 4, 5, 8, 9, 12, 13]
    assert groups["embedding"][0] == [0, 12]
    assert coordinates(grid, 7) == (1, 1, 1)


def test_every_rank_in_exactly_one_group_of_each_kind():
    grid = rank_grid(24, tp=2, pp=3)
    for kind, groups in group_ranks(grid).items():
        if kind == "embedding":
            continue
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(24)), kind


def test_single_stage_embedding_group_is_one_rank():
    assert group_ranks(rank_grid(4, tp=2, pp=1))["embedding"] == [[0], [1], [2], [3]]


@pytest.mark.parametrize("world,tp,pp", [(6, 4, 1), (8, 3, 1), (8, 2, 3)])
def test_indivisible_world_is_refused(world, tp, pp):
    with pytest.raises(ConfigError, match="world size"):
        rank_grid(world, tp, pp)


def test_planning_state_matches_grid():
    s = ParallelState.for_planning(tp=2, pp=2, dp=2, rank=5)
    assert (s.pp_rank, s.dp_rank, s.tp_rank) == (1, 0, 1)
    assert s.is_last_stage and not s.is_first_stage
    assert s.pp_ranks == [1, 5] and s.tp_ranks == [4, 5] and s.dp_ranks == [5, 7]


def _groups_work(rank, world):
    import torch
    import torch.distributed as dist
    s = ParallelState.build(tp=2, pp=2)
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=s.tp_group)
    return s.tp_rank, s.dp_rank, s.pp_rank, t.item(), s.next_stage_rank


def test_process_groups_reduce_within_their_ranks():
    out = run_distributed(_groups_work, 8)
    assert out[0] == (0, 0, 0, 1.0, 4)
    assert out[5] == (1, 0, 1, 9.0, 1)
    assert out[6] == (0, 1, 1, 13.0, 2)


def _mismatch(rank, world):
    ParallelState.build(tp=2, pp=1, dp=2)


def test_wrong_dp_size_is_refused():
    with pytest.raises(AssertionError, match="does not equal the world size 2"):
        run_distributed(_mismatch, 2)
