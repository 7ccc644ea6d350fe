"""PNG pictures of an eigenspace and of influence rankings (matplotlib, no display needed)."""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import numpy as np

from influence_jax import io as io_lib


@functools.lru_cache(maxsize=None)
def _pyplot():
  """Returns matplotlib.pyplot on the Agg backend, imported on first use (0.6 s that a job which draws
  nothing, or has drawn already, does not pay)."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  return plt


def _save(fig, path: str) -> str:
  try:
    return io_lib.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"),
                               binary=True)
  finally:
    _pyplot().close(fig)


def spectrum(path: str, eigenvalues: np.ndarray, residuals: Optional[np.ndarray] = None,
             damping: float = 0.0, title: str = "", **marks) -> str:
  """Writes the eigenvalue spectrum (log scale) with residuals ‖Hu − λu‖ (`spectrum_figure`); returns `path`."""
  return _save(spectrum_figure(eigenvalues, residuals, damping, title, **marks), path)


def spectrum_figure(eigenvalues: np.ndarray, residuals: Optional[np.ndarray] = None,
                    damping: float = 0.0, title: str = "", *, unconverged: Sequence[int] = (),
                    residual_tol: Optional[float] = None, min_ritz_value: Optional[float] = None):
  """Returns the figure of `spectrum`: eigenvalues (log scale), residuals ‖Hu − λu‖, the damping.

  `unconverged` (0-based indices) pairs are drawn as red crosses, eigenvalue and residual, labelled
  "unconverged pair (n)"; `residual_tol` draws the tolerance residual_tol·|λ| they exceed; a negative
  `min_ritz_value` (the most negative Ritz value of the run) is drawn as −λ_min against the damping.
  """
  ev = np.asarray(eigenvalues, np.float64)
  fig, ax = _pyplot().subplots(figsize=(6.4, 3.6))
  idx = np.arange(1, ev.size + 1)
  bad = np.zeros(ev.size, bool)
  bad[[int(j) for j in unconverged if 0 <= int(j) < ev.size]] = True
  pos = ev > 0
  ax.semilogy(idx[pos], ev[pos], "-", lw=0.8, color="tab:blue")
  ax.semilogy(idx[pos & ~bad], ev[pos & ~bad], "o", ms=3, color="tab:blue", label="eigenvalue λ")
  if np.any(~pos):
    ax.semilogy(idx[~pos], -ev[~pos], "x", ms=4, color="tab:purple", label="−λ (negative)")
  if np.any(bad):
    ax.semilogy(idx[bad], np.abs(ev[bad]), "X", ms=6, color="tab:red",
                label=f"unconverged pair ({int(bad.sum())})")
  if residuals is not None and np.all(np.isfinite(residuals)):
    res = np.maximum(np.asarray(residuals, np.float64), 1e-16)
    ax.semilogy(idx[~bad], res[~bad], ".", ms=3, color="tab:orange", label="residual ‖Hu−λu‖")
    if np.any(bad):
      ax.semilogy(idx[bad], res[bad], "x", ms=4, color="tab:red", label="residual, unconverged")
    if residual_tol is not None and np.any(pos):
      ax.semilogy(idx, residual_tol * np.abs(ev), ":", lw=1, color="tab:red", label=f"tolerance {residual_tol:g}·|λ|")
  if damping > 0:
    ax.axhline(damping, color="gray", ls="--", lw=1, label=f"damping δ = {damping:g}")
  if min_ritz_value is not None and min_ritz_value < 0:
    ax.axhline(-min_ritz_value, color="tab:purple", ls="-.", lw=1,
               label=f"−(most negative Ritz value) = {-min_ritz_value:.2g}")
  ax.set_xlabel("index (descending)")
  ax.set_ylabel("value")
  ax.set_title(title or f"Top-{ev.size} curvature eigenvalues")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  return fig


def influence_grid(path: str, test_images: np.ndarray, test_labels: Sequence[int],
                   train_images: np.ndarray, train_labels: Sequence[int],
                   proponents: np.ndarray, proponent_scores: np.ndarray,
                   opponents: np.ndarray, opponent_scores: np.ndarray,
                   num_shown: int = 4, title: str = "") -> str:
  """Writes a grid: each row a test image, then its top proponents and opponents (training images).

  `test_images`/`train_images` are (N, H, W) or (N, H*W) square images;
  proponents/opponents are (T, ≥num_shown) indices into the training set.
  """
  def square(x):
    x = np.asarray(x)
    if x.ndim == 2:
      side = int(round(np.sqrt(x.shape[1])))
      x = x.reshape(-1, side, side)
    return x.reshape(x.shape[0], x.shape[1], x.shape[2])

  test_images, train_images = square(test_images), square(train_images)
  rows, k = len(test_images), min(num_shown, proponents.shape[1])
  fig, axes = _pyplot().subplots(rows, 1 + 2 * k, figsize=(1.15 * (1 + 2 * k), 1.3 * rows), squeeze=False)
  for r in range(rows):
    cells = [(test_images[r], f"test y={test_labels[r]}", "black")]
    cells += [(train_images[j], f"+{s:.2g} y={train_labels[j]}", "tab:green")
              for j, s in zip(proponents[r, :k], proponent_scores[r, :k])]
    cells += [(train_images[j], f"{s:.2g} y={train_labels[j]}", "tab:red")
              for j, s in zip(opponents[r, :k], opponent_scores[r, :k])]
    for c, (img, label, color) in enumerate(cells):
      ax = axes[r, c]
      ax.imshow(img, cmap="gray_r")
      ax.set_title(label, fontsize=7, color=color)
      ax.set_xticks([])
      ax.set_yticks([])
  fig.suptitle(title or "test image | top proponents (green) | top opponents (red)", fontsize=9)
  return _save(fig, path)


def histogram(path: str, groups: dict, xlabel: str, title: str = "", bins: int = 40) -> str:
  """Writes overlaid histograms of named 1-D arrays; returns `path`."""
  fig, ax = _pyplot().subplots(figsize=(6.4, 3.6))
  for name, values in groups.items():
    ax.hist(np.asarray(values), bins=bins, alpha=0.55, label=f"{name} (n={len(values)})")
  ax.set_xlabel(xlabel)
  ax.set_ylabel("count")
  ax.set_title(title)
  ax.legend(fontsize=8)
  return _save(fig, path)
