"""The command-line jobs' work as library functions: train, fit the eigenspace, score.

Each stage reads an ml_collections config and a work directory, writes its
outputs atomically, and resumes from its last checkpoint when run again.
Progress made from a different model, config or data set is refused
(checkpoint.FingerprintMismatch), never mixed in.

Work directory layout:
  model/              orbax: the trained variables (+ JSON: fingerprint, accuracy)
  arnoldi_progress/   orbax: Arnoldi state every `arnoldi.checkpoint_every` steps
  eigenspace/         orbax: the fitted Eigenspace
  eigenvalues.json    eigenvalues, residuals, Ritz estimates, how it was fitted
  spectrum.png        the eigenvalue spectrum
  scores/progress/    orbax: running top-k every `score.checkpoint_every` batches
  scores/projections/ train_00000.npy, …: the (B, k) projections G(z) = U∇ℓ(z), a shard a batch;
                      ids_00000.npy, …: their rows in the training split
  scores/top_k.csv    per test example its top proponents and opponents
  scores/self_influence.csv   training examples ranked by self-influence
  scores/influence_grid.png   test images with their top proponents / opponents

Sharded and multi-process (DESIGN §3). `config.mesh_shape` (data, model) lays
fit and score out on a device mesh over all devices of all processes (None:
every device on 'data'; with a single device and no mesh_shape, no mesh at
all: the one-device code path). With several processes (cli flags
--coordinator_address/--num_processes/--process_id, every process running the
same job on a shared work directory):
- the curvature batches are host data, the same on every process;
- when scoring, each process projects only its own contiguous slice of the
  training set (`sharding.process_slice`), fed into global batches of
  `config.score.batch_size` examples (`sharding.global_batches`; every process
  runs the same number of steps, the last batch padded and masked);
- orbax checkpoints (model, Arnoldi progress, eigenspace, scoring progress)
  are saved and restored by every process together; restore targets carry
  this run's shardings, so an eigenspace or progress saved on one mesh loads
  on another;
- the projections (k numbers an example) are gathered to every process and
  process 0 alone writes the shared outputs: the JSON, CSV and PNG files and
  the projection shards. Shard train_NNNNN.npy holds the real (unmasked) rows
  of global batch NNNNN, which come from every process's slice, and
  ids_NNNNN.npy their row numbers in the training split (written on one
  process too, where they are consecutive); tables are in row-number order.
Training is single-process (a model trained once is loaded by every process).
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import signal
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.flatten_util import ravel_pytree

from influence_jax import arnoldi
from influence_jax import checkpoint
from influence_jax.jobs import common
from influence_jax import data as data_lib
from influence_jax.examples import datasets
from influence_jax import eigenspace as eigenspace_lib
from influence_jax import flax_adapters
from influence_jax.examples import models
from influence_jax.jobs import plots
from influence_jax.jobs import progress as progress_lib
from influence_jax import projection
from influence_jax import scoring
from influence_jax import sharding
from influence_jax.examples import training


class Task(NamedTuple):
  """A data set and the model trained on it.

  splits: {"train": batch, "test": batch}, each with an "id" leaf of global example ids.
  module: the Linen module; per_example_loss(outputs, labels) -> (B,).
  input_key / label_key: batch keys fed to the module and used as labels.
  image_side: side of square images for pictures (None when not images).
  """

  splits: dict
  module: Any
  per_example_loss: Any
  input_key: Any
  label_key: str
  image_side: Optional[int]


def _limit(batch: dict, n: int) -> dict:
  return batch if n is None or n < 0 else data_lib.take(batch, 0, min(n, data_lib.batch_size(batch)))


def build_task(config: ml_collections.ConfigDict) -> Task:
  """Returns the Task named by config.data.name and config.model.name."""
  d, m = config.data, config.model
  if d.name == "digits":
    splits = datasets.load_digits(test_fraction=d.test_fraction, seed=config.seed, image=m.name == "cnn")
    if d.get("label_noise", 0.0):
      y, _ = datasets.flip_labels(splits["train"]["y"], d.label_noise, 10, config.seed)
      splits["train"] = dict(splits["train"], y=y)
    inputs, labels, loss, side = "x", "y", models.softmax_cross_entropy, 8
  elif d.name == "seq2seq":
    raw = datasets.synthetic_seq2seq(d.num_examples, d.seq_len, d.vocab_size, config.seed, task=d.task)
    splits = datasets.split(raw, int(round(d.test_fraction * d.num_examples)))
    inputs, labels, loss, side = ("src", "tgt"), "tgt", models.sequence_cross_entropy, None
  else:
    raise ValueError(f"Unknown config.data.name {d.name!r}; expected 'digits' or 'seq2seq'.")
  splits = {"train": _limit(splits["train"], d.get("num_train", -1)),
            "test": _limit(splits["test"], d.get("num_test", -1))}
  if m.name == "mlp":
    module = models.MLP(features=tuple(m.features), num_classes=m.num_classes, activation=m.activation)
  elif m.name == "cnn":
    module = models.CNN(features=tuple(m.features), num_classes=m.num_classes)
  elif m.name == "transformer":
    if d.name != "seq2seq":
      raise ValueError("config.model.name='transformer' needs config.data.name='seq2seq'.")
    module = models.Transformer(vocab_size=d.vocab_size, max_len=d.seq_len, d_model=m.d_model,
                                num_heads=m.num_heads, d_ff=m.d_ff, num_layers=m.num_layers)
  else:
    raise ValueError(f"Unknown config.model.name {m.name!r}; expected 'mlp', 'cnn' or 'transformer'.")
  return Task(splits, module, loss, inputs, labels, side)


def _inputs(task: Task, batch: dict) -> tuple:
  keys = (task.input_key,) if isinstance(task.input_key, str) else task.input_key
  return tuple(jnp.asarray(batch[k][:2]) for k in keys)


def init_variables(task: Task, config) -> Any:
  """Returns freshly initialised variables of the task's module (seeded by config.seed)."""
  return task.module.init(jax.random.key(config.seed), *_inputs(task, task.splits["train"]))


