"""The path layer (influence_jax.paths) and what builds on it (io, the store, the workdir lock), on a local
directory and on gs:// against a real GCS emulator (tests/gcs_emulator.py)."""

import json
import time

import numpy as np
import pytest

from influence_jax import io as io_lib
from influence_jax import paths
from influence_jax import store as store_lib
from influence_jax.jobs import lock
from tests.gcs_emulator import gcs  # noqa: F401 (a fixture)


@pytest.fixture(params=["local", "gs"])
def base(request, tmp_path):
  """A fresh directory: local, or a prefix in the emulator's bucket."""
  if request.param == "local":
    return str(tmp_path / "w")
  return request.getfixturevalue("gcs") + "/w"


def test_files_round_trip(base):
  assert not paths.exists(base) and paths.listdir(base) == []
  f = paths.join(base, "a", "x.json")
  io_lib.atomic_write_json(f, {"x": [1, 2]})
  io_lib.atomic_write_csv(paths.join(base, "a", "t.csv"), [["h"], [1]])
  assert io_lib.read_json(f) == {"x": [1, 2]} and paths.read_text(paths.join(base, "a", "t.csv")) == "h\r\n1\r\n"
  assert paths.isdir(paths.join(base, "a")) and not paths.isdir(f) and paths.exists(f)
  assert sorted(paths.listdir(paths.join(base, "a"))) == ["t.csv", "x.json"]  # No temporary file left.
  io_lib.save_checked_npz(paths.join(base, "p.npz"), "fp", {"v": np.arange(3.0)})
  np.testing.assert_array_equal(io_lib.load_checked_npz(paths.join(base, "p.npz"), "fp")["v"], np.arange(3.0))
  assert io_lib.load_checked_npz(paths.join(base, "p.npz"), "other") is None
  paths.remove(f)
  paths.remove(f)  # Nothing there: no error.
  assert not paths.exists(f) and io_lib.read_json(f) is None
  with pytest.raises(FileNotFoundError):
    paths.read_bytes(f)
  assert paths.relative(paths.join(base, "a", "t.csv"), base) == "a/t.csv"


def test_store_round_trip_and_damage(base):
  meta = store_lib.StoreMeta(num_rows=10, k=3, sketch_dim=2, chunk_rows=4, fingerprint="f", store_dtype="bfloat16")
  s = store_lib.create(paths.join(base, "store"), meta)
  rng = np.random.default_rng(0)
  rows = {n: rng.normal(size=shape).astype(np.float32) for n, shape in meta.shapes().items()}
  for c in range(meta.num_chunks):
    lo, hi = meta.chunk_bounds(c)
    s.write_chunk(c, {n: v[lo:hi] for n, v in rows.items()}, digest=f"d{c}")
  s = store_lib.open_store(paths.join(base, "store"), "f")
  got = s.read(0, 10)
  assert all(v.dtype == np.float32 for v in got.values())
  np.testing.assert_array_equal(got["sq_norms"], rows["sq_norms"])  # float32 whatever store_dtype is.
  # bfloat16: 8 significant bits, relative rounding error at most 2⁻⁸.
  np.testing.assert_allclose(got["projections"], rows["projections"], rtol=2.0 ** -8)
  assert not np.array_equal(got["projections"], rows["projections"])
  assert s.done_chunks() == [0, 1, 2] and s.chunk_digest(1) == "d1"
  s.unmark(1)
  assert s.missing_chunks() == [1]
  with pytest.raises(store_lib.StoreError, match="incomplete"):
    store_lib.open_store(paths.join(base, "store"), "f")
  with pytest.raises(store_lib.StoreError, match="other inputs"):
    store_lib.create(paths.join(base, "store"), store_lib.StoreMeta(10, 3, 2, 4, "f"))  # float32 now.


