"""A synthetic task of any size on disk, read through grain, and a small MLP.

The scale benchmark (scripts/bench_scale.py) writes N examples and runs the jobs on `get_task`
(config.user.data_dir, config.user.hidden, config.user.format). Two formats: a memory-mapped .npy of
fixed-size records (the default: no index, so a reader's memory does not grow with N) and
ArrayRecord, grain's native random-access format (whose reader holds an index that grows with N:
+0.3 GB at 10⁷ records, docs/scale.md). The training set is never held in
memory either way.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from influence_jax import sources
from influence_jax.types import Task

NUM_FEATURES, NUM_CLASSES = 16, 10
_RECORD = np.dtype([("x", "<f4", (NUM_FEATURES,)), ("y", "<i4")])


# The class centers, the same for every data set (seed 1234).
_CENTERS = np.random.default_rng(1234).normal(size=(NUM_CLASSES, NUM_FEATURES)).astype(np.float32)


def _examples(rng: np.random.Generator, n: int) -> np.ndarray:
  """Returns n records: a class y uniformly, x = _CENTERS[y] + standard normal noise."""
  records = np.empty(n, _RECORD)
  records["y"] = rng.integers(0, NUM_CLASSES, n)
  records["x"] = _CENTERS[records["y"]] + rng.normal(size=(n, NUM_FEATURES)).astype(np.float32)
  return records


def write_array_records(directory: str, num_examples: int, *, prefix: str = "train", num_shards: int = 4,
                        seed: int = 0, block: int = 65536) -> list[str]:
  """Writes `num_examples` labelled examples (16 features, 10 classes) as ArrayRecord shards; returns paths."""
  from array_record.python import array_record_module  # noqa: PLC0415

  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  bounds = np.linspace(0, num_examples, num_shards + 1).astype(np.int64)
  paths = []
  for shard in range(num_shards):
    path = os.path.join(directory, f"{prefix}-{shard:05d}-of-{num_shards:05d}.array_record")
    # 256 records a chunk: the reader's index has one entry per chunk (with one record a chunk, the
    # index of 10⁷ records alone took 0.3 GB in every reader, growing with N); a sorted batch read
    # decodes each chunk it touches once.
    writer = array_record_module.ArrayRecordWriter(path + ".tmp", "group_size:256")
    for lo in range(int(bounds[shard]), int(bounds[shard + 1]), block):
      n = min(block, int(bounds[shard + 1]) - lo)
      for r in _examples(rng, n):
        writer.write(r.tobytes())
    writer.close()
    os.replace(path + ".tmp", path)
    paths.append(path)
  return paths


def write_npy_records(directory: str, num_examples: int, *, prefix: str = "train", seed: int = 0,
                      block: int = 65536) -> str:
  """Writes the same examples as `write_array_records` as one .npy file of fixed-size records; returns its path."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  path = os.path.join(directory, f"{prefix}.npy")
  records = np.lib.format.open_memmap(path + ".tmp.npy", mode="w+", dtype=_RECORD, shape=(num_examples,))
  for lo in range(0, num_examples, block):
    records[lo:lo + min(block, num_examples - lo)] = _examples(rng, min(block, num_examples - lo))
  records.flush()
  del records
  os.replace(path + ".tmp.npy", path)
  return path