def model_fns(task: Task, variables: Any, config) -> flax_adapters.ModelFns:
  """Returns loss_fn / per_example_loss_fn over the trainable params (L2 from config.train.l2)."""
  return flax_adapters.linen_loss_fns(task.module, variables, task.per_example_loss,
                                      input_key=task.input_key, label_key=task.label_key, l2=config.train.l2)


def _data_fingerprint(task: Task) -> str:
  return checkpoint.fingerprint(task.splits)


def model_fingerprint(config, task: Task) -> str:
  """Returns the hash of everything the trained model depends on."""
  return checkpoint.fingerprint(config.seed, config.data.to_dict(), config.model.to_dict(),
                                config.train.to_dict(), _data_fingerprint(task))


def eigenspace_fingerprint(config, task: Task) -> str:
  return checkpoint.fingerprint(model_fingerprint(config, task), config.arnoldi.to_dict())


def scores_fingerprint(config, task: Task) -> str:
  return checkpoint.fingerprint(eigenspace_fingerprint(config, task), config.score.to_dict())


def job_mesh(config) -> Optional[jax.sharding.Mesh]:
  """Returns the mesh of fit and score: `sharding.make_mesh(config.mesh_shape)` over all devices of all
  processes, or None (the one-device path) when there is one device and no config.mesh_shape."""
  shape = config.get("mesh_shape", None)
  if shape is None and jax.device_count() == 1:
    return None
  return sharding.make_mesh(shape)


# ----------------------------------------------------------------------------- train


def evaluate(task: Task, fns: flax_adapters.ModelFns, params) -> dict:
  """Returns {"train_loss", "test_loss", "train_accuracy", "test_accuracy"} (accuracy per label token)."""
  out = {}
  for split, batch in task.splits.items():
    logits = jax.jit(fns.logits_fn)(params, batch)
    out[f"{split}_loss"] = float(jnp.mean(jax.jit(fns.per_example_loss_fn)(params, batch)))
    out[f"{split}_accuracy"] = float(jnp.mean(jnp.argmax(logits, -1) == batch[task.label_key]))
  return out


