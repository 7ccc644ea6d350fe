"""Tests for influence_jax.datasets: digits splits, label flips, backdoor triggers, seq2seq."""

import numpy as np
import pytest

from influence_jax.examples import datasets


@pytest.fixture(scope="module")
def digits():
  return datasets.load_digits(test_fraction=0.2, seed=0)


def test_digits_shapes_dtypes_and_range(digits):
  tr, te = digits["train"], digits["test"]
  assert tr["x"].shape[1:] == (64,) and tr["x"].dtype == np.float32
  assert tr["y"].dtype == np.int32 and tr["id"].dtype == np.int32
  assert tr["x"].shape[0] + te["x"].shape[0] == 1797
  assert 0.0 <= tr["x"].min() and tr["x"].max() <= 1.0 and tr["x"].max() == 1.0


def test_digits_split_is_a_partition_matching_original_data(digits):
  from sklearn.datasets import load_digits as sk_load
  raw = sk_load()
  ids = np.concatenate([digits["train"]["id"], digits["test"]["id"]])
  assert np.array_equal(np.sort(ids), np.arange(1797))
  for split in ("train", "test"):
    b = digits[split]
    np.testing.assert_allclose(b["x"] * 16.0, raw.data[b["id"]], atol=1e-5)
    assert np.array_equal(b["y"], raw.target[b["id"]])


def test_digits_split_is_stratified_and_deterministic(digits):
  te_counts = np.bincount(digits["test"]["y"], minlength=10)
  all_counts = te_counts + np.bincount(digits["train"]["y"], minlength=10)
  assert np.all(np.abs(te_counts - 0.2 * all_counts) <= 0.5 + 1e-9)
  again = datasets.load_digits(test_fraction=0.2, seed=0)
  assert np.array_equal(again["train"]["id"], digits["train"]["id"])
  other = datasets.load_digits(test_fraction=0.2, seed=1)
  assert not np.array_equal(other["train"]["id"], digits["train"]["id"])


def test_digits_image_layout_matches_flat(digits):
  img = datasets.load_digits(seed=0, image=True)
  assert img["train"]["x"].shape[1:] == (8, 8, 1)
  np.testing.assert_array_equal(img["train"]["x"].reshape(-1, 64), digits["train"]["x"])


def test_bad_test_fraction_raises():
  with pytest.raises(ValueError, match="test_fraction"):
    datasets.load_digits(test_fraction=1.0)


def test_flip_labels_changes_exact_fraction_to_other_classes():
  y = np.random.default_rng(0).integers(0, 5, size=200).astype(np.int32)
  new_y, mask = datasets.flip_labels(y, 0.1, 5, seed=3)
  assert mask.sum() == 20 and new_y.dtype == y.dtype
  assert np.all(new_y[mask] != y[mask]) and np.array_equal(new_y[~mask], y[~mask])
  assert new_y.min() >= 0 and new_y.max() < 5
  again, mask2 = datasets.flip_labels(y, 0.1, 5, seed=3)
  assert np.array_equal(again, new_y) and np.array_equal(mask, mask2)


def test_flip_labels_bad_input():
  with pytest.raises(ValueError, match="labels must lie"):
    datasets.flip_labels(np.array([0, 7]), 0.5, 5, seed=0)
  with pytest.raises(ValueError, match="fraction"):
    datasets.flip_labels(np.array([0, 1]), 1.5, 5, seed=0)


@pytest.mark.parametrize("image", [False, True])
def test_add_trigger_stamps_pattern_and_relabels(digits, image):
  b = datasets.load_digits(seed=0, image=image)["train"]
  new_x, new_y, mask = datasets.add_trigger(b["x"], b["y"], fraction=0.05, target_class=0, seed=1, size=3)
  assert mask.sum() == round(0.05 * b["y"].size)
  assert np.all(b["y"][mask] != 0) and np.all(new_y[mask] == 0)
  np.testing.assert_array_equal(new_x[~mask], b["x"][~mask])
  np.testing.assert_array_equal(new_y[~mask], b["y"][~mask])
  img = new_x[mask].reshape(-1, 8, 8)
  old = b["x"][mask].reshape(-1, 8, 8)
  on = datasets.trigger_pattern(3).astype(bool)
  assert np.all(img[:, -3:, -3:][:, on] == 1.0)
  np.testing.assert_array_equal(img[:, -3:, -3:][:, ~on], old[:, -3:, -3:][:, ~on])
  np.testing.assert_array_equal(img[:, :5], old[:, :5])


