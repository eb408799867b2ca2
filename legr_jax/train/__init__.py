"""Masked, data-parallel training with optax and orbax.

Building blocks (pure): `make_optimizer`, `make_schedule`, `init_train_state`,
`train_step`, `eval_step`; jitted and sharded over a 1-D device mesh by
`make_train_step` / `make_eval_step`; `evaluate` for exact split metrics.
Driver: `fit(TrainConfig(...), workdir)` with checkpoints, resume, NaN stop,
progress bar and metrics.jsonl; `load_trained(workdir)` gets the network back.
"""

from legr_jax.train.checkpoint import make_manager
from legr_jax.train.config import TrainConfig, differences
from legr_jax.train.evaluate import evaluate
from legr_jax.train.loop import (FitResult, TrainingDivergedError,
                                 WorkdirConflictError, build_optimizer, fit,
                                 load_dataset, load_masks, load_trained,
                                 prepare_workdir, read_metrics)
from legr_jax.train.optim import SCHEDULES, make_optimizer, make_schedule
from legr_jax.train.parallel import (batch_sharding, make_eval_step, make_mesh,
                                     make_train_step, replicate, replicated)
from legr_jax.train.progress import Progress
from legr_jax.train.step import (TrainState, cross_entropy, eval_step,
                                 init_train_state, train_step)

__all__ = [
    "FitResult", "Progress", "SCHEDULES", "TrainConfig", "TrainState",
    "TrainingDivergedError", "WorkdirConflictError", "batch_sharding",
    "build_optimizer", "cross_entropy", "differences", "eval_step",
    "evaluate", "fit", "init_train_state", "load_dataset", "load_masks",
    "load_trained", "make_eval_step", "make_manager", "make_mesh",
    "make_optimizer", "make_schedule", "make_train_step", "prepare_workdir",
    "read_metrics", "replicate", "replicated", "train_step",
]
