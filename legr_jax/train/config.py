"""`TrainConfig`: a training run described as data (saved as config.json)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from legr_jax import ops as ops_lib

# Fields that do not change what is computed; they may differ on resume.
OPERATIONAL_FIELDS = ("data_dir", "log_every_steps", "ckpt_every_steps",
                      "keep_checkpoints", "eval_batch_size", "prefetch",
                      "cpu_kernels")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """A training run.

  Data: ``dataset`` (a `legr_jax.data.get_dataset` name), ``data_dir``,
  validation carved with ``val_fraction`` or ``val_size`` and ``split_seed``
  (``test_size``: carve a test split first, for data without one);
  ``augment`` None means the data set's default ('cifar', 'imagenet', 'none').
  Model: ``model`` (a `legr_jax.models.get` name) and ``model_kwargs``.
  Optimization: SGD(``lr``, ``momentum``, ``nesterov``) with coupled L2
  ``weight_decay``; ``schedule`` 'multistep' (x``gamma`` at ``milestones``
  fractions of ``epochs``), 'cosine' or 'constant'; ``warmup_epochs``;
  ``label_smoothing``; ``compute_dtype`` 'float32' or 'bfloat16'.
  ``seed`` drives initialization, data order and augmentation.
  Bookkeeping: a checkpoint every ``ckpt_every_steps`` steps and at every
  epoch end (the last ``keep_checkpoints`` and the best by validation accuracy
  are kept), a training-metrics line every ``log_every_steps`` steps,
  validation every ``eval_every_epochs`` epochs.
  Compute: ``cpu_kernels`` 'auto' | 'on' | 'off' (`legr_jax.ops.resolve`;
  operational: a run resumes under another setting).
  """
  model: str = "cnn_small"
  model_kwargs: dict = dataclasses.field(default_factory=dict)
  dataset: str = "digits"
  data_dir: str | None = None
  val_fraction: float = 0.1
  val_size: int | None = None
  test_size: int | None = None
  split_seed: int = 0
  augment: str | None = None
  seed: int = 0
  epochs: int = 30
  batch_size: int = 128
  lr: float = 0.1
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 5e-4
  schedule: str = "multistep"
  milestones: tuple[float, ...] = (0.3, 0.6, 0.8)
  gamma: float = 0.2
  warmup_epochs: float = 0.0
  label_smoothing: float = 0.0
  compute_dtype: str = "float32"
  eval_every_epochs: int = 1
  eval_batch_size: int = 500
  ckpt_every_steps: int = 1000
  keep_checkpoints: int = 3
  log_every_steps: int = 20
  prefetch: int = 2
  cpu_kernels: str = "auto"

  def __post_init__(self):
    object.__setattr__(self, "milestones",
                       tuple(float(m) for m in self.milestones))
    object.__setattr__(self, "model_kwargs", dict(self.model_kwargs))
    if self.epochs < 1 or self.batch_size < 1:
      raise ValueError("epochs and batch_size must be positive")
    ops_lib.check_setting(self.cpu_kernels)
    if self.compute_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', got "
                       f"{self.compute_dtype!r}")

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["milestones"] = list(self.milestones)
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
    return cls(**d)

  def replace(self, **kw) -> "TrainConfig":
    return dataclasses.replace(self, **kw)


def differences(a: TrainConfig, b: TrainConfig, *,
                ignore=OPERATIONAL_FIELDS) -> dict[str, tuple[Any, Any]]:
  """Fields (other than ``ignore``) whose values differ: name -> (a, b)."""
  da, db = a.to_dict(), b.to_dict()
  return {k: (da[k], db[k]) for k in da if k not in ignore and da[k] != db[k]}
