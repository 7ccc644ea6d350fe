"""A user's own task, as a user would write it: numpy files on disk, a plain-JAX model, a factory.

Used by tests/test_user_task.py through `config.task = "user_task:get_task"` (tests/ is the
working directory's import root there). config.user.data_dir holds train_x.npy, train_y.npy,
queries_x.npy, queries_y.npy, other_x.npy, other_y.npy; config.user.read_log, when set, gets one
line per training example read (so a test can tell whether the training set was read);
config.user.params_data_dir, when set, is where the model's training data are read from instead.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from influence_jax.jobs import Task

NUM_FEATURES, NUM_CLASSES, HIDDEN = 6, 3, 5


class NpySource:
  """Examples {"x", "y"} from two memory-mapped .npy files (random access, nothing loaded up front)."""

  def __init__(self, directory, prefix, read_log=""):
    self.paths = [os.path.join(directory, f"{prefix}_{k}.npy") for k in ("x", "y")]
    self.x, self.y = (np.load(p, mmap_mode="r") for p in self.paths)
    self.read_log = read_log

  def __len__(self):
    return len(self.y)

  def __getitem__(self, i):
    if self.read_log:
      with open(self.read_log, "a") as f:
        f.write(f"{i}\n")
    return {"x": np.asarray(self.x[i], np.float32), "y": np.asarray(self.y[i], np.int32)}


def write_data(directory, num_train=300, num_queries=7, num_other=5, seed=0):
  """Writes a small synthetic 3-class data set to `directory` as .npy files."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(NUM_CLASSES, NUM_FEATURES)) * 2
  for prefix, n in (("train", num_train), ("queries", num_queries), ("other", num_other)):
    y = rng.integers(0, NUM_CLASSES, n)
    x = centers[y] + rng.normal(size=(n, NUM_FEATURES))
    np.save(os.path.join(directory, f"{prefix}_x.npy"), x.astype(np.float32))
    np.save(os.path.join(directory, f"{prefix}_y.npy"), y.astype(np.int32))


def init_params(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  f32 = jnp.float32  # float32 whatever jax_enable_x64 says: the same numbers in a job and in a test.
  return {"w1": jax.random.normal(k1, (NUM_FEATURES, HIDDEN), f32) * 0.5, "b1": jnp.zeros(HIDDEN, f32),
          "w2": jax.random.normal(k2, (HIDDEN, NUM_CLASSES), f32) * 0.5, "b2": jnp.zeros(NUM_CLASSES, f32)}


def per_example_loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  logits = h @ params["w2"] + params["b2"]
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None].astype(jnp.int32), 1)[:, 0]


def loss(params, batch, l2=1e-2):
  return jnp.mean(per_example_loss(params, batch)) + 0.5 * l2 * sum(jnp.sum(p * p) for p in jax.tree.leaves(params))


def trained_params(train, steps=200, lr=0.5):
  """Full-batch gradient descent from a fixed start (deterministic)."""
  batch = {"x": np.asarray(train.x, np.float32), "y": np.asarray(train.y, np.int32)}
  params = init_params()
  step = jax.jit(lambda p: jax.tree.map(lambda a, g: a - lr * g, p, jax.grad(loss)(p, batch)))
  for _ in range(steps):
    params = step(params)
  return params


def get_task(config):
  d = config.user.data_dir
  train = NpySource(d, "train", config.user.get("read_log", ""))
  # The model trained on config.user.params_data_dir when set (so that a test can edit the data after training).
  return Task(params=trained_params(NpySource(config.user.get("params_data_dir", "") or d, "train")), loss_fn=loss, per_example_loss_fn=per_example_loss,
              train=train, queries=NpySource(d, "queries"), label_fn=lambda ex: str(int(ex["y"])))


def other_queries(config):
  return NpySource(config.user.data_dir, "other")
