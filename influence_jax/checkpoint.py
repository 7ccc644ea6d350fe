"""Orbax checkpoints that resume safely: a pytree plus a JSON record, saved atomically, and
refused when made from a different model, config or data set.

Every save is one orbax `CheckpointManager` step holding two items, "state"
(arrays) and "meta" (JSON with a `fingerprint`). Orbax writes a step into a
temporary directory and renames it when complete, so a job killed at any
moment leaves either the previous step or the new one, never a mix. A directory
may be local or on cloud storage (gs://, `paths`): orbax writes it there itself.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from influence_jax import paths
from influence_jax import sharding as sharding_lib
from influence_jax.eigenspace import Eigenspace, EigenspaceInfo


class FingerprintMismatch(ValueError):
  """A checkpoint was made from a different model, config or data set."""


class CorruptCheckpoint(ValueError):
  """A checkpoint's arrays differ from what was saved, or cannot be read."""


def _as_uint32(x: jax.Array) -> jax.Array:
  """Returns the bits of `x` as uint32 words (float64/int64: two words per element, on a last axis)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size >= 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint16 if size == 2 else jnp.uint8).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
  words = _as_uint32(x)
  index = jnp.zeros(words.shape, jnp.uint32)
  for axis, n in enumerate(words.shape):  # Row-major position, modulo 2³² (uint32 arithmetic wraps).
    index = index * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
  weights = (index * jnp.uint32(0x9E3779B1)) | jnp.uint32(1)
  return jnp.sum(words * weights, dtype=jnp.uint32)


@jax.jit
def _checksums(leaves: list) -> list:
  """One program for a whole tree's leaves (not one a leaf shape)."""
  return [_checksum(x) for x in leaves]


def checksums(tree: Any) -> dict:
  """Returns {leaf path: 32-bit checksum of its bits} of a pytree of arrays: Σᵢ bitsᵢ·wᵢ mod 2³² with odd
  position weights wᵢ. Modular sums do not depend on order, so it is the same for any sharding or mesh of
  the same values (computed where the arrays live, no host copy); any single flipped bit changes it. One
  device program for all the leaves."""
  found = jax.tree_util.tree_flatten_with_path(tree)[0]
  values = jax.device_get(_checksums([jnp.asarray(leaf) for _, leaf in found])) if found else []
  return {jax.tree_util.keystr(path): int(v) for (path, _), v in zip(found, values)}


def verify_checksums(tree: Any, recorded: Optional[dict], what: str) -> None:
  """Raises CorruptCheckpoint naming `what` and the leaves whose checksum differs from `recorded`."""
  if recorded is None:
    raise CorruptCheckpoint(f"{what} has no recorded checksums (written by an older version or damaged): "
                            "delete it and rerun to recompute it.")
  found = checksums(tree)
  bad = [name for name in found if recorded.get(name) != found[name]]
  if bad or set(recorded) != set(found):
    raise CorruptCheckpoint(f"{what} is damaged: {', '.join(bad) or 'its leaves'} differ from what was saved. "
                            "Delete it and rerun: it is recomputed.")


