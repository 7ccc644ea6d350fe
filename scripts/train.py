r"""Trains the built-in example model of a config (configs/digits_*.py, seq2seq_transformer.py) and
saves it with orbax in --workdir/model (or config.model_dir). Your own model: train it your way.

  python scripts/train.py --config=configs/digits_mlp.py --workdir=runs/digits_mlp

Training is single-process: run it once, then fit, project and score on as many processes as wanted.
"""

from absl import logging

from influence_jax.examples import tasks
from influence_jax.jobs import cli


def job(run):
  tasks.train_example(run.config, run.workdir, quiet=run.quiet)
  logging.warning("Model saved in %s", tasks.model_dir(run.config, run.workdir))


if __name__ == "__main__":
  cli.run(job)
