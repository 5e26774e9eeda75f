"""Image sources: the images, ground truth, mention matcher, counterfactuals and POPE questions that
evaluation, events, studies, tuning, calibration and figures consume (see
:mod:`dleaf_analysis.sources.base`).  :func:`as_source` is the one coercion, applied at the entry
points (the CLI and the top-level Python functions); everything below takes an ``ImageSource``."""

from dleaf_analysis.sources.base import ImageSource, Mention, SourceError
from dleaf_analysis.sources.coco import CocoSource, coco_image_id, load_pope_questions, read_image_ids
from dleaf_analysis.sources.fill import FILLS, remove_object
from dleaf_analysis.sources.jsonl import JsonlSource
from dleaf_analysis.sources.scene import SceneSource


def as_source(source, limit: int | None = None) -> ImageSource:
    """An image source from a scene split name (``"dev"``), a scene :class:`~dleaf_analysis.scenes.Split`
    or a source; its first ``limit`` items."""
    from dleaf_analysis.scenes import SPLITS, Split

    if isinstance(source, str):
        if source not in SPLITS:
            raise SourceError(f"unknown split {source!r}; choose one of {sorted(SPLITS)}, or give a COCO or JSONL source")
        return SceneSource.load(source, limit=limit)
    if isinstance(source, Split):
        source = SceneSource(source)
    if not isinstance(source, ImageSource):
        raise SourceError(f"expected a split name or an image source, got {type(source).__name__}")
    return source.limit(limit)


__all__ = ["ImageSource", "Mention", "SourceError", "SceneSource", "CocoSource", "JsonlSource", "remove_object",
           "FILLS", "read_image_ids", "as_source", "coco_image_id", "load_pope_questions"]
