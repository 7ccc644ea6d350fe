"""Counts a job's XLA compilations (from jax.monitoring's events), for the line every job ends with."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import jax

_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


@dataclasses.dataclass
class CompilationCount:
  """XLA executables the job built: `compiled` in all (taking `seconds`), of which `cached` were loaded
  from the persistent compilation cache rather than compiled."""

  compiled: int = 0
  seconds: float = 0.0
  cached: int = 0

  def describe(self) -> str:
    """Returns e.g. '12 XLA compilations (3.4 s; 2 of them loaded from the persistent cache)'."""
    return (f"{self.compiled} XLA compilations ({self.seconds:.1f} s; {self.cached} of them loaded from the "
            "persistent cache)")


@contextlib.contextmanager
def counting() -> Iterator[CompilationCount]:
  """Yields a CompilationCount that grows with every compilation inside the `with` block."""
  count = CompilationCount()

  def on_duration(event: str, seconds: float, **kwargs) -> None:
    del kwargs
    if event == _COMPILE:
      count.compiled += 1
      count.seconds += seconds

  def on_event(event: str, **kwargs) -> None:
    del kwargs
    if event == _CACHE_HIT:
      count.cached += 1

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  jax.monitoring.register_event_listener(on_event)
  try:
    yield count
  finally:
    jax.monitoring.unregister_event_duration_listener(on_duration)
    jax.monitoring.unregister_event_listener(on_event)
