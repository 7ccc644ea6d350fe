r"""A decoder-only Transformer LM of 3.4M parameters (vocab 512, d 256, 4 layers, 64 tokens) on 50,000 generated
sequences on disk: the real-model benchmark of scripts/bench_lm.py, at the jobs' defaults except the sizes below
(k = 32 from 64 Arnoldi steps over 256 sequences, 100 queries). config.user.data_dir is set by the script.

  python scripts/bench_lm.py
"""

import ml_collections

from influence_jax.jobs import default_config


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.task = "influence_jax.examples.pod_lm:get_task"
  c.mesh_shape = (1, 1)
  c.user = ml_collections.ConfigDict(dict(vocab_size=512, seq_len=64, d_model=256, num_heads=4, d_ff=1024,
                                          num_layers=4, num_train=50_000, num_queries=100, l2=1e-4,
                                          data_dir=""))
  c.arnoldi.n_iters, c.arnoldi.top_k, c.arnoldi.num_examples, c.arnoldi.batch_size = 64, 32, 256, 256
  c.project.batch_size = 256
  c.score.grid_examples = 0
  return c
