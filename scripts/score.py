r"""Projects the training set on the eigenspace once, scores every test example, writes the tables.

Writes --workdir/scores/{top_k.csv, self_influence.csv, influence_grid.png, projections/};
resumes from --workdir/scores/progress when run again after an interruption.

  python scripts/score.py --config=configs/digits_mlp.py --workdir=runs/digits_mlp

On several processes run the same command in each, sharing --workdir, with
--coordinator_address=HOST0:PORT --num_processes=N --process_id=I: each projects only its own
slice of the training set (config.score.batch_size is the global batch; the mesh's 'data' axis a
multiple of N); process 0 writes the tables, pictures and projection shards.
"""

from absl import app, logging

from influence_jax.jobs import cli
from influence_jax.jobs import pipeline


def main(argv):
  del argv
  config, workdir, quiet, fault = cli.setup()
  paths = pipeline.run_score(config, workdir, quiet=quiet, fault=fault)
  for name, path in paths.items():
    logging.warning("%s: %s", name, path)


if __name__ == "__main__":
  app.run(main)
