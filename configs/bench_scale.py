r"""The scale benchmark's task: a synthetic on-disk data set and a small MLP (scripts/bench_scale.py).

  python scripts/bench_scale.py --num_examples=1000000,10000000 --workdir=/tmp/bench_scale
"""

import ml_collections

from influence_jax.jobs import default_config


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.task = "influence_jax.examples.synthetic:get_task"
  c.user.data_dir = ""
  c.user.format = "npy"  # "npy" (fixed-size records, no index) or "array_record".
  c.user.hidden = 32
  c.arnoldi.n_iters = 60
  c.arnoldi.top_k = 32
  c.arnoldi.num_examples = 8192
  c.project.batch_size = 4096
  c.project.chunk_rows = 65536
  c.project.sketch_dim = 64
  c.score.rows_per_block = 65536
  c.score.self_influence_rows = 1000
  return c
