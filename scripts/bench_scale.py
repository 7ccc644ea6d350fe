r"""Scale benchmark: a synthetic data set of N examples on disk (.npy records or ArrayRecord), then fit → project →
score through the jobs, each stage a separate process. Prints, per N: examples/s of the projection
stage and its ratio to the same run's plain batched gradient throughput (examples/s of jax.grad of
the mean loss on batches of the projection's batch size), peak resident memory of each stage, and
wall times (each stage's process, start-up included). A benchmark, not a test.

  python scripts/bench_scale.py --num_examples=1000000,10000000 --workdir=/tmp/bench_scale
"""

import os
import re
import subprocess
import tempfile
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_EXAMPLES = flags.DEFINE_list("num_examples", ["1000000"], "Training set sizes N.")
NUM_QUERIES = flags.DEFINE_integer("num_queries", 1000, "Query examples T.")
WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench_scale", "Where data sets and runs go.")
EXTRA = flags.DEFINE_list("config_overrides", [], "Extra --config.KEY=VALUE for every stage.")
FORMAT = flags.DEFINE_enum("format", "npy", ["npy", "array_record"],
                           "On-disk format: .npy fixed-size records (no index) or ArrayRecord shards.")


# Runs a job script and, at its exit, prints the peak resident memory of the job's own program:
# VmHWM of the process after exec. (ru_maxrss would not do: Linux carries the high-water mark of the
# forked copy of this benchmark process across exec, so every stage would report at least the
# benchmark's own peak, e.g. after writing a large data set.)
_WRAPPER = ("import atexit, runpy, sys\n"
            "def hwm():\n"
            "  kb = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
            "  sys.stderr.write(f'BENCH_VMHWM_KB {kb}\\n')\n"
            "atexit.register(hwm)\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def run_stage(script: str, workdir: str, data_dir: str) -> tuple[float, float, str]:
  """Runs one job; returns (wall seconds, peak resident memory in GiB, its stderr) of its process."""
  cmd = [sys.executable, "-c", _WRAPPER, os.path.join(ROOT, "scripts", script), f"--config={ROOT}/configs/bench_scale.py",
         f"--workdir={workdir}", f"--config.user.data_dir={data_dir}", f"--config.user.format={FORMAT.value}",
         "--quiet"] + [f"--config.{e}" for e in EXTRA.value]
  start = time.perf_counter()
  with tempfile.TemporaryFile("w+") as log:
    proc = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=ROOT), stderr=log)
    wall = time.perf_counter() - start
    log.seek(0)
    text = log.read()
  if proc.returncode != 0:
    raise SystemExit(f"{script} failed with status {proc.returncode}:\n{text[-3000:]}")
  peak_kb = float(re.search(r"BENCH_VMHWM_KB (\d+)", text).group(1))
  return wall, peak_kb / 2**20, text


def gradient_throughput(batch_size: int, hidden: int, seconds: float = 5.0) -> float:
  """Returns examples/s of jax.grad of the mean loss on batches of `batch_size` (jitted, warm)."""
  import jax
  import numpy as np

  from influence_jax.examples import synthetic

  params = synthetic.init_params(hidden)
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(batch_size, synthetic.NUM_FEATURES)).astype(np.float32),
           "y": rng.integers(0, synthetic.NUM_CLASSES, batch_size).astype(np.int32)}
  grad = jax.jit(jax.grad(synthetic.loss))
  jax.block_until_ready(grad(params, batch))
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    jax.block_until_ready(grad(params, batch))
    n += 1
  return n * batch_size / (time.perf_counter() - start)


def main(argv):
  del argv
  from influence_jax.examples import synthetic

  rows = []
  for n in map(int, NUM_EXAMPLES.value):
    base = os.path.join(WORKDIR.value, f"n{n}")
    data_dir = os.path.join(base, "data")
    if not os.path.exists(os.path.join(data_dir, "done")):
      t = time.perf_counter()
      if FORMAT.value == "npy":
        synthetic.write_npy_records(data_dir, n, prefix="train", seed=0)
        synthetic.write_npy_records(data_dir, NUM_QUERIES.value, prefix="queries", seed=1)
      else:
        synthetic.write_array_records(data_dir, n, prefix="train", seed=0)
        synthetic.write_array_records(data_dir, NUM_QUERIES.value, prefix="queries", num_shards=1, seed=1)
      open(os.path.join(data_dir, "done"), "w").close()
      print(f"N={n}: wrote the data set in {time.perf_counter() - t:.0f} s", flush=True)
    run = os.path.join(base, "run")
    stages = {name: run_stage(script, run, data_dir)
              for name, script in (("fit", "fit_eigenspace.py"), ("project", "project.py"), ("score", "score.py"))}
    grad_rate = gradient_throughput(4096, 32)
    # The job's own figure: examples / seconds of its projection loop (start-up and compilation excluded).
    proj_rate = float(re.search(r"\(([0-9.]+) examples/s", stages["project"][2]).group(1))
    rows.append((n, stages, proj_rate, grad_rate))
    print(f"N={n}: " + ", ".join(f"{k} {v[0]:.0f} s {v[1]:.2f} GiB" for k, v in stages.items()), flush=True)
  print("\n| N | fit s | project s | project ex/s | ÷ batched-gradient ex/s | score s (T = "
        f"{NUM_QUERIES.value}) | peak RSS fit / project / score GiB |")
  print("|---|---|---|---|---|---|---|")
  for n, st, pr, gr in rows:
    print(f"| {n:,} | {st['fit'][0]:.0f} | {st['project'][0]:.0f} | {pr:,.0f} | {pr / gr:.3f} ({gr:,.0f}) | "
          f"{st['score'][0]:.0f} | {st['fit'][1]:.2f} / {st['project'][1]:.2f} / {st['score'][1]:.2f} |")


if __name__ == "__main__":
  app.run(main)
