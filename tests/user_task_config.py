"""The config of tests/user_task.py: default_config() plus the user's keys, small settings."""

import numpy as np

from influence_jax.jobs import default_config
from influence_jax.sources import ArraySource


def get_config():
  c = default_config()
  c.task = "user_task:get_task"
  c.user.data_dir = ""
  c.user.read_log = ""
  c.user.params_data_dir = ""  # Where the model is trained from ("": data_dir).
  c.user.bad_row = -1  # For user_task_config:bad_row_task.
  c.user.bad = ""
  c.arnoldi.n_iters = 40
  c.arnoldi.top_k = 20
  c.arnoldi.checkpoint_every = 10
  c.arnoldi.num_examples = 100  # The curvature sample: a third of the 300 training examples.
  c.project.batch_size = 32
  c.project.chunk_rows = 64  # 300 rows: 5 chunks.
  c.project.sketch_dim = 100  # ≥ p₁p₂ = 8 × 7 for p = 53: the sketched tail is exact.
  c.score.top_k = 5
  c.score.rows_per_block = 64
  c.score.checkpoint_every = 1
  return c


def empty_queries(config):
  return ArraySource({"x": np.zeros((0, 6), np.float32), "y": np.zeros((0,), np.int32)})


class _Ragged:
  def __len__(self):
    return 6

  def __getitem__(self, i):
    return {"x": np.zeros(6 if i != 3 else 5, np.float32), "y": np.int32(0)}


def ragged_queries(config):
  return _Ragged()


class _WithBadRow:
  """`source` with one example damaged: x NaN (bad="nan") or a label out of range (bad="label")."""

  def __init__(self, source, row, bad):
    self.source, self.row, self.bad = source, row, bad

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    example = dict(self.source[i])
    if i == self.row and self.bad == "nan":
      example["x"] = np.full_like(example["x"], np.nan)
    elif i == self.row:
      example["y"] = np.int32(7)  # 3 classes
    return example


def bad_row_task(config):
  """tests/user_task.py's task with training example config.user.bad_row damaged as config.user.bad says;
  the curvature sample stays clean (so that fitting succeeds and projecting must catch it)."""
  import user_task  # noqa: PLC0415 (tests/ is the jobs' working directory)
  task = user_task.get_task(config)
  bad = _WithBadRow(task.train, config.user.bad_row, config.user.bad)
  return task.replace(train=bad, curvature=ArraySource({"x": task.train.x[:100], "y": task.train.y[:100]}))


class _Unversioned:
  """Examples {"x", "y"} from <data_dir>/<prefix>_x.npy and _y.npy with no identity to offer (no `paths`, no
  `fingerprint_parts`): like the README's NpySource, seen by the jobs only through its content."""

  def __init__(self, directory, prefix):
    self.x, self.y = (np.load(f"{directory}/{prefix}_{k}.npy") for k in ("x", "y"))

  def __len__(self):
    return len(self.y)

  def __getitem__(self, i):
    return {"x": np.asarray(self.x[i], np.float32), "y": np.asarray(self.y[i], np.int32)}


def unversioned_queries(config):
  """The query set many_x.npy / many_y.npy of config.user.data_dir (written by the test that uses it)."""
  return _Unversioned(config.user.data_dir, "many")


def bad_curvature_task(config):
  """tests/user_task.py's task with its curvature sample the first 100 training examples, example
  config.user.bad_row of it damaged as config.user.bad says (-1: none)."""
  import user_task  # noqa: PLC0415 (tests/ is the jobs' working directory)
  task = user_task.get_task(config)
  curvature = ArraySource({"x": np.asarray(task.train.x[:100]), "y": np.asarray(task.train.y[:100])})
  return task.replace(curvature=_WithBadRow(curvature, config.user.bad_row, config.user.bad))


def bfloat16_task(config):
  """tests/user_task.py's task with its trained parameters in bfloat16 (the model then runs in bfloat16)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import user_task  # noqa: PLC0415 (tests/ is the jobs' working directory)
  task = user_task.get_task(config)
  return task.replace(params=jax.tree.map(lambda p: p.astype(jnp.bfloat16), task.params))
