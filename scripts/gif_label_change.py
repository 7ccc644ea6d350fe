r"""GIF label change: GIF / FIF / PIF / IF edits against retraining, over several seeds (docs/design.md, "The papers' methods").

  python scripts/gif_label_change.py --config=configs/gif_label_change_mlp.py --workdir=runs/gif_label_change_mlp

See influence_jax/jobs/papers/gif_job.py for the metrics and the files written.
"""

from influence_jax.jobs import cli
from influence_jax.jobs.papers import gif_job

if __name__ == "__main__":
  cli.run(gif_job.job("label_change"), gif_job.config_checker("label_change"))
