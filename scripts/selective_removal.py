r"""Selective removal of memorized points during training, against no and random removal (docs/design.md, "The papers' methods").

Writes --workdir/{removal.md, removal.json} and prints the table.

  python scripts/selective_removal.py --config=configs/selective_removal_digits.py --workdir=runs/removal
"""

from influence_jax.jobs import cli
from influence_jax.jobs.papers import memorization_job


def job(run):
  print(memorization_job.run_selective_removal(run.config, run.workdir)["table"])


if __name__ == "__main__":
  cli.run(job, memorization_job.config_checker('selective_removal'))