def _manager(directory: str, *, max_to_keep: Optional[int] = 2, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only,
      enable_async_checkpointing=False, cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(paths.absolute(directory), options=options, item_names=("state", "meta"))


class CheckpointDir:
  """A directory of fingerprinted steps: `save(step, state, meta)`, `restore_latest()`.

  `fingerprint` identifies what the state was computed from; restoring a
  step saved under another fingerprint raises FingerprintMismatch naming
  both, so old progress is never mixed with a new job.
  """

  def __init__(self, directory: str, fingerprint: str, *, max_to_keep: Optional[int] = 2):
    self.directory = directory
    self.fingerprint = fingerprint
    self._max_to_keep = max_to_keep
    self._mngr = None

  @property
  def manager(self) -> ocp.CheckpointManager:
    if self._mngr is None:
      self._mngr = _manager(self.directory, max_to_keep=self._max_to_keep)
    return self._mngr

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: Optional[dict] = None) -> None:
    """Saves `state` (a pytree of arrays) and `meta` (JSON) as `step`, atomically.

    With several processes every process calls it with the same step: each
    writes its own shards of sharded arrays, process 0 the rest.
    """
    record = dict(meta or {}, fingerprint=self.fingerprint, checksums=checksums(state))
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(record)), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, target: Any = None) -> tuple[Any, dict]:
    """Returns (state, meta) of `step`; raises FingerprintMismatch if it was made from other inputs.

    Arrays come back with the shapes, dtypes and shardings of `target`'s
    leaves (so state saved on one mesh restores onto another).
    """
    what = f"The checkpoint {paths.join(self.directory, str(step))}"
    meta = _restore_meta(self.manager, step, what)
    if meta.get("fingerprint") != self.fingerprint:
      raise FingerprintMismatch(
          f"{self.directory} holds a checkpoint made from a different model, config or data set "
          f"(fingerprint {meta.get('fingerprint')}, this job's is {self.fingerprint}); refusing to mix "
          "them. Use a fresh --workdir or delete that directory.")
    abstract = None if target is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    state = _restore_state(self.manager, step, abstract, what)
    verify_checksums(state, meta.get("checksums"), what)
    return state, meta

  def restore_latest(self, target: Any = None) -> Optional[tuple[int, Any, dict]]:
    """Returns (step, state, meta) of the newest step, or None when there is none."""
    step = self.latest_step()
    if step is None:
      return None
    state, meta = self.restore(step, target)
    return step, state, meta

  def discard(self) -> None:
    """Deletes every saved step (e.g. a damaged one, before starting over)."""
    for step in self.manager.all_steps():
      self.manager.delete(step)

  def close(self) -> None:
    if self._mngr is not None:
      self._mngr.close()
      self._mngr = None


def _restore_meta(mngr: ocp.CheckpointManager, step: int, what: str) -> dict:
  """Returns the "meta" item of `step`; raises CorruptCheckpoint when it cannot be read."""
  return _restore(mngr, step, "meta", ocp.args.JsonRestore(), what)


def _restore_state(mngr: ocp.CheckpointManager, step: int, target: Any, what: str) -> Any:
  """Returns the "state" item of `step`; raises CorruptCheckpoint when its files cannot be read."""
  return _restore(mngr, step, "state", ocp.args.StandardRestore(target), what)


def _restore(mngr: ocp.CheckpointManager, step: int, item: str, args: Any, what: str) -> Any:
  try:
    return getattr(mngr.restore(step, args=ocp.args.Composite(**{item: args})), item)
  except (ValueError, OSError, RuntimeError, KeyError) as e:
    raise CorruptCheckpoint(f"{what} cannot be read ({type(e).__name__}: {str(e)[:300]}). "
                            "Delete it and rerun: it is recomputed.") from e


def _eigenspace_state(es: Eigenspace) -> dict:
  return {"eigenvalues": es.eigenvalues, "eigenvectors": es.eigenvectors,
          "residuals": es.residuals, "ritz_estimates": es.ritz_estimates}


def _info_to_json(info: Optional[EigenspaceInfo]) -> Optional[dict]:
  if info is None:
    return None
  d = dict(info.__dict__)
  d["param_signature"] = [[path, list(shape), dtype] for path, shape, dtype in info.param_signature]
  return d


def _info_from_json(d: Optional[dict]) -> Optional[EigenspaceInfo]:
  if d is None:
    return None
  d = dict(d)
  d["param_signature"] = tuple((p, tuple(s), t) for p, s, t in d["param_signature"])
  return EigenspaceInfo(**d)


def save_eigenspace(directory: str, es: Eigenspace, fingerprint: str = "", extra: Optional[dict] = None) -> None:
  """Saves an Eigenspace (arrays with orbax, info, damping and p as JSON) atomically as step 0.

  The eigenvectors are saved as laid out (with their mesh's zero padding).
  """
  store = CheckpointDir(directory, fingerprint, max_to_keep=1)
  store.save(0, _eigenspace_state(es),
             dict(extra or {}, damping=es.damping, num_params=es.num_params, info=_info_to_json(es.info)))
  store.close()


def _saved_shapes(directory: str, step: int) -> dict:
  """Returns {name: ShapeDtypeStruct-like (shape, dtype)} of the arrays saved in `step` (no data read)."""
  path = epath.Path(paths.absolute(directory)) / str(step) / "state"
  tree = ocp.StandardCheckpointHandler().metadata(path)
  return {name: (tuple(m.shape), np.dtype(m.dtype)) for name, m in tree.items()}


