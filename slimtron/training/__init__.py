"""Training, by job: ``data`` (datasets, micro-batches), ``metrics`` (log line, TensorBoard,
throughput), ``setup`` (the Engine, checkpoint load/save), ``loop`` (step, evaluate, train,
pretrain)."""
from slimtron.training.data import build_datasets, microbatches_for
from slimtron.training.loop import (evaluate, finalize_grads, log_validation, make_forward_step,
                                    pretrain, run_batch, train, train_step)
from slimtron.training.metrics import IterationLog, TensorBoard, is_logging_rank, log
from slimtron.training.setup import (DTYPES, Engine, TrainState, load, save, setup,
                                     shutdown_distributed)

__all__ = ["DTYPES", "Engine", "IterationLog", "TensorBoard", "TrainState", "build_datasets",
           "evaluate", "finalize_grads", "is_logging_rank", "load", "log", "log_validation",
           "make_forward_step", "microbatches_for", "pretrain", "run_batch", "save", "setup",
           "shutdown_distributed", "train", "train_step"]
