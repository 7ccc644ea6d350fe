"""Small example data sets (numpy, no network) and label-noise / backdoor helpers.

Every function is pure and deterministic given its `seed`. Batches are dicts of
numpy arrays sharing a leading example axis (influence_jax.data); each example
carries its original index under "id" so that scores can be traced back.
"""

from __future__ import annotations

import numpy as np

DIGITS_NUM_CLASSES = 10
DIGITS_SIDE = 8


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns (train_idx, test_idx): each class split by `test_fraction`, both shuffled by `seed`.

  Each class c with n_c examples gives round(test_fraction * n_c) of them to
  the test split (at least one to each side when n_c ≥ 2 and 0 < fraction < 1).
  """
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in [0, 1); got {test_fraction}.")
  y = np.asarray(y)
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == c))
    n_test = int(round(test_fraction * idx.size))
    if 0.0 < test_fraction and idx.size >= 2:
      n_test = min(max(n_test, 1), idx.size - 1)
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  train_idx = rng.permutation(np.concatenate(train))
  test_idx = rng.permutation(np.concatenate(test))
  return train_idx, test_idx


def digits_arrays(*, image: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Returns (x, y): scikit-learn's bundled 8x8 digits (1,797 images) in their original order.

  x: float32 in [0, 1] (pixel / 16, exact), shape (N, 64), or (N, 8, 8, 1)
  when `image`; y: int32 labels 0..9. The one digits loader of the package.
  """
  from sklearn import datasets as sk_datasets  # Local import: scikit-learn is only needed here.

  raw = sk_datasets.load_digits()
  x = (np.asarray(raw.data, np.float32) / 16.0).astype(np.float32)
  if image:
    x = x.reshape(-1, DIGITS_SIDE, DIGITS_SIDE, 1)
  return x, np.asarray(raw.target, np.int32)


def load_digits(*, test_fraction: float = 0.2, seed: int = 0, image: bool = False) -> dict[str, dict[str, np.ndarray]]:
  """Returns {"train": batch, "test": batch} of `digits_arrays`, split stratified by class.

  Each batch is {"x": float32 in [0, 1], shape (N, 64), or (N, 8, 8, 1) when
  `image`; "y": int32 labels 0..9; "id": int32 index into the original data}.
  The split is deterministic given `seed`.
  """
  x, y = digits_arrays(image=image)
  ids = np.arange(y.size, dtype=np.int32)
  train_idx, test_idx = stratified_split(y, test_fraction, seed)
  split = lambda idx: {"x": x[idx], "y": y[idx], "id": ids[idx]}
  return {"train": split(train_idx), "test": split(test_idx)}


def _choose(n: int, fraction: float, candidates: np.ndarray, rng: np.random.Generator, what: str) -> np.ndarray:
  """Returns round(fraction * n) indices drawn without replacement from `candidates`."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"{what} fraction must be in [0, 1]; got {fraction}.")
  k = int(round(fraction * n))
  if k > candidates.size:
    raise ValueError(f"{what}: asked for {k} examples but only {candidates.size} are eligible.")
  return np.sort(rng.choice(candidates, size=k, replace=False))


def flip_labels(y: np.ndarray, fraction: float, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns (new_y, flipped_mask): round(fraction·N) labels changed, each to a different class.

  The new class of a flipped example is uniform over the num_classes − 1 other
  classes. `flipped_mask` is a bool (N,) array, True where the label changed.
  """
  y = np.asarray(y)
  if num_classes < 2:
    raise ValueError(f"flip_labels needs num_classes >= 2; got {num_classes}.")
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}); got range [{y.min()}, {y.max()}].")
  rng = np.random.default_rng(seed)
  idx = _choose(y.size, fraction, np.arange(y.size), rng, "flip_labels")
  new_y = y.copy()
  new_y[idx] = (y[idx] + rng.integers(1, num_classes, size=idx.size)) % num_classes
  mask = np.zeros(y.size, bool)
  mask[idx] = True
  return new_y.astype(y.dtype), mask


def trigger_pattern(size: int = 3) -> np.ndarray:
  """Returns the (size, size) float32 checkerboard used as a backdoor trigger (1 on the corner)."""
  return ((np.add.outer(np.arange(size), np.arange(size)) % 2) == 0).astype(np.float32)


def stamp_trigger(x: np.ndarray, *, size: int = 3, value: float = 1.0) -> np.ndarray:
  """Returns a copy of images `x` with the trigger stamped in the bottom-right corner.

  `x` is (N, H, W), (N, H, W, C) or flat square images (N, H·H). Pixels where
  the pattern is 1 are set to `value`; the others keep their value.
  """
  x = np.asarray(x)
  shape = x.shape
  img = _as_images(x)
  if size > min(img.shape[1:3]):
    raise ValueError(f"trigger size {size} does not fit images of shape {img.shape[1:3]}.")
  img = img.copy()
  on = trigger_pattern(size).astype(bool)
  patch = img[:, -size:, -size:, :]
  patch[:, on, :] = value
  img[:, -size:, -size:, :] = patch
  return img.reshape(shape).astype(x.dtype)


TRIGGERS = ("corner", "checkerboard")
CHECKERBOARD_AMOUNT = 16.0 / 255.0  # The GIF authors' faint trigger: +16 on 8-bit pixels.


