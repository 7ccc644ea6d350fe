"""The built-in example tasks (digits MLP / CNN, seq2seq Transformer) as task factories.

`get_task(config)` is what `config.task = "influence_jax.examples.tasks:get_task"` names: the
same interface as a user's own model and data (influence_jax.jobs.Task). The model is trained
once by `train_example` (scripts/train.py) into `config.model_dir` (default: WORKDIR/model).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from influence_jax import checkpoint
from influence_jax import data as data_lib
from influence_jax import flax_adapters
from influence_jax import io as io_lib
from influence_jax import paths
from influence_jax import sources
from influence_jax.examples import datasets, models
from influence_jax.methods import training
from influence_jax.types import Task


class Example(NamedTuple):
  """A built-in data set and its model.

  splits: {"train": batch, "test": batch}, each with an "id" leaf of the data set's example ids.
  module: the Linen module; per_example_loss(outputs, labels) -> (B,).
  input_key / label_key: batch keys fed to the module and used as labels.
  image_side: side of square images for pictures (None when not images).
  """

  splits: dict
  module: Any
  per_example_loss: Any
  input_key: Any
  label_key: str
  image_side: Optional[int]


def _limit(batch: dict, n: int) -> dict:
  return batch if n is None or n < 0 else data_lib.take(batch, 0, min(n, data_lib.batch_size(batch)))


def _example_data(config) -> tuple:
  d = config.data
  if d.name == "digits":
    splits = datasets.load_digits(test_fraction=d.test_fraction, seed=config.seed, image=config.model.name in ("cnn", "tinynet"))
    if d.get("label_noise", 0.0):
      y, _ = datasets.flip_labels(splits["train"]["y"], d.label_noise, 10, config.seed)
      splits["train"] = dict(splits["train"], y=y)
    return splits, "x", "y", models.softmax_cross_entropy, 8
  if d.name == "seq2seq":
    raw = datasets.synthetic_seq2seq(d.num_examples, d.seq_len, d.vocab_size, config.seed, task=d.task)
    splits = datasets.split(raw, int(round(d.test_fraction * d.num_examples)))
    return splits, ("src", "tgt"), "tgt", models.sequence_cross_entropy, None
  raise ValueError(f"Unknown config.data.name {d.name!r}; expected 'digits' or 'seq2seq'.")


def _example_module(config):
  m, d = config.model, config.data
  if m.name == "mlp":
    return models.MLP(features=tuple(m.features), num_classes=m.num_classes, activation=m.activation)
  if m.name == "cnn":
    return models.CNN(features=tuple(m.features), num_classes=m.num_classes)
  if m.name == "tinynet":
    return models.TinyNet(features=tuple(m.features), num_classes=m.num_classes, upsample=m.get("upsample", 4))
  if m.name == "transformer":
    if d.name != "seq2seq":
      raise ValueError("config.model.name='transformer' needs config.data.name='seq2seq'.")
    return models.Transformer(vocab_size=d.vocab_size, max_len=d.seq_len, d_model=m.d_model,
                              num_heads=m.num_heads, d_ff=m.d_ff, num_layers=m.num_layers)
  raise ValueError(f"Unknown config.model.name {m.name!r}; expected 'mlp', 'cnn', 'tinynet' or 'transformer'.")


def build_example(config) -> Example:
  """Returns the Example named by config.data.name and config.model.name."""
  splits, inputs, labels, loss, side = _example_data(config)
  d = config.data
  splits = {"train": _limit(splits["train"], d.get("num_train", -1)),
            "test": _limit(splits["test"], d.get("num_test", -1))}
  return Example(splits, _example_module(config), loss, inputs, labels, side)


def init_variables(example: Example, config) -> Any:
  """Returns freshly initialised variables of the example's module (seeded by config.seed)."""
  keys = (example.input_key,) if isinstance(example.input_key, str) else example.input_key
  inputs = tuple(jnp.asarray(example.splits["train"][k][:2]) for k in keys)
  return example.module.init(jax.random.key(config.seed), *inputs)


def model_fns(example: Example, variables: Any, config) -> flax_adapters.ModelFns:
  """Returns loss_fn / per_example_loss_fn over the trainable params (L2 from config.train.l2)."""
  return flax_adapters.linen_loss_fns(example.module, variables, example.per_example_loss,
                                      input_key=example.input_key, label_key=example.label_key,
                                      l2=config.train.l2)


