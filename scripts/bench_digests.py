r"""Benchmark: what hashing every training example costs the projection job (issue 25's store digests).

Feeds --num_examples synthetic examples (the scale task's: 16 float32 and an int32 label, 68 bytes)
through `project.ChunkDigests` in batches of --batch_size, as the projection loop does, and prints
the rate and the share of a projection loop at --projection_rate examples/s (docs/scale.md: 155,197
examples/s at 10⁶ examples on a 2-core CPU).

  python scripts/bench_digests.py --num_examples=1000000
"""

import time

from absl import app, flags
import numpy as np

from influence_jax.jobs.project import ChunkDigests

flags.DEFINE_integer("num_examples", 1_000_000, "Examples hashed.")
flags.DEFINE_integer("batch_size", 1024, "Examples per batch (project.batch_size).")
flags.DEFINE_integer("chunk_rows", 8192, "Rows per store chunk (project.chunk_rows).")
flags.DEFINE_float("projection_rate", 155_000.0, "Examples projected per second, to compare with.")
FLAGS = flags.FLAGS


def main(_):
  n, b = FLAGS.num_examples, FLAGS.batch_size
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(b, 16)).astype(np.float32), "y": rng.integers(0, 10, b).astype(np.int32)}
  digests, done = ChunkDigests(FLAGS.chunk_rows), 0
  start = time.perf_counter()
  for lo in range(0, n, b):
    ids = np.arange(lo, min(lo + b, n))
    digests.update(ids, {k: v[: ids.size] for k, v in batch.items()})
    while (done + 1) * FLAGS.chunk_rows <= ids[-1] + 1 or (ids[-1] + 1 == n and done in digests.open):
      digests.pop(done)
      done += 1
  seconds = time.perf_counter() - start
  rate = n / seconds
  print(f"hashed {n:,} examples in {seconds:.2f} s: {rate:,.0f} examples/s, "
        f"{100 * FLAGS.projection_rate / rate:.1f} % of a projection at {FLAGS.projection_rate:,.0f} examples/s")


if __name__ == "__main__":
  app.run(main)
