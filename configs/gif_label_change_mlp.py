r"""GIF label change on digits with the MLP: a backdoor trigger on 10% of the training images (labelled 7), fixed
by an influence edit, against retraining on the corrected labels (docs/design.md, "The papers' methods").

  python scripts/gif_label_change.py --config=configs/gif_label_change_mlp.py --workdir=runs/gif_label_change_mlp

Random label flips instead of the trigger: --config.corruption.kind=flip --config.corruption.fraction=0.1.
"""

import os
import runpy

import ml_collections

_BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "gif_class_removal_mlp.py"))


def get_config() -> ml_collections.ConfigDict:
  c = _BASE["get_config"]()
  c.task = "label_change"
  del c.edit["removed_class"]
  c.edit.ratios = (0.05,)  # The authors' label-change setting: 5 % of the parameters, output ranking.
  c.edit.selections = ("output",)
  c.corruption = ml_collections.ConfigDict(dict(
      kind="trigger",  # "trigger": datasets.add_trigger (stamp + target label); "flip": datasets.flip_labels.
      fraction=0.1,  # Of the training examples (the authors: 10 %).
      target_class=7,  # The trigger's label (unused by "flip").
      trigger_size=3,
  ))
  return c
