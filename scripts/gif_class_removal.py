r"""GIF class removal: GIF / FIF / PIF / IF edits against retraining, over several seeds (docs/design.md, "The papers' methods").

  python scripts/gif_class_removal.py --config=configs/gif_class_removal_mlp.py --workdir=runs/gif_class_removal_mlp

See influence_jax/jobs/papers/gif_job.py for the metrics and the files written.
"""

from influence_jax.jobs import cli
from influence_jax.jobs.papers import gif_job

if __name__ == "__main__":
  cli.run(gif_job.job("class_removal"), gif_job.config_checker("class_removal"))
