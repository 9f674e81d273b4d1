#!/usr/bin/env python
"""Pretrain a GPT or Llama model.

    torchrun --nproc-per-node 8 pretrain_gpt.py --preset tiny-llama --tensor-model-parallel-size 2 ...
    python pretrain_gpt.py ...            (one process)

Flags follow Megatron-LM's names; `python pretrain_gpt.py --help` lists them.
`--dry-run --dry-run-world-size N [--dry-run-rank r] [--json]` builds rank r of an N-rank job (the first
rank of every pipeline stage by default) on the meta device and reports its memory (slimtron.dry_run).
A wrong setting, data file or checkpoint ends the run with one line `error: ...` and exit code 2
(SLIMTRON_TRACEBACK=1 shows the traceback instead).
"""
import os
import sys
import time

from slimtron.arguments import parse_args
from slimtron.training import pretrain

# Every rank usually meets the same mistake: rank 0 reports it at once and the other ranks wait
# this long, so torchrun (which stops the job when rank 0 exits) has ended them before they repeat
# it. A mistake only another rank meets (its own checkpoint shard) is still reported, by that rank.
OTHER_RANKS_REPORT_AFTER_S = 5.0


def report_error(error: Exception) -> None:
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
    else:
        time.sleep(OTHER_RANKS_REPORT_AFTER_S)
        print(f"error (rank {rank}): {error}", file=sys.stderr, flush=True)


def main() -> int:
    try:
        if "--dry-run" in sys.argv[1:]:  # slimtron.dry_run: one rank at its real size, no training
            from slimtron.dry_run import main as dry_run_main
            dry_run_main(sys.argv[1:])
            return 0
        pretrain(parse_args())
    except ValueError as error:  # ConfigError, and the data and checkpoint checks' ValueErrors
        if os.environ.get("SLIMTRON_TRACEBACK"):
            raise
        report_error(error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
