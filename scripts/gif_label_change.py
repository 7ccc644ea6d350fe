r"""GIF label change: GIF / FIF / PIF / IF edits against retraining, over several seeds (DESIGN §4).

  python scripts/gif_label_change.py --config=configs/gif_label_change_mlp.py --workdir=runs/gif_label_change_mlp

See influence_jax/gif_pipeline.py for the metrics and the files written.
"""

from absl import app

from influence_jax import cli, gif_pipeline


def main(argv):
  del argv
  config, workdir, quiet, _ = cli.setup()
  if config.task != "label_change":
    raise ValueError(f"config.task is {config.task!r}; this job runs 'label_change' (use configs/gif_label_change_*.py).")
  paths = gif_pipeline.run(config, workdir, quiet=quiet)
  with open(paths["md"]) as f:
    print(f.read())
  print("\n".join(f"  {k}: {v}" for k, v in paths.items()))


if __name__ == "__main__":
  app.run(main)
