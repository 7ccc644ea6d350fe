r"""A small CNN on scikit-learn's digits (8×8×1 images): train, eigenspace, influence.

  python scripts/run_all.py --config=configs/digits_cnn.py --workdir=runs/digits_cnn
"""

import os
import runpy

import ml_collections

# The base config, loaded by path: config files are run by path, not imported as a package.
_BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_mlp.py"))


def get_config() -> ml_collections.ConfigDict:
  c = _BASE["get_config"]()
  c.model = ml_collections.ConfigDict(dict(name="cnn", features=(8, 16), num_classes=10))
  c.train.learning_rate = 3e-3
  c.train.num_epochs = 40
  return c
