r"""Labels every training point memorized / generalizes (docs/design.md, "The papers' methods") on digits with flipped labels.

Writes --workdir/{memorization.csv, histogram.png, metrics.json} and prints the metrics.

  python scripts/memorization.py --config=configs/memorization_digits.py --workdir=runs/memorization
"""

import json

from absl import app

from influence_jax.jobs import cli
from influence_jax.jobs import memorization_pipeline


def main(argv):
  del argv
  config, workdir, _, _ = cli.setup()
  metrics = memorization_pipeline.run_memorization(config, workdir)
  print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
  app.run(main)
