r"""Trains the built-in example model, fits the eigenspace, projects the training set and scores the
queries, in one command (the README demo). Each stage resumes, or is skipped when done.

  python scripts/run_all.py --config=configs/digits_mlp.py --workdir=runs/digits_mlp

With the multi-process flags the model must already be trained (scripts/train.py, one process).
"""

from influence_jax.examples import tasks
from influence_jax.jobs import cli, stages


def job(run):
  tasks.train_example(run.config, run.workdir, quiet=run.quiet)
  ctx = run.context()
  paths = stages.all_stages(ctx, quiet=run.quiet, fault=run.fault)
  print("\n".join([f"Done. Results in {ctx.workdir}:"] + [f"  {name}: {path}" for name, path in paths.items()]))


if __name__ == "__main__":
  cli.run(job)