def _as_images(x: np.ndarray) -> np.ndarray:
  """Returns x as (N, H, W, C) images (a view): flat square (N, H·H), (N, H, W) or (N, H, W, C)."""
  if x.ndim == 2:
    side = int(round(np.sqrt(x.shape[1])))
    if side * side != x.shape[1]:
      raise ValueError(f"flat images must be square (N, H*H); got {x.shape}.")
    return x.reshape(x.shape[0], side, side, 1)
  if x.ndim == 3:
    return x[..., None]
  if x.ndim == 4:
    return x
  raise ValueError(f"x must be (N, H*H), (N, H, W) or (N, H, W, C); got shape {x.shape}.")


def faint_checkerboard(x: np.ndarray, *, amount: float = CHECKERBOARD_AMOUNT) -> np.ndarray:
  """Returns a copy of images `x` (values in [0, 1]) with `amount` added on every pixel (i, j) with i + j
  odd, clipped at 1: the GIF authors' whole-image trigger (+16/255 on alternate pixels).

  `x` is (N, H, W), (N, H, W, C) or flat square images (N, H·H); the shape and dtype are kept.
  """
  x = np.asarray(x)
  img = _as_images(x)
  odd = (np.add.outer(np.arange(img.shape[1]), np.arange(img.shape[2])) % 2 == 1)[None, :, :, None]
  out = np.where(odd, np.minimum(img + amount, 1.0), img)
  return out.reshape(x.shape).astype(x.dtype)


def apply_trigger(x: np.ndarray, trigger: str = "corner", *, size: int = 3, value: float = 1.0,
                  amount: float = CHECKERBOARD_AMOUNT) -> np.ndarray:
  """Returns images `x` with the `trigger` applied: "corner" (`stamp_trigger`: a size × size checkerboard
  set to `value` in the bottom-right corner) or "checkerboard" (`faint_checkerboard`: + amount on
  alternate pixels of the whole image)."""
  if trigger == "corner":
    return stamp_trigger(x, size=size, value=value)
  if trigger == "checkerboard":
    return faint_checkerboard(x, amount=amount)
  raise ValueError(f"Unknown trigger {trigger!r}; expected one of {TRIGGERS}.")


def add_trigger(
    x: np.ndarray,
    y: np.ndarray,
    *,
    fraction: float,
    target_class: int,
    seed: int,
    size: int = 3,
    value: float = 1.0,
    trigger: str = "corner",
    include_target: bool = False,
    amount: float = CHECKERBOARD_AMOUNT,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Returns (new_x, new_y, mask): a backdoor planted in round(fraction·N) examples.

  The chosen examples get the trigger (`apply_trigger`) and the label
  `target_class`; `mask` is True for them, the others are unchanged. They are
  drawn among the examples whose label is not `target_class`
  (include_target=False), or among all N as the GIF authors draw them
  (include_target=True: chosen examples of the target class keep their label
  but carry the trigger).
  """
  x = np.asarray(x)
  y = np.asarray(y)
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}.")
  rng = np.random.default_rng(seed)
  candidates = np.arange(y.size) if include_target else np.flatnonzero(y != target_class)
  idx = _choose(y.size, fraction, candidates, rng, "add_trigger")
  new_x = x.copy()
  new_x[idx] = apply_trigger(x[idx], trigger, size=size, value=value, amount=amount)
  new_y = y.copy()
  new_y[idx] = target_class
  mask = np.zeros(y.size, bool)
  mask[idx] = True
  return new_x, new_y, mask


SEQ2SEQ_BOS = 0  # Token 0 is reserved: the decoder's start token; data tokens are 1..vocab_size-1.


def synthetic_seq2seq(
    num_examples: int, seq_len: int, vocab_size: int, seed: int, *, task: str = "reverse") -> dict[str, np.ndarray]:
  """Returns {"src": int32 (N, L), "tgt": int32 (N, L), "id": int32 (N,)}: a generated seq2seq task.

  Source tokens are uniform on 1..vocab_size−1 (0 is the start token
  SEQ2SEQ_BOS). task="reverse": tgt is src reversed; "sort": tgt is src sorted
  ascending; "copy": tgt equals src.
  """
  if vocab_size < 3:
    raise ValueError(f"vocab_size must be >= 3 (token 0 is reserved); got {vocab_size}.")
  if num_examples < 1 or seq_len < 1:
    raise ValueError(f"num_examples and seq_len must be positive; got {num_examples}, {seq_len}.")
  rng = np.random.default_rng(seed)
  src = rng.integers(1, vocab_size, size=(num_examples, seq_len)).astype(np.int32)
  if task == "reverse":
    tgt = src[:, ::-1]
  elif task == "sort":
    tgt = np.sort(src, axis=1)
  elif task == "copy":
    tgt = src
  else:
    raise ValueError(f"unknown task {task!r}; use 'reverse', 'sort' or 'copy'.")
  return {"src": src, "tgt": np.ascontiguousarray(tgt, np.int32), "id": np.arange(num_examples, dtype=np.int32)}


def split(batch: dict, num_test: int) -> dict[str, dict]:
  """Returns {"train": batch[num_test:], "test": batch[:num_test]} (examples are already shuffled)."""
  return {"train": {k: v[num_test:] for k, v in batch.items()}, "test": {k: v[:num_test] for k, v in batch.items()}}
