"""Every job refuses a config FILE with a key it does not know, naming the key and the one meant
(issue 27, item 5): overrides were checked by ml_collections, keys set in the file were not.

Each script gets its own shipped config with one misspelt key added, as a user would write it; the
check runs before the work directory is touched. Every shipped config passes its job's check.
"""

import os
import runpy
import subprocess
import sys

import pytest

from influence_jax.eval import benchmark
from influence_jax.jobs import config as config_lib
from influence_jax.jobs.papers import gif_job, memorization_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# script: (its config, the misspelt line, the key named, the key suggested)
CASES = {
    "fit_eigenspace.py": ("digits_mlp.py", "c.arnoldi.topk = 5", "arnoldi.topk", "arnoldi.top_k"),
    "project.py": ("digits_mlp.py", "c.project.sketch_dims = 8", "project.sketch_dims", "project.sketch_dim"),
    "score.py": ("digits_mlp.py", "c.score.normalise = 'cosine'", "score.normalise", "score.normalize"),
    "train.py": ("digits_cnn.py", "c.arnoldi.dampng = 0.1", "arnoldi.dampng", "arnoldi.damping"),
    "run_all.py": ("digits_mlp.py", "c.scores = dict(top_k=3)", "scores", "score"),
    "memorization.py": ("memorization_digits.py", "c.memorization.dampng = 0.1", "memorization.dampng",
                        "memorization.damping"),
    "selective_removal.py": ("selective_removal_digits.py", "c.removal.budget = (1,)", "removal.budget",
                             "removal.budgets"),
    "gif_class_removal.py": ("gif_class_removal_mlp.py", "c.edit.ratio = (0.1,)", "edit.ratio", "edit.ratios"),
    "gif_label_change.py": ("gif_label_change_cnn.py", "c.corruption.fractions = 0.1", "corruption.fractions",
                            "corruption.fraction"),
    "benchmark_methods.py": ("benchmark_digits.py", "c.methods.cg.max_iter = 3", "methods.cg.max_iter",
                             "methods.cg.max_iters"),
}


def _write_config(directory, script, base, line):
  path = os.path.join(directory, f"bad_{script[:-3]}_{base}")
  with open(path, "w") as f:
    f.write("import runpy\n\n\ndef get_config():\n"
            f"  c = runpy.run_path({os.path.join(ROOT, 'configs', base)!r})['get_config']()\n"
            f"  {line}\n  return c\n")
  return path


def test_every_job_refuses_an_unknown_key_in_its_config_file(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  procs = {}
  for script, (base, line, _, _) in CASES.items():
    config = _write_config(str(tmp_path), script, base, line)
    workdir = os.path.join(str(tmp_path), "work_" + script)
    procs[script] = (workdir, subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "scripts", script), f"--config={config}", f"--workdir={workdir}"],
        env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  for script, (workdir, proc) in procs.items():
    _, stderr = proc.communicate(timeout=300)
    _, _, key, meant = CASES[script]
    assert proc.returncode == 1, (script, stderr[-2000:])
    assert f"Error: config.{key} is not a key of" in stderr and f"Did you mean config.{meant}?" in stderr, (
        script, stderr[-2000:])
    assert "Traceback" not in stderr and not os.path.exists(workdir), script


def _config(name, arg=None):
  get = runpy.run_path(os.path.join(ROOT, "configs", name))["get_config"]
  return get(arg) if arg else get()


@pytest.mark.parametrize("name,check", [
    ("digits_mlp.py", config_lib.check_job_keys), ("digits_cnn.py", config_lib.check_job_keys),
    ("seq2seq_transformer.py", config_lib.check_job_keys), ("bench_scale.py", config_lib.check_job_keys),
    ("memorization_digits.py", memorization_job.config_checker("memorization")),
    ("selective_removal_digits.py", memorization_job.config_checker("selective_removal")),
    ("gif_class_removal_mlp.py", gif_job.config_checker("class_removal")),
    ("gif_class_removal_cnn.py", gif_job.config_checker("class_removal")),
    ("gif_label_change_mlp.py", gif_job.config_checker("label_change")),
    ("gif_label_change_cnn.py", gif_job.config_checker("label_change")),
    ("benchmark_digits.py", benchmark.check_config), ("benchmark_digits85k.py", benchmark.check_config),
    ("benchmark_sketch.py", benchmark.check_config),
])
def test_shipped_configs_pass_their_jobs_check(name, check):
  check(_config(name))


def test_benchmark_checks_method_settings_and_kinds():
  c = _config("benchmark_digits85k.py", "small")
  benchmark.check_config(c)
  c.methods.cg.method = "cgg"
  with pytest.raises(ValueError, match=r"config.methods.cg.method = 'cgg'"):
    benchmark.check_config(c)
  c = _config("benchmark_digits.py")
  c.problems.digits_mlp.overrides = {"lissa": {"scal": 3.0}}
  with pytest.raises(ValueError, match=r"config.problems.digits_mlp.overrides.lissa.scal .* Did you mean "
                                       r"config.problems.digits_mlp.overrides.lissa.scale\?"):
    benchmark.check_config(c)
