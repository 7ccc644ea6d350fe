r"""Loads the trained model, fits the top-k curvature eigenspace by Arnoldi, saves it with orbax.

Resumes from --workdir/arnoldi_progress when run again after an interruption.

  python scripts/fit_eigenspace.py --config=configs/digits_mlp.py --workdir=runs/digits_mlp

On a device mesh add --config.mesh_shape=(DATA,MODEL) (the basis split over MODEL). On several
processes run the same command in each, sharing --workdir, with
--coordinator_address=HOST0:PORT --num_processes=N --process_id=I (every process saves its own
shards of the Arnoldi progress and the eigenspace; process 0 writes eigenvalues.json and the picture).
"""

from absl import app, logging

from influence_jax.jobs import cli
from influence_jax.jobs import pipeline


def main(argv):
  del argv
  config, workdir, quiet, fault = cli.setup()
  es = pipeline.run_fit(config, workdir, quiet=quiet, fault=fault)
  logging.warning("Eigenspace (k=%d, top eigenvalue %.4g) saved in %s/eigenspace; spectrum in %s/spectrum.png",
                  es.k, float(es.eigenvalues[0]), workdir, workdir)


if __name__ == "__main__":
  app.run(main)
