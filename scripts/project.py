r"""Projects every training example once into the projection store (--workdir/store).

Resumable: killed at any moment and run again, it continues at the first unfinished chunk.

  python scripts/project.py --config=configs/digits_mlp.py --workdir=runs/digits_mlp
  # the training set's files changed since: re-read it all, re-project only the chunks that changed
  python scripts/project.py --config=configs/digits_mlp.py --workdir=runs/digits_mlp --config.project.verify=True

On several processes run the same command in each, sharing --workdir, with
--coordinator_address=HOST0:PORT --num_processes=N --process_id=I: each projects and writes its own
chunks of rows.
"""

from absl import logging

from influence_jax import store as store_lib
from influence_jax.jobs import cli, stages


def job(run):
  store = stages.project_stage(run.context(), quiet=run.quiet, fault=run.fault)
  logging.warning("Projection store: %s", store_lib.describe(store))


if __name__ == "__main__":
  cli.run(job)