def _restore_target(shapes: dict, mesh: jax.sharding.Mesh, flat: str) -> dict:
  """Returns restore targets on `mesh`: the array named `flat` (flat parameter vectors) split over 'model' when
  its saved column count allows it (else replicated, relaid out after), the rest replicated."""
  columns = shapes[flat][0][1]
  split = columns % sharding_lib.axis_size(mesh, sharding_lib.MODEL) == 0
  where = lambda name: (sharding_lib.flat_sharding(mesh, 2) if name == flat and split
                        else sharding_lib.replicated(mesh))
  return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=where(name)) for name, (shape, dtype) in shapes.items()}


def load_eigenspace(directory: str, fingerprint: Optional[str] = None, *,
                    mesh: Optional[jax.sharding.Mesh] = None) -> Eigenspace:
  """Returns the Eigenspace saved in `directory`; checks its fingerprint when one is given.

  The arrays are laid out on `mesh` (default: this process's first device)
  whatever mesh they were saved from: eigenvectors in its flat layout
  (`sharding`), the rest replicated. With several processes every process
  must call it (a collective restore).
  """
  mesh = sharding_lib.mesh_or_default(mesh)
  mngr = _manager(directory, read_only=True)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"No saved eigenspace in {directory}.")
  what = f"The eigenspace in {directory}"
  meta = _restore_meta(mngr, step, what)
  if fingerprint is not None and meta.get("fingerprint") != fingerprint:
    raise FingerprintMismatch(
        f"The eigenspace in {directory} was fitted on a different model, config or data set "
        f"(fingerprint {meta.get('fingerprint')}, expected {fingerprint}). Delete {directory} to fit it again.")
  shapes = _saved_shapes(directory, step)
  target = _restore_target(shapes, mesh, "eigenvectors")
  state = _restore_state(mngr, step, target, what)
  mngr.close()
  verify_checksums(state, meta.get("checksums"), what)
  num_params = int(meta.get("num_params", shapes["eigenvectors"][0][1]))
  return Eigenspace(
      eigenvalues=state["eigenvalues"],
      eigenvectors=sharding_lib.to_flat_layout(state["eigenvectors"], num_params, mesh),
      residuals=state["residuals"], ritz_estimates=state["ritz_estimates"], num_params=num_params,
      damping=float(meta["damping"]), info=_info_from_json(meta.get("info")))


def save_residual_basis(directory: str, basis: jax.Array, num_params: int, fingerprint: str) -> None:
  """Saves a residual basis V (r, P) as laid out (a mesh's flat layout: each process writes its own columns)
  and p, atomically as step 0 (a step saved before, from other inputs, is replaced). Every process calls it."""
  store = CheckpointDir(directory, fingerprint, max_to_keep=1)
  store.discard()
  store.save(0, {"basis": basis}, {"num_params": int(num_params)})
  store.close()


def load_residual_basis(directory: str, fingerprint: str, *,
                        mesh: Optional[jax.sharding.Mesh] = None) -> Optional[jax.Array]:
  """Returns the residual basis saved in `directory` in the flat layout of `mesh` (default: this process's first
  device), whatever mesh it was saved from; None when nothing was saved. Raises FingerprintMismatch (other
  inputs) or CorruptCheckpoint (damaged). Every process calls it (a collective restore)."""
  mesh = sharding_lib.mesh_or_default(mesh)
  mngr = _manager(directory, read_only=True)
  step = mngr.latest_step()
  if step is None:
    mngr.close()
    return None
  what = f"The residual basis in {directory}"
  meta = _restore_meta(mngr, step, what)
  if meta.get("fingerprint") != fingerprint:
    mngr.close()
    raise FingerprintMismatch(f"{what} was fitted from other inputs (fingerprint {meta.get('fingerprint')}, "
                              f"expected {fingerprint}).")
  state = _restore_state(mngr, step, _restore_target(_saved_shapes(directory, step), mesh, "basis"), what)
  mngr.close()
  verify_checksums(state, meta.get("checksums"), what)
  return sharding_lib.to_flat_layout(state["basis"], int(meta["num_params"]), mesh)
