r"""Scores a query set against the projection store: top proponents and opponents of every query, and
the training set ranked by self-influence. Only the queries are projected.

  python scripts/score.py --config=configs/digits_mlp.py --workdir=runs/digits_mlp  # scores/queries/
  # another query set, same store: its outputs in --workdir/scores/NAME/ (the self-influence ranking, a
  # property of the store, in scores/self_influence/, one file per damping and tail setting)
  python scripts/score.py --config=... --workdir=... --config.score.queries=my_pkg.data:other_queries \
      --config.score.name=NAME
"""

from absl import logging

from influence_jax.jobs import cli, stages


def job(run):
  for name, path in stages.score_stage(run.context(), quiet=run.quiet, fault=run.fault).items():
    logging.warning("%s: %s", name, path)


if __name__ == "__main__":
  cli.run(job)
