r"""GIF class removal: GIF / FIF / PIF / IF edits against retraining, over several seeds (docs/design.md, "The papers' methods").

  python scripts/gif_class_removal.py --config=configs/gif_class_removal_mlp.py --workdir=runs/gif_class_removal_mlp

See influence_jax/gif_pipeline.py for the metrics and the files written.
"""

from absl import app

from influence_jax.jobs import gif_pipeline

if __name__ == "__main__":
  app.run(gif_pipeline.job_main("class_removal"))
