r"""A decoder-only Transformer LM (2.4M parameters, kernels split over 'model') on generated tokens: the pod in
miniature of scripts/bench_pod.py, sized for a 2-core machine (few Arnoldi steps, small k and r, 128 sequences of 8 tokens, a curvature sample of 16).

  python scripts/bench_pod.py
"""

import ml_collections

from influence_jax.jobs import default_config


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.task = "influence_jax.examples.pod_lm:get_task"
  c.mesh_shape = (2, 4)
  c.user = ml_collections.ConfigDict(dict(vocab_size=128, seq_len=8, d_model=256, num_heads=4, d_ff=1024,
                                          num_layers=3, num_train=128, num_queries=8, l2=1e-4))
  c.arnoldi.n_iters, c.arnoldi.top_k, c.arnoldi.num_examples, c.arnoldi.batch_size = 8, 4, 16, 16
  c.arnoldi.block_size = 4
  c.project.batch_size, c.project.chunk_rows = 32, 32
  c.project.residual_rank, c.project.residual_examples, c.project.sketch_dim = 4, 16, 32
  c.score.top_k, c.score.rows_per_block, c.score.batch_size = 5, 128, 16
  c.score.self_influence_rows = -1
  c.score.grid_examples = 0
  return c
