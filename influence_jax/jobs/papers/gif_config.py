"""The GIF jobs' configs: every key with its default (`default_config`) and the check of a config's keys.

Label change defaults to the GIF authors' protocol (hslyu/GIF, the backdoor-relabelling notebook):
the curvature of the cross-entropy (no L2 term, no damping) on up to 2,048 never-corrupted training
examples, their Neumann iteration (1,000 iterations, normaliser from 1, + 5 on divergence), 5 % of
each layer by output ranking with the leftover of the partly taken unit filled at random, the faint
whole-image checkerboard trigger on 10 % of the training images drawn among all classes.
"""

from __future__ import annotations

from typing import Callable

import ml_collections

from influence_jax.jobs import config as config_lib

TASKS = ("class_removal", "label_change")
SPREADS = ("seeds", "redraws")


def _edit_defaults() -> dict:
  return dict(
      ratios=(0.1, 0.3, 0.5),  # Fraction of each Dense/Conv layer's parameters in the target set (exact budget).
      selections=("gradient",),  # Unit ranking: "output", "gradient" or "random".
      partial_fill="first",  # Leftover budget in the partly taken unit: "first" kernel entries or "random" ones.
      methods=("gif", "fif", "pif", "if"),
      solvers=("neumann", "cg"),  # Every edit is solved by each; one row per solver.
      neumann_iters=30,  # The authors' early-stopped Neumann iteration (no damping).
      neumann_normaliser=1.0,
      neumann_rule="multiply",  # On divergence: "multiply" (n ← growth·n) or "add" (n ← n + growth, the authors').
      neumann_growth=1.25,
      neumann_max_restarts=200,
      damping=1e-3,  # CG only: added to the curvature.
      curvature="hessian",  # or "gauss_newton"
      curvature_l2=True,  # The curvature's loss includes the training L2 term (False: cross-entropy only).
      hessian_examples=-1,  # Examples the curvature averages over (-1: all of its data).
      cg_max_iters=100,
      cg_tol=1e-5,
      scales=(0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0),
      walk_step=0.25,  # The walks' step, in units of the update Δ.
      walk_max_steps=256,
      walk_patience=64,  # Steps without a better score before the coarse walk stops (f1 has plateaus).
  )


def _label_change(c: ml_collections.ConfigDict) -> None:
  """Sets the authors' label-change protocol on `c` (see the module docstring)."""
  e = c.edit
  e.ratios = (0.05,)
  e.selections = ("output",)
  e.partial_fill = "random"
  e.solvers = ("neumann",)
  e.neumann_iters = 1000
  e.neumann_rule = "add"
  e.neumann_growth = 5.0
  e.curvature_l2 = False
  e.hessian_examples = 2048
  e.curvature_data = "clean"  # "clean": never-corrupted examples only (the authors); "edited": the corrected set.
  e.spread = "seeds"  # "seeds": config.seeds retrained models; "redraws": `redraws` draws of the edited subset.
  e.redraws = 10  # On the model of config.seed; each draw edits `redraw_fraction` of the corrupted examples.
  e.redraw_fraction = 0.68  # The authors: 4,096 of their 6,000 corrupted images.
  c.corruption = dict(
      kind="trigger",  # "trigger": datasets.add_trigger (trigger + target label); "flip": datasets.flip_labels.
      fraction=0.1,  # Of the training examples (the authors: 10 %).
      target_class=7,  # The trigger's label (unused by "flip").
      trigger="checkerboard",  # "checkerboard": + amount on alternate pixels (the authors'); "corner": a patch.
      amount=16.0 / 255.0,  # checkerboard only.
      trigger_size=3,  # corner only.
      include_target=True,  # Draw the triggered examples among all classes (the authors) or the others only.
  )


def default_config(gif_task: str = "class_removal") -> ml_collections.ConfigDict:
  """Returns every key of a GIF job, at the MLP's values; `gif_task` ("class_removal" or "label_change")
  picks the edit (label change: the authors' protocol, module docstring)."""
  if gif_task not in TASKS:
    raise ValueError(f"Unknown gif_task {gif_task!r}; expected one of {TASKS}.")
  c = ml_collections.ConfigDict()
  c.gif_task = gif_task
  c.seed = 0  # Builds the model (and, with edit.spread = "redraws", is the one trained model's seed).
  c.seeds = 5  # Each of the `seeds` runs uses its own seed for data, init and selection.
  c.data = dict(name="digits", test_fraction=0.2, num_train=-1, num_test=-1)
  c.model = dict(name="mlp", features=(32,), num_classes=10, activation="tanh", upsample=4)  # upsample: tinynet
  # Retraining too; momentum: sgd only; l2 (½‖θ‖² inside every example's loss) is SGD's weight decay.
  c.train = dict(optimizer="adam", learning_rate=3e-3, num_epochs=60, batch_size=128, l2=1e-3, momentum=0.9)
  c.edit = _edit_defaults()
  if gif_task == "class_removal":
    c.edit.removed_class = 8
  else:
    _label_change(c)
  return c


def check(config) -> None:
  """Raises ValueError naming the first bad value among the GIF job's option keys."""
  e = config.edit
  choices = [("edit.partial_fill", e.partial_fill, ("first", "random")),
             ("edit.neumann_rule", e.neumann_rule, ("multiply", "add"))]
  if config.gif_task == "label_change":
    choices += [("edit.curvature_data", e.curvature_data, ("edited", "clean")), ("edit.spread", e.spread, SPREADS)]
    if config.corruption.kind == "trigger":
      choices.append(("corruption.trigger", config.corruption.trigger, ("corner", "checkerboard")))
  for key, value, allowed in choices:
    if value not in allowed:
      raise ValueError(f"config.{key} = {value!r}; expected one of {allowed}.")
  if config.gif_task == "label_change" and e.spread == "redraws" and (e.redraws < 1 or not 0 < e.redraw_fraction <= 1):
    raise ValueError(f"config.edit.redraws must be ≥ 1 and redraw_fraction in (0, 1]; got {e.redraws}, "
                     f"{e.redraw_fraction}.")


def config_checker(gif_task: str) -> Callable:
  """Returns the `cli.run` check of a GIF job's config: every key must be one of
  `default_config(config.gif_task)`'s (a config for the other task is refused by the job itself)."""

  def check_keys(config) -> None:
    kind = config.get("gif_task", gif_task)
    kind = kind if kind in TASKS else gif_task
    config_lib.check_keys(config, default_config(kind), what=f"the GIF {kind} job", new_top_level=False,
                          defaults=f"influence_jax.jobs.papers.gif_config.default_config({kind!r})")

  return check_keys
