"""The synthetic scene world: specification, renderer, frozen splits, questions."""

from dleaf_analysis.scenes.render import object_mask, render, to_pil
from dleaf_analysis.scenes.splits import (
    POPE_VARIANTS,
    SPLITS,
    ObjectStats,
    Split,
    UnknownSplitError,
    load_split,
    pope_questions,
    write_manifests,
)
from dleaf_analysis.scenes.world import Scene, SceneObject, World

__all__ = [
    "POPE_VARIANTS", "SPLITS", "ObjectStats", "Scene", "SceneObject", "Split", "UnknownSplitError",
    "World", "load_split", "object_mask", "pope_questions", "render", "to_pil", "write_manifests",
]
