r"""Fits the top-k curvature eigenspace of the task's model by Arnoldi and saves it with orbax.

Resumes from --workdir/arnoldi_progress when run again after an interruption.

  python scripts/fit_eigenspace.py --config=configs/digits_mlp.py --workdir=runs/digits_mlp

On a device mesh add --config.mesh_shape=(DATA,MODEL) (the basis split over MODEL). On several
processes run the same command in each, sharing --workdir, with
--coordinator_address=HOST0:PORT --num_processes=N --process_id=I.
"""

from absl import logging

from influence_jax.jobs import cli, stages


def job(run):
  ctx = run.context()
  es = stages.fit_stage(ctx, quiet=run.quiet, fault=run.fault)
  logging.warning("Eigenspace (k=%d) saved in %s; eigenvalues in %s", es.k, ctx.path("eigenspace"),
                  ctx.path("eigenvalues.json"))


if __name__ == "__main__":
  cli.run(job)