def run_train(config, workdir: str, *, quiet: bool = False) -> Any:
  """Trains the task's model (or loads it if already trained with this config); returns the variables."""
  task = build_task(config)
  store = checkpoint.Store(os.path.join(workdir, "model"), model_fingerprint(config, task), max_to_keep=1)
  template = init_variables(task, config)
  found = store.restore_latest(target=template)
  if found is not None:
    logging.info("Model already trained in %s (%s)", store.directory, found[2].get("metrics"))
    store.close()
    return found[1]
  if jax.process_count() > 1:
    store.close()
    raise ValueError(f"No trained model in {store.directory}: training is single-process; run "
                     "scripts/train.py once without the multi-process flags, then fit and score.")
  fns = model_fns(task, template, config)
  t = config.train
  if not quiet:
    logging.info("Training %s (%d params) on %d examples for %d epochs", config.model.name,
                 models.num_params(fns.params), data_lib.batch_size(task.splits["train"]), t.num_epochs)
  train_batch = {k: v for k, v in task.splits["train"].items() if k != "id"}
  params, history = training.train(fns.loss_fn, fns.params, train_batch, optimizer=common.optimizer_from_config(config.train),
                                   num_epochs=t.num_epochs, batch_size=t.batch_size, seed=config.seed)
  variables = fns.merge(params)
  metrics = evaluate(task, fns, params)
  logging.info("Trained: %s", metrics)
  store.save(0, variables, {"metrics": metrics, "final_loss": history["final_loss"]})
  store.close()
  return variables


def load_model(config, workdir: str) -> tuple[Task, Any]:
  """Returns (task, variables) of the model trained in `workdir` with this config."""
  task = build_task(config)
  store = checkpoint.Store(os.path.join(workdir, "model"), model_fingerprint(config, task), max_to_keep=1)
  found = store.restore_latest(target=init_variables(task, config))
  store.close()
  if found is None:
    raise FileNotFoundError(f"No trained model in {workdir}/model: run scripts/train.py first.")
  return task, found[1]


# ----------------------------------------------------------------------------- fit


def hessian_batches(task: Task, config) -> list:
  """Returns the fixed list of batches the curvature is averaged over (config.arnoldi)."""
  train = _limit({k: v for k, v in task.splits["train"].items() if k != "id"}, config.arnoldi.num_examples)
  return list(data_lib.iterate(train, config.arnoldi.batch_size))


def run_fit(config, workdir: str, *, quiet: bool = False, fault: Optional[str] = None) -> eigenspace_lib.Eigenspace:
  """Fits (or loads, or resumes) the eigenspace; writes eigenvalues.json and spectrum.png.

  On a mesh (`job_mesh`) the Krylov basis and eigenvectors are split over
  'model' and the curvature batches over 'data'; the eigenspace comes back
  laid out on that mesh.
  """
  task, variables = load_model(config, workdir)
  mesh = job_mesh(config)
  fp = eigenspace_fingerprint(config, task)
  final_dir = os.path.join(workdir, "eigenspace")
  if os.path.isdir(final_dir):
    try:
      return checkpoint.load_eigenspace(final_dir, fingerprint=fp, mesh=mesh)
    except FileNotFoundError:
      pass  # A directory with no finished step: fit again.
  fns = model_fns(task, variables, config)
  a = config.arnoldi
  dtype = ravel_pytree(fns.params)[0].dtype
  num_params = models.num_params(fns.params)
  template = arnoldi.init(eigenspace_lib.start_vector(num_params, dtype, config.seed, mesh=mesh),
                          a.n_iters, block_size=a.block_size)
  columns = sharding.padded_dim(num_params, mesh)
  # A basis padded for another 'model' size has other columns: not this job's progress.
  store = checkpoint.Store(os.path.join(workdir, "arnoldi_progress"),
                           fp if columns == num_params else checkpoint.fingerprint(fp, columns))
  found = store.restore_latest(target=template._asdict())
  state = arnoldi.ArnoldiState(**found[1]) if found is not None else template
  bar = progress_lib.Progress(a.n_iters, "arnoldi", "iterations", start=int(state.num_steps),
                              quiet=quiet or not common.is_writer())

  def callback(s: arnoldi.ArnoldiState) -> None:
    bar.update()
    step = int(s.num_steps)
    if step % a.checkpoint_every == 0 and step < a.n_iters and not bool(s.breakdown):
      store.save(step, s._asdict())
    common.maybe_kill(fault, "arnoldi", step)

  es = eigenspace_lib.fit_eigenspace(
      fns.loss_fn, fns.params, hessian_batches(task, config), n_iters=a.n_iters, top_k=a.top_k,
      damping=a.damping, curvature=a.curvature, seed=config.seed, selection=a.selection,
      microbatch_size=a.microbatch_size or None, block_size=a.block_size, callback=callback,
      initial_state=state, mesh=mesh)
  checkpoint.save_eigenspace(final_dir, es, fingerprint=fp)
  store.close()
  _write_spectrum(workdir, es, config)
  return es


