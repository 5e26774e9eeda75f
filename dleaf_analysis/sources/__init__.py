"""Image sources: the images, ground truth, mention matcher and counterfactuals that events,
studies, tuning, calibration and figures consume (see :mod:`dleaf_analysis.sources.base`)."""

from dleaf_analysis.sources.base import ImageSource, Mention, SourceError
from dleaf_analysis.sources.coco import CocoSource, read_image_ids
from dleaf_analysis.sources.fill import FILLS, remove_object
from dleaf_analysis.sources.jsonl import JsonlSource
from dleaf_analysis.sources.scene import SceneSource

__all__ = ["ImageSource", "Mention", "SourceError", "SceneSource", "CocoSource", "JsonlSource", "remove_object",
           "FILLS", "read_image_ids"]
