"""bench/checkpoint_metadata.py computes, on the meta device and the fake process group, the very
metadata.json a format-2 save writes: checked against real saves on 8 gloo ranks, with and without
the distributed optimizer, under tensor, pipeline, data and context parallelism."""
import json
import os

import torch

from bench.checkpoint_metadata import layout_metadata
from slimtron import checkpointing
from slimtron.arguments import validate
from slimtron.checkpointing import dist_format
from slimtron.training.setup import build_parallel_state, build_tokenizer_for, build_training_parts
from tests.distributed import run_distributed
from tests.test_training_parity import tiny_config

WORLD = 8
LAYOUTS = {"tp2_pp2_dp2_distopt": dict(tp=2, pp=2, sp=True, dist_opt=True),
           "tp2_pp2_dp2": dict(tp=2, pp=2),
           "tp2_cp2_dp2_distopt": dict(tp=2, cp=2, dist_opt=True)}


def _config(layout):
    config = tiny_config(**layout)
    build_tokenizer_for(config)
    validate(config, WORLD, check_files=False)
    return config


def _save_each(rank, world, root):
    cpu = torch.device("cpu")
    for name, layout in LAYOUTS.items():
        config = _config(layout)
        pstate = build_parallel_state(config, cpu)
        engine = build_training_parts(config, pstate, cpu)
        checkpointing.save_checkpoint(os.path.join(root, name), 1, engine.model_chunks,
                                      engine.optimizer, pstate, config, consumed_samples=0)


def test_bench_metadata_is_the_metadata_a_real_save_writes(tmp_path):
    run_distributed(_save_each, WORLD, str(tmp_path), timeout=300)
    for name, layout in LAYOUTS.items():
        path = os.path.join(checkpointing.iteration_dir(str(tmp_path / name), 1),
                            dist_format.METADATA_FILE)
        with open(path) as f:
            written = f.read()
        computed = layout_metadata(_config(layout), WORLD)
        assert json.loads(written) == computed, name
        assert written == json.dumps(computed), name  # byte for byte, as write_metadata dumps
        assert len(computed["files"]) == WORLD