def _write_spectrum(workdir: str, es: eigenspace_lib.Eigenspace, config) -> None:
  """Writes eigenvalues.json and spectrum.png (process 0; every process must call it)."""
  host = {name: sharding.to_host(getattr(es, name)) for name in ("eigenvalues", "residuals", "ritz_estimates")}
  if not common.is_writer():
    return
  record = {
      "eigenvalues": host["eigenvalues"].astype(np.float64).tolist(),
      "residuals": host["residuals"].astype(np.float64).tolist(),
      "ritz_estimates": host["ritz_estimates"].astype(np.float64).tolist(),
      "damping": es.damping,
      "arnoldi": config.arnoldi.to_dict(),
      "num_steps": es.info.num_steps,
      "breakdown": es.info.breakdown,
      "num_params": es.info.num_params,
      "num_examples": es.info.num_examples,
  }
  common.atomic_write_text(os.path.join(workdir, "eigenvalues.json"), json.dumps(record, indent=1))
  plots.spectrum(os.path.join(workdir, "spectrum.png"), host["eigenvalues"], host["residuals"], es.damping,
                 title=f"{config.model.name}: top-{es.k} {config.arnoldi.curvature} eigenvalues")


# ----------------------------------------------------------------------------- score


def _without_ids(batch: dict) -> dict:
  return {k: v for k, v in batch.items() if k != "id"}


def _test_projections(es, fns, test_batch: dict, s, mesh) -> tuple:
  """Returns (directions, test_proj on the host): [U; test gradients] with the tail, else U."""
  kw = dict(method=s.method, microbatch_size=s.microbatch_size or None, mesh=mesh)
  directions = es.eigenvectors
  if s.tail:
    grads = projection.gradients(fns.per_example_loss_fn, fns.params, [test_batch], mesh=mesh)
    grads = grads.astype(directions.dtype)
    test_proj = grads @ es.eigenvectors.T
    directions = jnp.concatenate([directions, grads])
  else:
    test_proj = projection.project_on(directions, fns.per_example_loss_fn, fns.params,
                                      data_lib.iterate(test_batch, s.batch_size), **kw).values
  return directions, sharding.to_host(test_proj)


