r"""A small encoder-decoder Transformer on a generated sequence-reversal task (the seed paper's
scaling to Transformers, in miniature): which training sequences shaped each test prediction.

  python scripts/run_all.py --config=configs/seq2seq_transformer.py --workdir=runs/seq2seq
"""

import os
import runpy

import ml_collections

# The base config, loaded by path: config files are run by path, not imported as a package.
_BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_mlp.py"))


def get_config() -> ml_collections.ConfigDict:
  c = _BASE["get_config"]()
  c.data = ml_collections.ConfigDict(dict(
      name="seq2seq", task="reverse", num_examples=1200, seq_len=6, vocab_size=10, test_fraction=0.1,
      num_train=-1, num_test=64, label_noise=0.0))
  c.model = ml_collections.ConfigDict(dict(name="transformer", d_model=32, num_heads=2, d_ff=64, num_layers=1,
                                           num_classes=10))
  c.train.learning_rate = 3e-3
  c.train.num_epochs = 60
  c.train.batch_size = 64
  c.train.l2 = 1e-4
  c.arnoldi.n_iters = 100
  c.arnoldi.top_k = 50
  c.arnoldi.batch_size = 256
  c.score.batch_size = 128
  return c
