r"""Trains the config's example model and saves it with orbax in --workdir/model.

  python scripts/train.py --config=configs/digits_mlp.py --workdir=runs/digits_mlp

Training is single-process: run it once, then fit and score on as many processes as wanted.
"""

from absl import app, logging

from influence_jax.jobs import cli
from influence_jax.jobs import pipeline


def main(argv):
  del argv
  config, workdir, quiet, _ = cli.setup()
  pipeline.run_train(config, workdir, quiet=quiet)
  logging.warning("Model saved in %s/model", workdir)


if __name__ == "__main__":
  app.run(main)
