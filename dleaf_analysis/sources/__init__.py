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


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``0 <= i < N``; ``None`` -> ``(0, 1)``."""
    if not shard:
        return 0, 1
    if shard == "slurm-array":  # one job of a Slurm job array
        from dleaf_analysis.distributed import slurm_array_shard

        return slurm_array_shard()
    try:
        i, n = (int(x) for x in str(shard).split("/"))
    except ValueError:
        raise SourceError(f"--shard must look like i/N (e.g. 0/4), got {shard!r}") from None
    if not (0 <= i < n):
        raise SourceError(f"--shard {shard}: need 0 <= i < N")
    return i, n


def from_options(split: str | None = None, coco_images=None, coco_annotations=None, image_ids=None,
                 images_jsonl=None, fill: str = "blur", default_split: str | None = "dev", limit: int | None = None,
                 shard: str | tuple[int, int] | None = None, require_annotations: bool = True) -> ImageSource | None:
    """The image source of the command-line options (one of ``--split``, ``--coco-images`` with
    ``--coco-annotations`` [and ``--image-ids``], ``--images-jsonl``), its first ``limit`` images, then
    its shard ``i/N``; ``None`` if no option names one and there is no default split."""
    coco = coco_images is not None or coco_annotations is not None
    given = [n for n, v in (("--split", split is not None), ("--coco-images/--coco-annotations", coco),
                            ("--images-jsonl", images_jsonl is not None)) if v]
    if len(given) > 1:
        raise SourceError(f"give one image source, not {' and '.join(given)}")
    if image_ids is not None and not coco:
        raise SourceError("--image-ids selects COCO images: give it with --coco-images DIR --coco-annotations FILE")
    if fill not in FILLS:
        raise SourceError(f"unknown --fill {fill!r}; choose one of {FILLS}")
    if coco:
        if coco_images is None or (coco_annotations is None and (require_annotations or image_ids is None)):
            raise SourceError("a COCO source needs --coco-images DIR and --coco-annotations FILE")
        src: ImageSource | None = CocoSource(coco_images, coco_annotations, image_ids, fill=fill)
    elif images_jsonl is not None:
        src = JsonlSource(images_jsonl, fill=fill)
    elif split is not None or default_split is not None:
        src = as_source(split or default_split)
    else:
        return None
    src = src.limit(limit)
    i, n = shard if isinstance(shard, tuple) else parse_shard(shard)
    return src.shard(i, n) if n > 1 else src


__all__ = ["from_options", "parse_shard", "ImageSource", "Mention", "SourceError", "SceneSource", "CocoSource", "JsonlSource", "remove_object",
           "FILLS", "read_image_ids", "as_source", "coco_image_id", "load_pope_questions"]
