"""The jobs' glibc mmap threshold: block-sized buffers freed in a loop go back to the OS."""

import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates and frees 2–16 MB buffers (store blocks in miniature) with small long-lived arrays in
# between, as a streaming job does; prints how much resident memory is left over, in MB.
_CHURN = """
import sys
import numpy as np
from influence_jax.jobs import common
if sys.argv[1] == "set":
  assert common.release_freed_blocks()
rss = lambda: int([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS")][0]) / 1024
base, rng, keep, live = rss(), np.random.default_rng(0), [], []
for _ in range(600):
  live.append(np.ones(int(rng.integers(250_000, 2_000_000))))
  keep.append(np.ones(200))
  if len(live) > 3:
    live.pop(int(rng.integers(0, len(live))))
del live
print(rss() - base)
"""


def left_over_mb(mode):
  proc = subprocess.run([sys.executable, "-c", _CHURN, mode], env=dict(os.environ, PYTHONPATH=ROOT),
                        capture_output=True, text=True, check=True)
  return float(proc.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_blocks_return_to_the_os():
  assert left_over_mb("set") < 8, "block-sized buffers stayed resident after being freed"
