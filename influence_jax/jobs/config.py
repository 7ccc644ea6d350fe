"""Every job key with its default, and the checks run on a config before any work starts.

A config file starts from `default_config()`, sets `config.task = "my_pkg.my_module:get_task"`
and overrides what it needs; keys a task factory reads go under `config.user` (free-form) or a new
top-level section of its own (e.g. `config.model`). A key the jobs do not know inside one of their
sections (`config.arnoldi.topk`), or a new top-level key that is a near miss of one of theirs
(`config.scores`), is an error naming it with the key meant (`check_keys`), whether it was set in
the config file or by an override.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections
from ml_collections import config_dict

from influence_jax.config_keys import check_keys, unknown_keys  # noqa: F401 (the jobs' key check, re-exported)

CURVATURES = ("auto", "gauss_newton", "hessian")
NORMALIZATIONS = ("none", "relative", "cosine")


def default_config() -> ml_collections.ConfigDict:
  """Returns a ConfigDict with every job key and its default (see the comments for meanings)."""
  c = ml_collections.ConfigDict()
  c.task = ""  # "package.module:get_task": a factory returning influence_jax.jobs.Task.
  c.seed = 0  # Start vector of Arnoldi, curvature sample, sketch.
  c.workdir = ""  # Set by the jobs to --workdir (a task factory may read it); not part of any fingerprint.
  # Device mesh (data, model) of every stage; None: every device of every process on 'data'.
  c.mesh_shape = config_dict.placeholder(tuple)
  c.user = ml_collections.ConfigDict()  # Free-form keys for the task factory.
  c.arnoldi = dict(
      n_iters=150,  # Krylov steps (curvature products).
      top_k=100,  # Eigenpairs kept.
      damping=1e-2,  # δ in (Λ + δ)⁻¹.
      # "auto": Gauss-Newton when Task.loss_fn is a curvature.SplitLoss (the Flax adapters' losses are),
      # else the Hessian; or "gauss_newton" (needs a SplitLoss), "hessian" (exact, possibly indefinite).
      curvature="auto",
      selection="largest",  # or "magnitude"
      num_examples=8192,  # Size of the fixed curvature sample of the training set (-1: all of it).
      batch_size=2048,  # Examples per curvature batch.
      microbatch_size=0,  # Examples a curvature product takes at once; 0: ≤ 1 GiB of activations, ≤ batch_size.
      block_size=32,  # Gram-Schmidt block.
      # Measure ‖Cu − λu‖ for every kept pair (k more products, after the loop); False: the reports judge
      # convergence by Arnoldi's own estimates |β_m y_mj| (equal in exact arithmetic; full re-orthogonalisation
      # keeps them close), and the fit saves those products (k = 100 after 150 steps: 40 % of its products).
      residuals=True,
      residual_tol=1e-2,  # Reports: a pair with ‖Hu − λu‖ > residual_tol·|λ| is flagged unconverged.
      checkpoint_every=0,  # Save progress every N steps (0: by time only).
      checkpoint_seconds=60.0,  # Save progress at most this often.
  )
  c.project = dict(
      batch_size=1024,  # Training examples projected per step (global, over all processes).
      microbatch_size=0,  # Flat per-example gradients held at once; 0: chosen from the model size.
      chunk_rows=8192,  # Rows per store chunk (the unit of writing, resuming and verifying).
      sketch_dim=1024,  # m of the sketched remainder R(I − WᵀW)∇ℓ(z) (0: no sketch; the tail then needs it).
      # r exact coordinates V∇ℓ(z) on the top principal directions of the gradients outside the
      # eigenspace (influence_jax.residual_basis; at most p − k and residual_examples), W = [U; V].
      residual_rank=128,
      residual_examples=1024,  # Examples of the curvature sample the residual basis is fitted on.
      # dtype of the stored projections, residual coordinates and sketch: "float32", "bfloat16" (half the
      # bytes; its LDS cost in docs/eval_results.md) or "float16". Scores are accumulated in float32.
      store_dtype="float32",
      num_threads=8,  # grain reader threads.
      # Re-read every training example of a written store, compare each chunk's digest with the one
      # recorded when it was projected, and re-project the chunks that changed: a full read of the
      # training set (needed when the training set's files or version changed since the store was written).
      verify=False,
  )
  c.score = dict(
      top_k=10,  # Proponents and opponents kept per query.
      tail=True,  # Add the spectral tail through the store's sketch.
      # With tail: the inverse curvature of the query side (jobs/queries.py). "galerkin": exact on the
      # stored directions W = [U; V] ((W C Wᵀ + δI)⁻¹, formed once per store from k + r curvature products),
      # 1/c beyond; "tail": (Λ + δ)⁻¹ on U, 1/c beyond (the plain spectral tail).
      preconditioner="galerkin",
      # CG iterations refining it (started from and preconditioned with it) over the query-side sample,
      # solve_block queries at a time (per block 1 + cg_iters curvature passes); 0: no pass per query.
      cg_iters=0,
      solve_examples=0,  # Query-side sample: the first N examples of the curvature sample (0: all of it).
      solve_block=32,  # Queries solved together (p-vectors held: a few × solve_block).
      queries="",  # "module:fn" returning another query source (fn(config)); "": Task.queries.
      name="queries",  # Query set name: its tables, summary and progress in scores/<name>/.
      batch_size=256,  # Queries projected per step.
      rows_per_block=16384,  # Store rows scored per block (memory: queries × rows_per_block).
      # Rows of the self-influence ranking, scores/self_influence/*.csv (the highest; -1: every training example).
      self_influence_rows=10000,
      checkpoint_seconds=60.0,  # Save progress at most this often.
      checkpoint_every=0,  # ... and every N blocks (0: by time only).
      grid_examples=6,  # Queries shown in influence_grid.png (needs Task.image_fn).
      # The tables written, from one pass over the store: "none" (top_k.csv, the scores),
      # "relative" (top_k_relative.csv: score / √self-influence of z), "cosine" (top_k_cosine.csv:
      # score / (‖∇ℓ(x)‖‖∇ℓ(z)‖)); several comma-separated, e.g. "none,relative".
      normalize="none",
  )
  return c


# (key, check, what it must be). Checked for every config before a job starts.
_RULES = (
    ("arnoldi.n_iters", lambda v: v >= 1, "a positive integer"),
    ("arnoldi.top_k", lambda v: v >= 1, "a positive integer"),
    ("arnoldi.damping", lambda v: math.isfinite(v) and v >= 0, "a finite number ≥ 0"),
    ("arnoldi.curvature", lambda v: v in CURVATURES, "'auto', 'gauss_newton' or 'hessian'"),
    ("arnoldi.selection", lambda v: v in ("largest", "magnitude"), "'largest' or 'magnitude'"),
    ("arnoldi.num_examples", lambda v: v == -1 or v >= 1, "a positive integer or -1 (all)"),
    ("arnoldi.batch_size", lambda v: v >= 1, "a positive integer"),
    ("arnoldi.microbatch_size", lambda v: v >= 0, "≥ 0 (0: automatic)"),
    ("arnoldi.block_size", lambda v: v >= 1, "a positive integer"),
    ("arnoldi.checkpoint_every", lambda v: v >= 0, "≥ 0 (0: by time only)"),
    ("arnoldi.checkpoint_seconds", lambda v: v > 0, "a positive number of seconds"),
    ("project.batch_size", lambda v: v >= 1, "a positive integer"),
    ("project.microbatch_size", lambda v: v >= 0, "≥ 0 (0: automatic)"),
    ("project.chunk_rows", lambda v: v >= 1, "a positive integer"),
    ("project.sketch_dim", lambda v: v >= 0, "≥ 0"),
    ("project.residual_rank", lambda v: v >= 0, "≥ 0 (0: no residual basis)"),
    ("project.residual_examples", lambda v: v >= 1, "a positive integer"),
    ("project.store_dtype", lambda v: v in ("float32", "bfloat16", "float16"), "'float32', 'bfloat16' or 'float16'"),
    ("project.num_threads", lambda v: v >= 1, "a positive integer"),
    ("project.verify", lambda v: isinstance(v, bool), "True or False"),
    ("score.top_k", lambda v: v >= 1, "a positive integer"),
    ("score.name", lambda v: isinstance(v, str) and v not in ("", ".", "..", "self_influence") and "/" not in v
     and "\\" not in v, "a directory name (not empty, no '/', not 'self_influence')"),
    ("score.cg_iters", lambda v: v >= 0, "≥ 0 (0: the preconditioner alone)"),
    ("score.preconditioner", lambda v: v in ("galerkin", "tail"), "'galerkin' or 'tail'"),
    ("score.solve_examples", lambda v: v >= 0, "≥ 0 (0: the whole curvature sample)"),
    ("score.solve_block", lambda v: v >= 1, "a positive integer"),
    ("score.batch_size", lambda v: v >= 1, "a positive integer"),
    ("score.rows_per_block", lambda v: v >= 1, "a positive integer"),
    ("score.self_influence_rows", lambda v: v == -1 or v >= 0, "≥ 0, or -1 (all)"),
    ("score.checkpoint_seconds", lambda v: v > 0, "a positive number of seconds"),
    ("score.checkpoint_every", lambda v: v >= 0, "≥ 0 (0: by time only)"),
    ("score.grid_examples", lambda v: v >= 0, "≥ 0"),
    ("arnoldi.residual_tol", lambda v: math.isfinite(v) and v > 0, "a positive number"),
    ("score.normalize", lambda v: bool(normalizations(v)), "'none', 'relative', 'cosine' or several of them "
     "comma-separated (e.g. 'none,relative')"),
)


def normalizations(value: Any) -> tuple:
  """Returns the tables score.normalize asks for, e.g. "none,relative" -> ("none", "relative");
  () when the value is not a comma-separated list of NORMALIZATIONS without repeats."""
  if not isinstance(value, str):
    return ()
  names = tuple(v.strip() for v in value.split(","))
  if not names or any(n not in NORMALIZATIONS for n in names) or len(set(names)) != len(names):
    return ()
  return names


def resolve_curvature(requested: str, loss_fn: Any) -> tuple:
  """Returns (curvature, why): the curvature the fit uses for arnoldi.curvature = `requested`.

  "auto" is "gauss_newton" when `loss_fn` is a `curvature.SplitLoss` (positive semi-definite for a
  convex output loss such as cross-entropy: H + δI is then positive definite for any δ > 0), else
  "hessian". Raises ValueError for "gauss_newton" with a loss that is not a SplitLoss.
  """
  from influence_jax.curvature import SplitLoss  # noqa: PLC0415 (jax after the flags)

  split = isinstance(loss_fn, SplitLoss)
  if requested == "auto":
    if split:
      return "gauss_newton", "arnoldi.curvature='auto': Task.loss_fn is a SplitLoss, so Gauss-Newton"
    return "hessian", ("arnoldi.curvature='auto': Task.loss_fn is not a SplitLoss (no outputs to take a "
                       "Gauss-Newton product through), so the Hessian")
  if requested == "gauss_newton" and not split:
    raise ValueError("config.arnoldi.curvature = 'gauss_newton' needs Task.loss_fn as an "
                     "influence_jax.SplitLoss(outputs_fn, output_loss_fn, regularizer) (ij.linen_loss_fns and "
                     f"ij.nnx_loss_fns return one); got {type(loss_fn).__name__}. Use 'hessian' or 'auto'.")
  return requested, f"arnoldi.curvature={requested!r}"


def check_job_keys(config) -> None:
  """`check_keys` against `default_config()`: the check of the fit, project, score, train and run_all jobs
  (config.user and new top-level sections are the task's own)."""
  check_keys(config, default_config(), what="the jobs", defaults="influence_jax.jobs.default_config()",
             free=("user",))


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def validate(config) -> None:
  """Raises ValueError naming the first config key that is missing or out of range."""
  check_job_keys(config)
  if not config.get("task"):
    raise ValueError("config.task is not set: it must name a task factory, 'package.module:get_task'.")
  top_k = None
  for key, ok, expected in _RULES:
    try:
      value = _get(config, key)
    except (KeyError, AttributeError):
      raise ValueError(f"config.{key} is missing; start the config from influence_jax.jobs.default_config().")
    try:
      good = bool(ok(value))
    except TypeError:
      good = False
    if not good:
      raise ValueError(f"config.{key} = {value!r}: it must be {expected}.")
    if key == "arnoldi.top_k":
      top_k = value
  if top_k > config.arnoldi.n_iters:
    raise ValueError(f"config.arnoldi.top_k = {top_k} exceeds config.arnoldi.n_iters = {config.arnoldi.n_iters}: "
                     "Arnoldi cannot find more eigenpairs than it takes steps.")