def model_fingerprint(config, example: Example) -> str:
  """Returns the hash of everything the trained model depends on (configs and the small data set)."""
  return io_lib.digest(config.seed, config.data.to_dict(), config.model.to_dict(),
                                config.train.to_dict(), example.splits)


def model_dir(config, workdir: Optional[str] = None) -> str:
  """Returns where the example's trained variables live: config.model_dir, or WORKDIR/model."""
  if config.get("model_dir"):
    return config.model_dir
  workdir = workdir or config.get("workdir")
  if not workdir:
    raise ValueError("Neither config.model_dir nor config.workdir is set: the jobs set config.workdir.")
  return paths.join(workdir, "model")


def evaluate(example: Example, fns: flax_adapters.ModelFns, params) -> dict:
  """Returns {"train_loss", "test_loss", "train_accuracy", "test_accuracy"} (accuracy per label token)."""
  out = {}
  for split, batch in example.splits.items():
    out[f"{split}_loss"] = float(jnp.mean(jax.jit(fns.per_example_loss_fn)(params, batch)))
    out[f"{split}_accuracy"] = training.accuracy(fns.outputs_fn, params, batch, label_key=example.label_key)
  return out


def train_example(config, workdir: Optional[str] = None, *, quiet: bool = False) -> Any:
  """Trains the example's model (or loads it if already trained with this config); returns the variables."""
  example = build_example(config)
  store = checkpoint.CheckpointDir(model_dir(config, workdir), model_fingerprint(config, example), max_to_keep=1)
  template = init_variables(example, config)
  found = store.restore_latest(target=template)
  if found is not None:
    logging.info("Model already trained in %s (%s)", store.directory, found[2].get("metrics"))
    store.close()
    return found[1]
  if jax.process_count() > 1:
    store.close()
    raise ValueError(f"No trained model in {store.directory}: training is single-process; run "
                     "scripts/train.py once without the multi-process flags first.")
  fns = model_fns(example, template, config)
  t = config.train
  if not quiet:
    logging.info("Training %s (%d params) on %d examples for %d epochs", config.model.name,
                 models.num_params(fns.params), data_lib.batch_size(example.splits["train"]), t.num_epochs)
  train_batch = {k: v for k, v in example.splits["train"].items() if k != "id"}
  params, history = training.train(fns.loss_fn, fns.params, train_batch,
                                   optimizer=training.optimizer_from_config(t), num_epochs=t.num_epochs,
                                   batch_size=t.batch_size, seed=config.seed)
  variables = fns.merge(params)
  metrics = evaluate(example, fns, params)
  logging.info("Trained: %s", metrics)
  store.save(0, variables, {"metrics": metrics, "final_loss": history["final_loss"]})
  store.close()
  return variables


def load_variables(config, example: Example, workdir: Optional[str] = None) -> Any:
  """Returns the trained variables from model_dir; raises FileNotFoundError when not trained yet."""
  store = checkpoint.CheckpointDir(model_dir(config, workdir), model_fingerprint(config, example), max_to_keep=1)
  found = store.restore_latest(target=init_variables(example, config))
  store.close()
  if found is None:
    raise FileNotFoundError(f"No trained model in {store.directory}: run scripts/train.py first.")
  return found[1]


def label_text(y) -> str:
  """Returns a class label as '7', a token sequence as '3 1 4'."""
  y = np.asarray(y)
  return str(int(y)) if y.ndim == 0 else " ".join(str(int(t)) for t in y.ravel())


def get_task(config) -> Task:
  """Returns the example as a Task: trained params, its losses, train / test splits as sources."""
  example = build_example(config)
  fns = model_fns(example, load_variables(config, example), config)
  split = lambda name: sources.ArraySource({k: v for k, v in example.splits[name].items() if k != "id"})
  side = example.image_side
  return Task(
      params=fns.params, loss_fn=fns.loss_fn, per_example_loss_fn=fns.per_example_loss_fn,
      train=split("train"), queries=split("test"),
      label_fn=lambda ex: label_text(ex[example.label_key]),
      image_fn=None if side is None else (lambda ex: np.asarray(ex["x"]).reshape(side, side)))
