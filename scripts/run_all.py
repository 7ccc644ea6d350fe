r"""Train, fit the eigenspace and score in one command (the README demo). Each stage resumes.

  python scripts/run_all.py --config=configs/digits_mlp.py --workdir=runs/digits_mlp

With the multi-process flags (--coordinator_address, --num_processes, --process_id) the model must
already be trained (scripts/train.py, one process); fit and score then run on all processes.
"""

from absl import app

from influence_jax.jobs import cli
from influence_jax.jobs import pipeline


def main(argv):
  del argv
  config, workdir, quiet, fault = cli.setup()
  pipeline.run_train(config, workdir, quiet=quiet)
  es = pipeline.run_fit(config, workdir, quiet=quiet, fault=fault)
  paths = pipeline.run_score(config, workdir, quiet=quiet, fault=fault)
  lines = [f"Done. Results in {workdir}:",
           f"  eigenvalues (k={es.k}): {workdir}/eigenvalues.json, picture {workdir}/spectrum.png"]
  lines += [f"  {name}: {path}" for name, path in paths.items()]
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
