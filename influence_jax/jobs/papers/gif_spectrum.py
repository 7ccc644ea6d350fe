"""The curvature a label change's edit sees, measured: the spectra of the Hessians of the clean examples, the
relabelled examples and the corrected training set (dense, for models small enough; scripts/gif_spectrum.py).

For each seed of a label-change config the original model is trained on the corrupted labels (as `gif_job`
does), then the Hessian of the mean cross-entropy (no L2 term) is formed densely (jax.hessian) on three row
sets: "clean" (the never-corrupted examples, the authors' curvature), "relabelled" (the corrupted examples with
their corrected labels) and "edited" (all examples, corrected labels: the mean of the two, weighted by their
counts). Reported per set: the smallest and largest eigenvalue and the sum of the negative ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from influence_jax import io as io_lib
from influence_jax import paths as paths_lib
from influence_jax.jobs.papers import gif_job
from influence_jax.methods import gif_tasks
from influence_jax.methods import training

MAX_PARAMS = 5000  # A dense p × p Hessian: the MLP's 2,410 parameters, not the TinyNet's 102,282.


def spectrum(per_example_loss_fn, params, batch) -> dict:
  """Returns {"min", "max", "negative_sum"} of the eigenvalues of the Hessian of mean(per_example_loss_fn)."""
  flat, unravel = ravel_pytree(params)
  h = jax.hessian(lambda v: jnp.mean(per_example_loss_fn(unravel(v), batch)))(flat)
  w = np.linalg.eigvalsh(np.asarray(h, np.float64))
  return {"min": float(w[0]), "max": float(w[-1]), "negative_sum": float(w[w < 0].sum())}


def seed_spectra(config, seed: int, models, optimizer) -> dict:
  """Returns {row set: spectrum} for the original model of `seed` (clean, relabelled, edited)."""
  m = gif_job.label_change_models(config, seed, models, optimizer)
  fixed = {"x": m.wrong_b["x"], "y": m.train_b["y"]}
  ce = models.fns.per_example_loss_fn
  sets = {"clean": ~m.changed, "relabelled": m.changed, "edited": np.ones_like(m.changed)}
  return {name: spectrum(ce, m.params, gif_tasks.select_examples(fixed, rows)) for name, rows in sets.items()}


def run(config, workdir: str) -> str:
  """Writes workdir/results.json ({"seeds": [{set: spectrum}], "config"}) after every seed; returns its path."""
  models = gif_job.Models(config)
  p = ravel_pytree(models.fns.params)[0].size
  if p > MAX_PARAMS:
    raise ValueError(f"The model has {p} parameters; a dense Hessian is formed only up to {MAX_PARAMS}.")
  paths_lib.makedirs(workdir)
  optimizer = training.optimizer_from_config(config.train)
  path = paths_lib.join(workdir, "results.json")
  per_seed = []
  for seed in range(config.seeds):
    per_seed.append(seed_spectra(config, seed, models, optimizer))
    io_lib.atomic_write_json(path, {"config": config.to_dict(), "num_params": int(p), "seeds": per_seed})
  return path


def job(invocation) -> None:
  """The `cli.run` job: the spectra of config.seeds label-change models (a GIF label-change config)."""
  if invocation.config.gif_task != "label_change":
    raise ValueError("gif_spectrum needs a label-change config (configs/gif_label_change_mlp.py).")
  print(run(invocation.config, invocation.workdir))
