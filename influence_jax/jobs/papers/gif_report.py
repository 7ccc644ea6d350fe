"""The GIF jobs' outputs: mean ± std over seeds, markdown tables (one per step rule), CSV and JSON."""

from __future__ import annotations


import numpy as np

from influence_jax import io as io_lib
from influence_jax import paths as paths_lib


def summarise(per_seed: list[dict]) -> dict:
  """Returns {row: {metric: {"mean", "std", "values"}}} over seeds (std with ddof=0; nan-aware)."""
  out = {}
  for name in per_seed[0]:
    out[name] = {}
    for key in per_seed[0][name]:
      v = np.array([r[name].get(key, np.nan) for r in per_seed], np.float64)
      finite = v[np.isfinite(v)]
      out[name][key] = {"mean": float(finite.mean()) if finite.size else float("nan"),
                        "std": float(finite.std()) if finite.size else float("nan"), "values": v.tolist()}
  return out


def _cell(stat) -> str:
  return "" if stat is None or not np.isfinite(stat["mean"]) else f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def markdown_table(summary: dict, columns: tuple[str, ...], prefix: str, extra: tuple[str, ...] = ()) -> str:
  """Returns a markdown table, one row per model, of `columns` (and `extra`, unprefixed) under step rule `prefix`.

  The original and retrained models (no step) show their plain metrics in every table.
  """
  cols = list(columns) + ["scale"] + list(extra)
  lines = ["| model | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
  for name, r in summary.items():
    edited = prefix + "scale" in r
    cells = [_cell(r.get(c if (not edited or c in extra) else prefix + c)) for c in cols]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write(workdir: str, config, per_seed: list[dict], columns, step_rules, notes: list[str],
          seconds: float, spread: str = "seeds") -> dict:
  """Writes results.{md,csv,json} in workdir (one entry of `per_seed` per seed, or per re-draw when
  spread="re-draws"; the CSV's first column numbers them); returns their paths."""
  summary = summarise(per_seed)
  paths = {k: paths_lib.join(workdir, f"results.{k}") for k in ("md", "csv", "json")}
  keys = sorted({k for r in per_seed for row in r.values() for k in row})
  rows = [["seed", "model"] + keys]
  for seed, r in enumerate(per_seed):
    for name, row in r.items():
      rows.append([seed, name] + [f"{row[k]:.6g}" if k in row else "" for k in keys])
  record = {"task": config.gif_task, "config": config.to_dict(), "seeds": len(per_seed), "spread": spread,
            "seconds": seconds, "notes": notes, "summary": summary}
  header = (f"# {config.gif_task} on digits, model {config.model.name}: mean ± std over {len(per_seed)} {spread} "
            f"({seconds:.0f} s)\n\n" + "".join(f"- {n}\n" for n in notes) + "\n")
  extra = ("rel_residual", "iters", "normaliser")
  tables = [f"## {what}\n\n{markdown_table(summary, columns, prefix, extra if i == 0 else ())}\n"
            for i, (prefix, what) in enumerate(step_rules)]
  io_lib.atomic_write_csv(paths["csv"], rows)
  io_lib.atomic_write_json(paths["json"], record)
  io_lib.atomic_write_text(paths["md"], header + "\n".join(tables))
  return paths