def _train_batches(train: dict, s, mesh) -> tuple:
  """Returns (num_batches, start ↦ iterator of (batch, rows, mask)) over the training split.

  rows: the batch's row numbers in the split; mask: True on real rows. Without
  a mesh: host batches of s.batch_size in order (no padding, mask all True).
  On a mesh: global batches of s.batch_size examples, each process feeding
  only its own slice `sharding.process_slice` (padded and masked at the end).
  """
  num_train = data_lib.batch_size(train)
  if mesh is None:
    num_batches = -(-num_train // s.batch_size)

    def host(start):
      for b in range(start, num_batches):
        lo, hi = b * s.batch_size, min((b + 1) * s.batch_size, num_train)
        yield _without_ids(data_lib.take(train, lo, hi)), np.arange(lo, hi), np.ones(hi - lo, bool)

    return num_batches, host
  rows = sharding.process_slice(num_train)
  local = jax.tree.map(lambda x: np.asarray(x)[rows], _without_ids(train))
  data = sharding.axis_size(mesh, sharding.DATA)
  if s.batch_size % data or s.batch_size % jax.process_count():
    raise ValueError(f"config.score.batch_size ({s.batch_size}) is the global batch: it must be a multiple "
                     f"of the mesh's 'data' axis ({data}, config.mesh_shape) and of the "
                     f"{jax.process_count()} processes.")
  num_batches = sharding.num_steps(len(rows), s.batch_size // jax.process_count())

  def on_mesh(start):
    for g in itertools.islice(sharding.global_batches(local, rows, s.batch_size, mesh), start, None):
      yield g.batch, sharding.to_host(g.ids), sharding.to_host(g.mask)

  return num_batches, on_mesh


def _merge_rows(running: scoring.TopK, block: np.ndarray, rows: np.ndarray) -> scoring.TopK:
  """Returns `running` merged with the (T, len(rows)) scores of training rows `rows` (runs of consecutive
  rows merged at once; the result does not depend on the split)."""
  breaks = np.flatnonzero(np.diff(rows) != 1) + 1
  for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
    if hi > lo:
      running = scoring.merge_top_k(running, block[:, lo:hi], int(rows[lo]))
  return running


def run_score(config, workdir: str, *, quiet: bool = False, fault: Optional[str] = None) -> dict:
  """Projects the training set once (shards on disk), keeps the top-k per test example, writes tables.

  Returns the paths written ({} on processes other than 0, which write
  nothing). Resumes from the last checkpointed batch. On a mesh each process
  projects only its own slice of the training set (see the module docstring).
  """
  task, variables = load_model(config, workdir)
  mesh = job_mesh(config)
  es = checkpoint.load_eigenspace(os.path.join(workdir, "eigenspace"),
                                  fingerprint=eigenspace_fingerprint(config, task), mesh=mesh)
  # The scoring arithmetic runs on the host, the same on every process: only Λ is needed there.
  es_host = es.replace(eigenvalues=jnp.asarray(sharding.to_host(es.eigenvalues)))
  fns = model_fns(task, variables, config)
  s = config.score
  out = os.path.join(workdir, "scores")
  shard_dir = os.path.join(out, "projections")
  os.makedirs(shard_dir, exist_ok=True)
  train, test = task.splits["train"], task.splits["test"]
  kw = dict(method=s.method, microbatch_size=s.microbatch_size or None)
  directions, test_proj = _test_projections(es, fns, _without_ids(test), s, mesh)

  with_norms = bool(s.tail) and s.method == "vjp"  # Self-influence with the tail needs ‖∇ℓ(z)‖².
  num_batches, batches_from = _train_batches(train, s, mesh)
  num_test = test_proj.shape[0]
  fp = scores_fingerprint(config, task)
  if jax.process_count() > 1:  # Batches hold other rows with another process count: not this job's progress.
    fp = checkpoint.fingerprint(fp, "processes", jax.process_count())
  store = checkpoint.Store(os.path.join(out, "progress"), fp)
  template = scoring.empty_top_k(num_test, s.top_k, test_proj.dtype)
  found = store.restore_latest(target=template._asdict())
  running, start = (scoring.TopK(**found[1]), found[0]) if found is not None else (template, 0)
  bar = progress_lib.Progress(num_batches, "scoring", "batches", start=start, quiet=quiet or not common.is_writer())
  for b, (batch, rows, mask) in enumerate(batches_from(start), start):
    both, sq_norms = projection.project_on(directions, fns.per_example_loss_fn, fns.params, [batch],
                                           with_sq_norms=with_norms, pad_to=s.batch_size, mesh=mesh, **kw)
    if mesh is not None:
      both = sharding.to_host(both)[mask]
      sq_norms = sharding.to_host(sq_norms)[mask] if with_norms else None
      rows = rows[mask]
    proj = both[:, : es.k]
    if s.tail:
      block = scoring.influence_scores_with_tail(es_host, test_proj, proj, both[:, es.k:].T)
    else:
      block = scoring.influence_scores(es_host, test_proj, proj)
    if common.is_writer():
      if with_norms:
        common.atomic_save_npy(os.path.join(shard_dir, f"sq_norms_{b:05d}.npy"), np.asarray(sq_norms))
      common.atomic_save_npy(os.path.join(shard_dir, f"ids_{b:05d}.npy"), np.asarray(rows, np.int64))
      common.atomic_save_npy(os.path.join(shard_dir, f"train_{b:05d}.npy"), np.asarray(proj))
    running = _merge_rows(running, np.asarray(block), rows)
    bar.update()
    if (b + 1) % s.checkpoint_every == 0 or b + 1 == num_batches:
      store.save(b + 1, running._asdict())
    common.maybe_kill(fault, "score", b + 1)
  store.close()
  if not common.is_writer():
    return {}
  return _write_score_outputs(out, task, es_host, running, num_batches, config)


def _write_score_outputs(out: str, task: Task, es, running: scoring.TopK, num_batches: int, config) -> dict:
  train, test = task.splits["train"], task.splits["test"]
  shard = lambda name, b: os.path.join(out, "projections", f"{name}_{b:05d}.npy")
  load = lambda name: np.concatenate([np.load(shard(name, b)) for b in range(num_batches)])
  ids = np.concatenate([_shard_rows(shard, b, config.score.batch_size) for b in range(num_batches)])
  order_rows = np.argsort(ids, kind="stable")  # Shards hold rows in batch order: back to row order.
  if not np.array_equal(ids[order_rows], np.arange(data_lib.batch_size(train))):
    raise ValueError(f"The projection shards in {out}/projections do not cover every training row once.")
  train_proj = load("train")[order_rows]
  sq_norms = None
  if config.score.tail and all(os.path.exists(shard("sq_norms", b)) for b in range(num_batches)):
    sq_norms = jnp.asarray(load("sq_norms")[order_rows])
  self_infl = np.asarray(scoring.self_influence(es, jnp.asarray(train_proj), sq_norms=sq_norms))
  label = lambda batch, i: _label_text(batch[task.label_key][i])

  rows = [["test_id", "test_label", "kind", "rank", "train_id", "train_label", "score"]]
  for t in range(running.proponents.shape[0]):
    for kind, idx, sc in (("proponent", running.proponents, running.proponent_scores),
                          ("opponent", running.opponents, running.opponent_scores)):
      for r in range(idx.shape[1]):
        j = int(idx[t, r])
        if j < 0:
          continue
        rows.append([int(test["id"][t]), label(test, t), kind, r + 1, int(train["id"][j]), label(train, j),
                     f"{float(sc[t, r]):.6g}"])
  paths = {"top_k": os.path.join(out, "top_k.csv"), "self_influence": os.path.join(out, "self_influence.csv")}
  common.atomic_write_csv(paths["top_k"], rows)
  order = np.argsort(-self_infl, kind="stable")
  common.atomic_write_csv(paths["self_influence"], [["rank", "train_id", "train_label", "self_influence"]] + [
      [r + 1, int(train["id"][j]), label(train, j), f"{self_infl[j]:.6g}"] for r, j in enumerate(order)])
  if task.image_side is not None:
    shown = min(config.score.grid_examples, running.proponents.shape[0])
    paths["grid"] = plots.influence_grid(
        os.path.join(out, "influence_grid.png"), test["x"][:shown], test["y"][:shown], train["x"], train["y"],
        running.proponents[:shown], running.proponent_scores[:shown],
        running.opponents[:shown], running.opponent_scores[:shown], num_shown=4)
  summary = {"num_train": int(train_proj.shape[0]), "num_test": int(running.proponents.shape[0]),
             "k": es.k, "tail": bool(config.score.tail),
             "most_self_influential_train_ids": [int(train["id"][j]) for j in order[:10]]}
  paths["summary"] = os.path.join(out, "summary.json")
  common.atomic_write_text(paths["summary"], json.dumps(summary, indent=1))
  return paths


def _shard_rows(shard, b: int, batch_size: int) -> np.ndarray:
  """Returns the training rows of projection shard b: ids_b.npy, or (shards written before ids files
  existed, one process) the consecutive rows from b × batch_size."""
  if os.path.exists(shard("ids", b)):
    return np.load(shard("ids", b))
  n = np.load(shard("train", b), mmap_mode="r").shape[0]
  return np.arange(b * batch_size, b * batch_size + n)


def _label_text(y) -> str:
  """Returns a class label as '7', a token sequence as '3 1 4'."""
  y = np.asarray(y)
  return str(int(y)) if y.ndim == 0 else " ".join(str(int(t)) for t in y.ravel())
