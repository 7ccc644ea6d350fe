"""One process of tests/test_params_digest.py's two-process case (not a test itself).

  python tests/split_params_worker.py PORT PROCESS_ID OUT_PREFIX

Joins 127.0.0.1:PORT (2 processes × 4 CPU devices), splits an MLP's kernels over 'model' of a (2, 4) mesh (so
each process holds only its devices' columns), writes the parameters' digest to OUT_PREFIX<id>.txt, then fits
an eigenspace of the L2-regularised loss (the first loss evaluated before the Arnoldi loop sums over the leaves:
evaluated op by op it hung) and appends its eigenvalues.
"""

import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 4)

import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from influence_jax import eigenspace, io, sharding  # noqa: E402
from tests.test_params_digest import split_mlp  # noqa: E402


def main(port: int, process_id: int, out: str) -> None:
  sharding.initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
  mesh = sharding.make_mesh((2, 4))
  params, loss, batch = split_mlp(lambda value, spec: jax.make_array_from_callback(
      value.shape, NamedSharding(mesh, spec), lambda index: value[index]))
  assert not params["w1"].is_fully_addressable
  digest = io.params_digest(params)
  es = eigenspace.fit_eigenspace(loss, params, [batch], n_iters=4, top_k=2, damping=0.1, mesh=mesh)
  with open(f"{out}{process_id}.txt", "w") as f:
    f.write(f"{digest}\n{np.asarray(es.eigenvalues).tolist()}\n")


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