class NpyRecordSource:
  """Examples {"x": (16,) float32, "y": int32} from a .npy file of fixed-size records: record i is at a
  computed offset, so the source needs no index (O(1) memory whatever N); reads are `os.pread`s into
  fresh buffers (no memory map, whose resident file pages would count in the process's memory), a
  run of consecutive rows in one read."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
      shape, _, dtype = read_header(f)
      self._offset = f.tell()
    if dtype != _RECORD or len(shape) != 1:
      raise ValueError(f"{path} holds {dtype} {shape}, not synthetic records.")
    self._num = int(shape[0])
    self._fd = os.open(path, os.O_RDONLY)

  def __len__(self) -> int:
    return self._num

  def _read(self, start: int, count: int) -> np.ndarray:
    size = _RECORD.itemsize
    return np.frombuffer(os.pread(self._fd, count * size, self._offset + start * size), _RECORD)

  def __getitem__(self, index: int) -> dict:
    r = self._read(int(index), 1)[0]
    return {"x": np.array(r["x"]), "y": np.int32(r["y"])}

  def read_batch(self, indices) -> dict:
    """Returns examples `indices` stacked: {"x": (B, 16), "y": (B,)}."""
    idx = np.asarray(indices, np.int64)
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1  # Runs of consecutive rows: one read each.
    r = np.concatenate([self._read(int(run[0]), len(run)) for run in np.split(idx, breaks)])
    return {"x": np.array(r["x"]), "y": r["y"].astype(np.int32)}

  def fingerprint_parts(self) -> list:
    return sources.file_identity([self.path])


class ArrayRecordSource:
  """Examples {"x": (16,) float32, "y": int32} from ArrayRecord shards, through grain's data source."""

  def __init__(self, paths: list[str]):
    import grain  # noqa: PLC0415

    self.paths = list(paths)
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._source)

  @staticmethod
  def _parse(record: bytes) -> dict:
    r = np.frombuffer(record, _RECORD)[0]
    return {"x": np.array(r["x"]), "y": np.int32(r["y"])}

  def __getitem__(self, index: int) -> dict:
    return self._parse(self._source[index])

  def read_batch(self, indices) -> dict:
    """Returns examples `indices` stacked: {"x": (B, 16), "y": (B,)} (one vectorised parse)."""
    records = np.frombuffer(b"".join(self._source.__getitems__([int(i) for i in indices])), _RECORD)
    return {"x": np.array(records["x"]), "y": records["y"].astype(np.int32)}


def init_params(hidden: int, seed: int = 0) -> dict:
  k1, k2 = jax.random.split(jax.random.key(seed))
  f32 = jnp.float32
  return {"w1": jax.random.normal(k1, (NUM_FEATURES, hidden), f32) / np.sqrt(NUM_FEATURES),
          "b1": jnp.zeros(hidden, f32),
          "w2": jax.random.normal(k2, (hidden, NUM_CLASSES), f32) / np.sqrt(hidden), "b2": jnp.zeros(NUM_CLASSES, f32)}


def per_example_loss(params: dict, batch: dict) -> jax.Array:
  """Returns (B,) softmax cross-entropy of the MLP 16 → hidden (tanh) → 10."""
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  logp = jax.nn.log_softmax(h @ params["w2"] + params["b2"])
  return -jnp.take_along_axis(logp, batch["y"].astype(jnp.int32)[:, None], axis=1)[:, 0]


def loss(params: dict, batch: dict) -> jax.Array:
  """Returns the mean loss plus (1e-3 / 2)‖params‖²."""
  return jnp.mean(per_example_loss(params, batch)) + 5e-4 * sum(jnp.sum(p * p) for p in jax.tree.leaves(params))


def shard_paths(directory: str, prefix: str) -> list[str]:
  names = sorted(n for n in os.listdir(directory) if n.startswith(prefix + "-") and n.endswith(".array_record"))
  if not names:
    raise FileNotFoundError(f"No {prefix}-*.array_record files in {directory}.")
  return [os.path.join(directory, n) for n in names]


def get_task(config) -> Task:
  """The synthetic task: config.user.data_dir holds train and queries as .npy records (config.user.format
  "npy") or ArrayRecord shards ("array_record")."""
  d = config.user.data_dir
  if config.user.get("format", "npy") == "npy":
    train, queries = (NpyRecordSource(os.path.join(d, f"{p}.npy")) for p in ("train", "queries"))
  else:
    train, queries = (ArrayRecordSource(shard_paths(d, p)) for p in ("train", "queries"))
  return Task(params=init_params(config.user.get("hidden", 32)), loss_fn=loss, per_example_loss_fn=per_example_loss,
              train=train, queries=queries, label_fn=lambda ex: str(int(ex["y"])))
