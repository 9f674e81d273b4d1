import pytest

from slimtron.config import ConfigError
from slimtron.parallel.state import (ParallelState, axis_groups, embedding_groups, layout_sizes,
                                     rank_grid)
from tests.distributed import run_distributed


def _grid(world, tp=1, pp=1, cp=1):
    return rank_grid(layout_sizes(world, tp=tp, pp=pp, cp=cp))


def test_grid_order_tp_then_cp_then_dp_then_pp():
    grid = _grid(32, tp=2, cp=2, pp=4)
    assert grid.shape == (4, 2, 2, 2)  # [pp, dp, cp, tp]
    assert axis_groups(grid, ["tp"])[:3] == [[0, 1], [2, 3], [4, 5]]
    assert axis_groups(grid, ["cp"])[:2] == [[0, 2], [1, 3]]
    assert axis_groups(grid, ["dp"])[:2] == [[0, 4], [1, 5]]
    assert axis_groups(grid, ["pp"])[0] == [0, 8, 16, 24]
    assert axis_groups(grid, ["cp", "dp"])[0] == [0, 2, 4, 6]
    assert axis_groups(grid, ["dp", "cp"])[0] == [0, 2, 4, 6]  # the order named does not matter
    assert axis_groups(grid, ["tp", "cp"])[1] == [4, 5, 6, 7]
    assert axis_groups(grid, ["tp", "pp"])[0] == [0, 1, 8, 9, 16, 17, 24, 25]
    assert embedding_groups(grid)[0] == [0, 24]


def test_without_cp_the_grid_is_megatrons_tp_dp_pp():
    grid = _grid(16, tp=2, pp=4)
    assert axis_groups(grid, ["tp"])[:3] == [[0, 1], [2, 3], [4, 5]]
    assert axis_groups(grid, ["dp"])[:2] == [[0, 2], [1, 3]]
    assert axis_groups(grid, ["pp"])[0] == [0, 4, 8, 12]
    assert axis_groups(grid, ["cp", "dp"]) == axis_groups(grid, ["dp"])


@pytest.mark.parametrize("axes", [["tp"], ["cp"], ["dp"], ["pp"], ["cp", "dp"], ["tp", "cp"],
                                  ["tp", "pp"], ["tp", "cp", "dp", "pp"]])
def test_every_rank_in_exactly_one_group_of_each_kind(axes):
    grid = _grid(48, tp=2, cp=2, pp=3)
    groups = axis_groups(grid, axes)
    assert sorted(r for g in groups for r in g) == list(range(48))
    assert len({len(g) for g in groups}) == 1


def test_single_stage_embedding_group_is_one_rank():
    assert embedding_groups(_grid(4, tp=2)) == [[0], [1], [2], [3]]


@pytest.mark.parametrize("world,tp,pp,cp", [(6, 4, 1, 1), (8, 3, 1, 1), (8, 2, 3, 1), (12, 1, 1, 8)])
def test_indivisible_world_is_refused(world, tp, pp, cp):
    with pytest.raises(ConfigError, match="world size"):
        layout_sizes(world, tp=tp, pp=pp, cp=cp)


def test_planning_state_matches_grid():
    s = ParallelState.for_planning(tp=2, pp=2, dp=2, rank=5)
    assert (s.pp.rank, s.dp.rank, s.tp.rank, s.cp.size) == (1, 0, 1, 1)
    assert s.is_last_stage and not s.is_first_stage
    assert s.pp.ranks == [1, 5] and s.tp.ranks == [4, 5] and s.dp.ranks == [5, 7]
    assert s.dp_cp.ranks == s.dp.ranks and s.model.ranks == [0, 1, 4, 5]
    assert s.embedding.ranks == [1, 5]
    # Only the named axes: the old field names are gone.
    for old in ("tp_size", "tp_rank", "tp_group", "dp_rank", "pp_size", "mp_group",
                "embedding_group"):
        assert not hasattr(s, old), old


def test_planning_state_with_context_parallel():
    s = ParallelState.for_planning(tp=2, pp=2, dp=2, cp=2, rank=11)  # [pp 1, dp 0, cp 1, tp 1]
    assert (s.pp.rank, s.dp.rank, s.cp.rank, s.tp.rank) == (1, 0, 1, 1)
    assert s.cp.ranks == [9, 11] and s.dp.ranks == [11, 15]
    assert s.dp_cp.ranks == [9, 11, 13, 15] and s.dp_cp.rank == 1
    assert s.tp_cp.ranks == [8, 9, 10, 11] and s.model.ranks == [2, 3, 10, 11]
    middle = ParallelState.for_planning(tp=1, pp=4, dp=1, rank=1)
    assert middle.embedding.ranks == [] and middle.embedding.group is None


def test_single_has_no_groups():
    s = ParallelState.single()
    for name in ("tp", "cp", "dp", "pp", "dp_cp", "tp_cp", "model", "embedding"):
        axis = getattr(s, name)
        assert (axis.size, axis.rank, axis.ranks, axis.group) == (1, 0, [0], None), name


def _groups_work(rank, world):
    import torch
    import torch.distributed as dist
    s = ParallelState.build(tp=2, pp=2)
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=s.tp.group)
    c = ParallelState.build(tp=2, cp=2)  # [dp, cp, tp] = [2, 2, 2]
    u = torch.tensor([float(rank)])
    dist.all_reduce(u, group=c.dp_cp.group)
    return s.tp.rank, s.dp.rank, s.pp.rank, t.item(), s.next_stage_rank, u.item(), c.cp.group is not None


def test_process_groups_reduce_within_their_ranks():
    out = run_distributed(_groups_work, 8)
    assert out[0] == (0, 0, 0, 1.0, 4, 0.0 + 2 + 4 + 6, True)
    assert out[5] == (1, 0, 1, 9.0, 1, 1.0 + 3 + 5 + 7, True)
    assert out[6] == (0, 1, 1, 13.0, 2, 12.0, True)


def _mismatch(rank, world):
    ParallelState.build(tp=2, pp=1, dp=2)


def test_wrong_dp_size_is_refused():
    with pytest.raises(AssertionError, match="does not equal the world size 2"):
        run_distributed(_mismatch, 2)
