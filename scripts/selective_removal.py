r"""Selective removal of memorized points during training, against no and random removal (docs/design.md, "The papers' methods").

Writes --workdir/{removal.md, removal.json} and prints the table.

  python scripts/selective_removal.py --config=configs/selective_removal_digits.py --workdir=runs/removal
"""

from absl import app

from influence_jax.jobs import cli
from influence_jax.jobs import memorization_pipeline


def main(argv):
  del argv
  config, workdir, _, _ = cli.setup()
  print(memorization_pipeline.run_selective_removal(config, workdir)["table"])


if __name__ == "__main__":
  app.run(main)
