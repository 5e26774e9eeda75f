"""D-LEAF and the baselines it is compared to, as serialisable configs in one registry
(:mod:`~dleaf_analysis.interventions.base`), one file per method:

- ``greedy``: no intervention (:mod:`.base`);
- ``dleaf``: dynamic layer selection by LIAE, head correction by IAF (:mod:`.dleaf`);
- ``uniform``: the same fusion in every candidate layer at every step (:mod:`.uniform`);
- ``pai``: PAI-style amplification of image attention (:mod:`.pai`);
- ``vcd``: visual contrastive decoding (:mod:`.vcd`);
- ``ablate``: zero or mean ablation of heads (:mod:`.ablate`);
- ``probe``: the grounding probes (:mod:`.probe`).

Shared tensor operations are in :mod:`.ops`; planted faults (calibration) in :mod:`.faults`.
Definitions: ``docs/method.md``; adding a method: ``docs/extending.md``.
"""

from dleaf_analysis.interventions.base import (METHODS, ConfigError, Greedy, Method, RunRecord, get_method,
                                               load_config, method_from_dict, register)
from dleaf_analysis.interventions.ops import FUSIONS, fuse_heads, image_columns, image_key_mask
from dleaf_analysis.hooks import image_positions
from dleaf_analysis.interventions.dleaf import HEAD_SELECTIONS, RUNNING_SEEDS, THRESHOLDS, DLeaf
from dleaf_analysis.interventions.uniform import UniformFusion
from dleaf_analysis.interventions.pai import PAI
from dleaf_analysis.interventions.vcd import VCD
from dleaf_analysis.interventions.ablate import HeadAblation
from dleaf_analysis.interventions.probe import PROBE_KINDS, ImageAttentionProbe

__all__ = ["FUSIONS", "HEAD_SELECTIONS", "METHODS", "PROBE_KINDS", "RUNNING_SEEDS", "THRESHOLDS", "ConfigError",
           "DLeaf", "Greedy", "HeadAblation", "ImageAttentionProbe", "Method", "PAI", "RunRecord", "UniformFusion",
           "VCD", "fuse_heads", "get_method", "image_columns", "image_key_mask", "image_positions", "load_config",
           "method_from_dict", "register"]