def test_store_dtypes_are_checked(tmp_path):
  with pytest.raises(store_lib.StoreError, match="store_dtype 'int8'"):
    store_lib.StoreMeta(num_rows=4, k=1, sketch_dim=0, chunk_rows=4, fingerprint="f", store_dtype="int8")
  meta = store_lib.StoreMeta(num_rows=4, k=1, sketch_dim=0, chunk_rows=4, fingerprint="f", store_dtype="float16")
  s = store_lib.create(str(tmp_path / "s"), meta)
  with pytest.raises(store_lib.StoreError, match="overflow float16"):
    s.write_chunk(0, {"projections": np.full((4, 1), 1e6, np.float32), "sq_norms": np.ones(4, np.float32)})
  s.write_chunk(0, {"projections": np.full((4, 1), 3.0, np.float32), "sq_norms": np.full(4, 1e30, np.float32)})
  np.testing.assert_array_equal(s.read(0, 4)["sq_norms"], np.full(4, 1e30, np.float32))


def test_kvstore_specs_and_endpoints():
  assert paths.kvstore_spec("gs://b/run/store/x") == {"driver": "gcs", "bucket": "b", "path": "run/store/x/"}
  assert paths.kvstore_spec("/tmp/a") == {"driver": "file", "path": "/tmp/a"}
  assert paths.absolute("gs://b/run/") == "gs://b/run" and paths.join("gs://b/run", "x", "y") == "gs://b/run/x/y"
  paths.check_endpoints("/local", {"STORAGE_EMULATOR_HOST": "http://a"})  # Local: not concerned.
  paths.check_endpoints("gs://b/r", {})
  paths.check_endpoints("gs://b/r", {"STORAGE_EMULATOR_HOST": "127.0.0.1:1", "TENSORSTORE_GCS_HTTP_URL": "http://127.0.0.1:1"})
  with pytest.raises(ValueError, match="TENSORSTORE_GCS_HTTP_URL"):
    paths.check_endpoints("gs://b/r", {"STORAGE_EMULATOR_HOST": "http://127.0.0.1:1"})
  with pytest.raises(ValueError, match="needs a bucket"):
    paths.check_endpoints("gs://", {})


def test_a_lease_is_exclusive_names_its_holder_and_expires(gcs):  # noqa: F811
  path = gcs + "/w/.lock"
  first = lock.Lease(path, seconds=3.0)
  assert first.acquire() == ""
  held = first.generation
  who = lock.Lease(path, seconds=3.0).acquire()
  assert "pid" in who and "expires in" in who, who
  time.sleep(2.5)  # Renewed every second: still held past its first expiry.
  assert first.generation != held and "pid" in lock.Lease(path).acquire()
  first._stop.set()  # noqa: SLF001 (the holder stops renewing, as a killed job does)
  first._thread.join()  # noqa: SLF001
  time.sleep(3.5)
  second = lock.Lease(path, seconds=3.0)
  assert second.acquire() == ""  # Expired: taken over.
  assert json.loads(paths.read_text(path))["pid"] > 0
  second.release()
  assert not paths.exists(path)
  with pytest.raises(ValueError, match="positive"):
    lock.Lease(path, seconds=0)


def test_workdir_lock_on_gs_refuses_a_second_job(gcs):  # noqa: F811
  with lock.workdir_lock(gcs + "/w", lease_seconds=30):
    with pytest.raises(lock.WorkdirBusy, match="in use by another job: pid"):
      with lock.workdir_lock(gcs + "/w"):
        pass
  with lock.workdir_lock(gcs + "/w"):  # Released.
    pass


def test_a_job_whose_lease_is_taken_over_is_stopped(gcs):  # noqa: F811
  with pytest.raises(lock.WorkdirBusy, match="taken over by another job"):
    with lock.workdir_lock(gcs + "/w", lease_seconds=1.5):
      lock._blob(gcs + "/w/.lock").upload_from_string("{}")  # noqa: SLF001 (another job overwrites the lease)
      time.sleep(10)  # The next renewal finds another generation and interrupts this thread.
