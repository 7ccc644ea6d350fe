r"""Benchmark: a real model through the jobs. A decoder-only Transformer LM of 3.4M parameters on 50,000 generated
sequences on disk (configs/lm_bench.py), fit → project → score at the jobs' defaults, each stage a process
(scripts/fit_eigenspace.py, project.py, score.py). Prints per stage: wall time, peak RSS, XLA compilations and
their time; the fit's progress saves' share, its peak against basis + model (the Krylov basis the fit holds:
⌈(n_iters + 1)/block⌉·block rows of p float32), the residual basis' time against the fit's, the projection's
sequences/s against a batched `jax.grad` of the mean loss on the same model and batch size (measured in this
process, once the jobs are done), and the score job's cost per query.

  python scripts/bench_lm.py                        # the full benchmark (hours on 2 CPU cores)
  python scripts/bench_lm.py --config.user.num_train=5000 --config.arnoldi.num_examples=64
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from job_runs import job_env, run_together  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs", "lm_bench.py"),
                                          "The jobs' config file; --config.a.b=value overrides go to every job too.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Workdir (default: a temporary one, deleted); the data go in data/.")

STAGES = ("fit_eigenspace.py", "project.py", "score.py")


def _search(pattern: str, text: str, cast=float, default=None):
  m = re.search(pattern, text)
  return cast(m.group(1)) if m else default


def grad_rate(config, batch_size: int, repeats: int = 3) -> float:
  """Returns sequences/s of jit(grad) of the mean loss on batches of `batch_size` training sequences (best of
  `repeats` after a warm-up): one backward pass a batch, no per-example work."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from influence_jax.examples import pod_lm  # noqa: PLC0415

  task = pod_lm.get_task(config)
  batch = task.train.read_batch(np.arange(batch_size))
  step = jax.jit(jax.grad(task.loss_fn))
  jax.block_until_ready(step(task.params, batch))
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(task.params, batch))
    best = min(best, time.perf_counter() - start)
  return batch_size / best


def main(argv):
  del argv
  workdir = os.path.abspath(_WORKDIR.value or tempfile.mkdtemp(prefix="bench_lm_"))
  config = _CONFIG.value
  config.user.data_dir = os.path.join(workdir, "data")
  given = [arg for arg in sys.argv[1:] if arg.startswith("--config.")]
  overrides = [*given, f"--config.user.data_dir={config.user.data_dir}"]
  config_file = flags.FLAGS["config"].config_filename
  u, a = config.user, config.arnoldi
  print(f"config {os.path.relpath(config_file, ROOT)} {' '.join(given)}; {os.cpu_count()} CPU cores; "
        f"workdir {workdir}", flush=True)
  logs = {}
  for script in STAGES:
    cmd = [sys.executable, os.path.join(ROOT, "scripts", script), f"--config={config_file}", f"--workdir={workdir}",
           *overrides]
    wall, rss, out = run_together([cmd], job_env(1, {}), timeout=24 * 3600)
    name = script.removesuffix(".py")
    logs[name] = (wall, rss[0], out[0])
    compiles = _search(r"(\d+) XLA compilations", out[0], int, 0)
    compile_s = _search(r"XLA compilations \(([\d.]+) s", out[0], float, 0.0)
    print(f"  {name:<15} {wall:8.1f} s   peak RSS {rss[0]:7.0f} MiB   {compiles} XLA compilations ({compile_s:.0f} s)",
          flush=True)
  fit_wall, fit_rss, fit_log = logs["fit_eigenspace"]
  p = _search(r"\): (\d+) parameters", fit_log, int)
  rows = a.block_size * math.ceil((a.n_iters + 1) / a.block_size)
  basis_mib, model_mib = rows * p * 4 / 2**20, p * 4 / 2**20
  saves = re.search(r"progress saved (\d+) times in ([\d.]+) s \(([\d.]+) %", fit_log)
  print(f"\np = {p:,}: basis {rows} × p float32 = {basis_mib:.0f} MiB, model {model_mib:.0f} MiB")
  print(f"fit: peak RSS {fit_rss:.0f} MiB = {fit_rss / (basis_mib + model_mib):.2f} × (basis + model); "
        + (f"progress saved {saves.group(1)} times, {saves.group(3)} % of the fit" if saves else "no progress saves"))
  _, project_rss, project_log = logs["project"]
  residual_s = _search(r"Residual basis: .* in ([\d.]+) s", project_log)
  projected = re.search(r"Projected (\d+) examples in ([\d.]+) s \((\d+) examples/s", project_log)
  if residual_s is not None:
    print(f"residual basis: {residual_s:.0f} s = {residual_s / fit_wall:.2f} × the fit's wall time")
  rate = grad_rate(config, config.project.batch_size)
  if projected:
    seq_s = float(projected.group(3))
    print(f"projection: {projected.group(1)} sequences in {projected.group(2)} s, {seq_s:.1f} sequences/s; "
          f"batched jax.grad {rate:.1f} sequences/s: {rate / seq_s:.1f} × a projected sequence's time")
  score_wall, _, score_log = logs["score"]
  hw = re.search(r"forming H_W.*?(\d+)/(\d+) products, ([\d.]+) products/s", score_log)
  queries = u.num_queries
  print(f"score: {score_wall:.0f} s for {queries} queries ({score_wall / queries:.2f} s a query, the job's start "
        "included)" + (f"; H_W formed from {hw.group(2)} products at {hw.group(3)} products/s "
                       f"({int(hw.group(2)) / float(hw.group(3)):.0f} s, once per store)" if hw else ""))
  if not _WORKDIR.value:
    shutil.rmtree(workdir)


if __name__ == "__main__":
  app.run(main)
