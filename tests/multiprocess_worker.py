"""One process of a multi-process run (used by tests/test_sharding.py; not a test itself).

  python tests/multiprocess_worker.py PORT PROCESS_ID NUM_PROCESSES OUT.npz

Every process joins 127.0.0.1:PORT (gloo collectives), builds a global
(2, 4) mesh over all processes' CPU devices, fits an eigenspace with the
curvature batches split over 'data' and the basis over 'model', then projects
and scores its own slice of the training set (global batches padded and
padded; padding rows dropped by their id) and process 0 writes eigenvalues, projections and scores, in global
example order, to OUT.npz.
"""

import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from influence_jax import eigenspace, scoring, sharding, sources  # noqa: E402
from influence_jax.jobs import input as input_lib  # noqa: E402
from tests import sharding_problem  # noqa: E402


def main(port: int, process_id: int, num_processes: int, out: str) -> None:
  sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)
  assert jax.device_count() == 4 * num_processes, jax.devices()
  params, loss, per_example, batches, test, fit_kw = sharding_problem.problem()
  mesh = sharding.make_mesh((2, -1))
  es = eigenspace.fit_eigenspace(loss, params, batches, mesh=mesh, **fit_kw)

  # Each process reads only its own slice of the training set, by global id.
  whole = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  rows = np.array_split(np.arange(len(whole["y"])), jax.process_count())[jax.process_index()]
  feed = list(input_lib.global_batches(sources.ArraySource(whole), rows, sharding_problem.GLOBAL_BATCH, mesh,
                                       "train", num_threads=1))
  train = [batch for _, batch in feed]
  local = sharding.local_batch_size(sharding_problem.GLOBAL_BATCH, mesh)
  padded_ids = [np.concatenate([ids, np.full(local - ids.size, -1, np.int64)]) for ids, _ in feed]
  all_ids = np.concatenate([sharding.to_host(sharding.to_global(ids, sharding_problem.GLOBAL_BATCH, mesh))
                            for ids in padded_ids])  # Laid out like the batches' rows.
  mask = all_ids >= 0
  proj = eigenspace.project(es, per_example, params, train, mesh=mesh)
  scores = scoring.influence(es, per_example, params, test, train, mesh=mesh)
  proj, scores = sharding.to_host(proj), sharding.to_host(scores)
  order = np.argsort(all_ids[mask])
  if jax.process_index() == 0:
    np.savez(out, eigenvalues=sharding.to_host(es.eigenvalues), eigenvectors=sharding.to_host(es.eigenvectors),
             projections=proj[mask][order], scores=scores[:, mask][:, order], ids=all_ids[mask][order],
             num_steps=len(feed))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
