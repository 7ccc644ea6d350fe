r"""The Hessian spectra of the clean, relabelled and corrected training examples of GIF label change (dense).

  python scripts/gif_spectrum.py --config=configs/gif_label_change_mlp.py --workdir=runs/gif_spectrum_mlp --config.seeds=3

See influence_jax/jobs/papers/gif_spectrum.py.
"""

from influence_jax.jobs import cli
from influence_jax.jobs.papers import gif_job, gif_spectrum

if __name__ == "__main__":
  cli.run(gif_spectrum.job, gif_job.config_checker("label_change"))