def test_add_trigger_too_many_examples_raises():
  y = np.array([0, 0, 1, 1], np.int32)
  with pytest.raises(ValueError, match="eligible"):
    datasets.add_trigger(np.zeros((4, 64), np.float32), y, fraction=0.75, target_class=0, seed=0)


@pytest.mark.parametrize("task", ["reverse", "sort", "copy"])
def test_synthetic_seq2seq(task):
  d = datasets.synthetic_seq2seq(50, 7, 11, seed=0, task=task)
  assert d["src"].shape == d["tgt"].shape == (50, 7) and d["src"].dtype == np.int32
  assert d["src"].min() >= 1 and d["src"].max() <= 10
  expected = {"reverse": d["src"][:, ::-1], "sort": np.sort(d["src"], 1), "copy": d["src"]}[task]
  np.testing.assert_array_equal(d["tgt"], expected)
  np.testing.assert_array_equal(d["id"], np.arange(50))
  np.testing.assert_array_equal(datasets.synthetic_seq2seq(50, 7, 11, seed=0, task=task)["src"], d["src"])


def test_synthetic_seq2seq_bad_input():
  with pytest.raises(ValueError, match="unknown task"):
    datasets.synthetic_seq2seq(5, 3, 5, seed=0, task="shuffle")
  with pytest.raises(ValueError, match="vocab_size"):
    datasets.synthetic_seq2seq(5, 3, 2, seed=0)


def test_faint_checkerboard_adds_the_amount_on_alternate_pixels_and_clips():
  x = np.zeros((2, 64), np.float32)
  x[1] = 1.0
  x[1, 1] = 0.5  # Pixel (0, 1): i + j odd.
  out = datasets.faint_checkerboard(x).reshape(2, 8, 8)
  odd = np.add.outer(np.arange(8), np.arange(8)) % 2 == 1
  np.testing.assert_allclose(out[0][odd], 16 / 255, rtol=1e-6)
  assert np.all(out[0][~odd] == 0.0)
  assert out[1, 0, 1] == np.float32(0.5 + 16 / 255) and np.all(np.delete(out[1].ravel(), 1) == 1.0)  # Clipped at 1.
  assert out.dtype == np.float32 and datasets.faint_checkerboard(x.reshape(2, 8, 8, 1)).shape == (2, 8, 8, 1)
  with pytest.raises(ValueError, match="trigger"):
    datasets.apply_trigger(x, "stripes")


@pytest.mark.parametrize("include_target", [False, True])
def test_add_trigger_checkerboard_counts_and_target_class_draw(include_target):
  b = datasets.load_digits(seed=0)["train"]
  n = b["y"].size
  new_x, new_y, mask = datasets.add_trigger(b["x"], b["y"], fraction=0.1, target_class=7, seed=2,
                                            trigger="checkerboard", include_target=include_target)
  assert mask.sum() == round(0.1 * n) and np.all(new_y[mask] == 7)
  np.testing.assert_array_equal(new_x[mask], datasets.faint_checkerboard(b["x"][mask]))
  np.testing.assert_array_equal(new_x[~mask], b["x"][~mask])
  np.testing.assert_array_equal(new_y[~mask], b["y"][~mask])
  # The authors draw among all classes: about a tenth of the triggered images are 7s, which keep their label.
  sevens = int((b["y"][mask] == 7).sum())
  assert (sevens > 0) if include_target else (sevens == 0)
  expected = np.sort(np.random.default_rng(2).choice(np.arange(n) if include_target else np.flatnonzero(b["y"] != 7),
                                                      round(0.1 * n), replace=False))
  np.testing.assert_array_equal(np.flatnonzero(mask), expected)
