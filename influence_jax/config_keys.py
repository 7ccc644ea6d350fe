"""Checking a config's keys against a job's defaults: a key the job does not know is an error naming
it and the known key it most resembles (a misspelt key would otherwise be ignored without a word).

Works on ml_collections ConfigDicts and plain dicts alike (anything with keys() and [key]); imports
nothing beyond the standard library, so every layer can use it (the jobs, the benchmark).
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Optional


def _is_section(value: Any) -> bool:
  return hasattr(value, "keys") and hasattr(value, "__getitem__") and not isinstance(value, (str, bytes))


def _suggest(key: str, known: Iterable[str], cutoff: float = 0.6) -> Optional[str]:
  match = difflib.get_close_matches(key, list(known), n=1, cutoff=cutoff)
  return match[0] if match else None


def unknown_keys(config, reference, *, free: Iterable[str] = (), new_top_level: bool = True,
                 near_miss: float = 0.8, prefix: str = "") -> list:
  """Returns [(dotted key, suggestion or None)] of the keys of `config` that `reference` lacks.

  Sections of `reference` are closed: each key of the config's section must be one of the
  reference's (recursively). `free`: dotted keys whose contents are not checked (the task's own).
  With `new_top_level`, a top-level key the reference lacks is allowed (a task's own section)
  unless it is a near miss of a reference key (difflib ratio ≥ `near_miss`).
  """
  free = tuple(free)
  out = []
  for key in config.keys():
    dotted = f"{prefix}{key}"
    if dotted in free:
      continue
    if key not in reference:
      suggestion = _suggest(key, reference.keys())
      if prefix or not new_top_level:
        out.append((dotted, suggestion))
      elif _suggest(key, reference.keys(), near_miss):
        out.append((dotted, _suggest(key, reference.keys(), near_miss)))
      continue
    if _is_section(config[key]) and _is_section(reference[key]):
      out += unknown_keys(config[key], reference[key], free=free, new_top_level=False, prefix=dotted + ".")
  return out


def check_keys(config, reference, *, what: str, defaults: str, **options) -> None:
  """Raises ValueError naming the first key of `config` that `reference` lacks (`unknown_keys`, with
  `options`), with the known key it most resembles: "config.arnoldi.topk is not a key of {what}. Did
  you mean config.arnoldi.top_k? Its keys: {defaults}." """
  bad = unknown_keys(config, reference, **options)
  if not bad:
    return
  key, suggestion = bad[0]
  hint = f" Did you mean config.{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{suggestion}?" if suggestion else ""
  more = f" (and {len(bad) - 1} more: {', '.join('config.' + k for k, _ in bad[1:4])})" if len(bad) > 1 else ""
  raise ValueError(f"config.{key} is not a key of {what}{more}.{hint} Its keys: {defaults}.")
