r"""Benchmark: a pod in miniature. fit → project → score as the jobs run them (scripts/fit_eigenspace.py,
project.py, score.py), on 2 processes × 4 CPU devices joined with jax.distributed on 127.0.0.1, mesh (2, 4), over a
decoder-only Transformer LM whose kernels are split over 'model' (configs/pod_lm.py: p = 2,439,552, the defaults
on: residual basis V, Galerkin preconditioned query solves, float32 store), the workdir gs:// on a GCS emulator
(fake-gcs-server on 127.0.0.1). Then the same stages in one process (8 CPU devices, same mesh and config) on a
local workdir. Prints per stage and run: wall time, peak RSS of each process (getrusage of the child); the bytes
each device holds of U and V (from the arrays' addressable shards, as the jobs load them) against
(k + r)·⌈p/|model|⌉·4; and whether the tables equal the one-process run's.

  python scripts/bench_pod.py                     # configs/pod_lm.py as is (≈ 7 min on 2 shared cores)
  python scripts/bench_pod.py --override=--config.arnoldi.n_iters=20
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from job_runs import job_env, run_together  # noqa: E402

_CONFIG = flags.DEFINE_string("task_config", os.path.join(ROOT, "configs", "pod_lm.py"), "The jobs' config file.")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "--config.a.b=value overrides passed to every job.")
_PROCESSES = flags.DEFINE_integer("processes", 2, "Processes of the multi-process run.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 4, "CPU devices per process.")
_KEEP = flags.DEFINE_string("keep", "", "Copy the local run's workdir here (default: deleted).")
# Internal: one process of the held-bytes measurement.
_HELD = flags.DEFINE_string("held_bytes_of", "", "(internal) workdir whose U and V a process loads and measures.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "(internal) for --held_bytes_of.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "(internal) for --held_bytes_of.")

STAGES = ("fit_eigenspace.py", "project.py", "score.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def job_commands(script: str, workdir: str, processes: int) -> list:
  base = [sys.executable, os.path.join(ROOT, "scripts", script), f"--config={_CONFIG.value}",
          f"--workdir={workdir}", "--quiet", *_OVERRIDES.value]
  if processes == 1:
    return [base]
  port = _free_port()
  return [base + [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}"]
          for i in range(processes)]


def run_stages(workdir: str, processes: int, devices: int, env_extra: dict) -> list:
  """Runs fit, project, score; returns [(stage, wall s, [peak RSS MiB per process])]."""
  rows = []
  for script in STAGES:
    wall, rss, _ = run_together(job_commands(script, workdir, processes), job_env(devices, env_extra))
    rows.append((script.removesuffix(".py"), wall, rss))
    print(f"  {rows[-1][0]:<15} {wall:7.1f} s   peak RSS per process: {', '.join(f'{r:.0f} MiB' for r in rss)}",
          flush=True)
  return rows


def held_bytes(workdir: str) -> dict:
  """(In each process of the measurement.) Loads U and V as the jobs do (on the config's mesh) and returns
  {"U": [bytes of each addressable device], "V": [...], "k", "r", "p", "model"}."""
  import runpy  # noqa: PLC0415

  from influence_jax import sharding  # noqa: PLC0415
  from influence_jax.jobs import context  # noqa: PLC0415
  from influence_jax.jobs import workdir as workdir_lib  # noqa: PLC0415

  if _COORDINATOR.value:
    sharding.initialize_distributed(_COORDINATOR.value, _PROCESSES.value, _PROCESS_ID.value)
  config = runpy.run_path(_CONFIG.value)["get_config"]()
  ctx = context.prepare(config, workdir)
  es = workdir_lib.load_eigenspace(ctx)
  basis = workdir_lib.load_residual_basis(ctx, es)
  per_device = lambda x: [int(s.data.nbytes) for s in x.addressable_shards]
  return {"U": per_device(es.eigenvectors), "V": per_device(basis), "k": int(es.k), "r": int(basis.shape[0]),
          "p": sharding.num_params(ctx.task.params), "model": int(ctx.mesh.shape[sharding.MODEL]),
          "U_spec": str(es.eigenvectors.sharding.spec), "V_spec": str(basis.sharding.spec)}


def measure_held_bytes(workdir: str, env_extra: dict) -> list:
  port = _free_port()
  commands = [[sys.executable, os.path.abspath(__file__), f"--task_config={_CONFIG.value}", f"--held_bytes_of={workdir}",
               f"--coordinator_address=127.0.0.1:{port}", f"--processes={_PROCESSES.value}", f"--process_id={i}"]
              + [f"--override={o}" for o in _OVERRIDES.value] for i in range(_PROCESSES.value)]
  _, _, outs = run_together(commands, job_env(_DEVICES.value, env_extra))
  return [json.loads(next(line for line in out.splitlines() if line.startswith("{"))) for out in outs]


def compare_tables(gs_workdir: str, local_workdir: str) -> tuple:
  """Returns (byte-identical names, the tolerance check's verdict) for the gs:// run's tables against the local one's."""
  from tests.test_gcs_jobs import download  # noqa: PLC0415
  from tests.test_multihost_jobs import REL, _compare_outputs  # noqa: PLC0415
  from tests.user_task_jobs import table  # noqa: PLC0415

  got = download(gs_workdir, tempfile.mkdtemp())
  names = {"top_k.csv": (table(got, "top_k.csv"), table(local_workdir, "top_k.csv")),
           "self_influence.csv": (table(got, "self_influence.csv"), table(local_workdir, "self_influence.csv")),
           "eigenvalues.json": (os.path.join(got, "eigenvalues.json"), os.path.join(local_workdir, "eigenvalues.json"))}
  read = lambda path: open(path, "rb").read()
  identical = {n: read(a) == read(b) for n, (a, b) in names.items()}
  try:
    _compare_outputs(got, local_workdir)
    verdict = f"equal (eigenvalues and scores to {REL:g} relative, the same rows in the same order)"
  except AssertionError as e:
    verdict = f"DIFFER: {str(e)[:500]}"
  shutil.rmtree(got)
  return identical, verdict


def main(argv):
  del argv
  if _HELD.value:
    print(json.dumps(held_bytes(_HELD.value)), flush=True)
    return
  from tests.gcs_emulator import BUCKET, emulator_env, running_emulator  # noqa: PLC0415

  local = tempfile.mkdtemp(prefix="bench_pod_")
  with running_emulator() as url:
    env_extra = emulator_env(url)
    os.environ.update(env_extra)  # this process reads the gs:// tables too
    gs = f"gs://{BUCKET}/pod"
    n, d = _PROCESSES.value, _DEVICES.value
    print(f"config {os.path.relpath(_CONFIG.value, ROOT)} {' '.join(_OVERRIDES.value)}; {os.cpu_count()} CPU cores")
    print(f"{n} processes × {d} CPU devices, workdir {gs} (fake-gcs-server at {url}):", flush=True)
    pod = run_stages(gs, n, d, env_extra)
    held = measure_held_bytes(gs, env_extra)
    print(f"1 process × {n * d} CPU devices, local workdir:", flush=True)
    one = run_stages(local, 1, n * d, env_extra)
    identical, verdict = compare_tables(gs, local)
  h = held[0]
  p, k, r, model = h["p"], h["k"], h["r"], h["model"]
  cols = -(-p // model)
  print(f"\np = {p:,}, k = {k}, r = {r}, |model| = {model}: U {h['U_spec']}, V {h['V_spec']}")
  for i, x in enumerate(held):
    print(f"  process {i}: bytes per device of U {sorted(set(x['U']))}, of V {sorted(set(x['V']))}; "
          f"(k + r)·⌈p/|model|⌉·4 = {(k + r) * cols * 4:,}; whole U and V: {(k + r) * p * 4:,}")
  print("\nstage            2-proc gs:// wall  peak RSS/process   1-proc local wall  peak RSS")
  for (name, w2, r2), (_, w1, r1) in zip(pod, one):
    print(f"  {name:<15} {w2:9.1f} s   {max(r2):8.0f} MiB        {w1:9.1f} s   {r1[0]:6.0f} MiB")
  print(f"\ntables of the 2-process gs:// run against the 1-process local run: {verdict}")
  print("  byte-identical: " + ", ".join(f"{n}: {'yes' if v else 'no'}" for n, v in identical.items()))
  if _KEEP.value:
    shutil.copytree(local, _KEEP.value, dirs_exist_ok=True)
  shutil.rmtree(local)


if __name__ == "__main__":
  app.run(main)
