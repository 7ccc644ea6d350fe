"""Running the jobs as processes for the benchmark scripts: their environment, and several at once with each
one's wall time and peak RSS."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job_env(devices: int, extra: dict) -> dict:
  """Returns the environment of a job process: this checkout importable, JAX on `devices` CPU devices."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), **extra)
  env.pop("XLA_FLAGS", None)
  return env


def run_together(commands: list, env: dict, timeout: float = 900) -> tuple:
  """Runs the commands as processes at once; returns (wall seconds, [peak RSS MiB of each], [output of each]).
  Raises RuntimeError with the output of the first that failed."""
  logs = [tempfile.TemporaryFile("w+") for _ in commands]
  start = time.monotonic()
  procs = [subprocess.Popen(c, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
           for c, log in zip(commands, logs)]
  rss, status, grace = {}, {}, None
  while len(status) < len(procs):
    for i, p in enumerate(procs):
      if i not in status:
        pid, st, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
          status[i], rss[i] = os.waitstatus_to_exitcode(st), usage.ru_maxrss / 1024
    if grace is None and any(status.values()):
      grace = time.monotonic() + 30  # one failed: the others get 30 s, then are killed (no hang)
    if time.monotonic() > min(start + timeout, grace or float("inf")):
      for i, p in enumerate(procs):
        if i not in status:
          p.kill()
          status[i], rss[i] = os.waitstatus_to_exitcode(os.wait4(p.pid, 0)[1]), 0.0
    time.sleep(0.1)
  wall = time.monotonic() - start
  outs = []
  for log in logs:
    log.seek(0)
    outs.append(log.read())
    log.close()
  for i in range(len(procs)):
    if status[i]:
      raise RuntimeError(f"{commands[i][1]} process {i} failed ({status[i]}):\n{outs[i][-4000:]}")
  return wall, [rss[i] for i in range(len(procs))], outs
