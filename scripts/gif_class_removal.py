r"""GIF class removal: GIF / FIF / PIF / IF edits against retraining, over several seeds (DESIGN §4).

  python scripts/gif_class_removal.py --config=configs/gif_class_removal_mlp.py --workdir=runs/gif_class_removal_mlp

See influence_jax/gif_pipeline.py for the metrics and the files written.
"""

from absl import app

from influence_jax import cli, gif_pipeline


def main(argv):
  del argv
  config, workdir, quiet, _ = cli.setup()
  if config.task != "class_removal":
    raise ValueError(f"config.task is {config.task!r}; this job runs 'class_removal' (use configs/gif_class_removal_*.py).")
  paths = gif_pipeline.run(config, workdir, quiet=quiet)
  with open(paths["md"]) as f:
    print(f.read())
  print("\n".join(f"  {k}: {v}" for k, v in paths.items()))


if __name__ == "__main__":
  app.run(main)
