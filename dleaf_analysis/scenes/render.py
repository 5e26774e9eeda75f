"""Render a :class:`Scene` to an RGB image (``uint8``, ``[H, W, 3]``).

Drawing order: noisy background, clutter strokes, objects (in order), pixel noise.  The
background and noise come from the scene's own seed, and each object's colour jitter is
stored in the object, so a counterfactual (one object removed or added) differs from the
original only inside that object's glyph.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from dleaf_analysis.scenes.world import Scene, SceneObject, World


@lru_cache(maxsize=512)
def glyph_mask(shape: str, size: int) -> np.ndarray:
    """Boolean mask ``[size, size]`` of a shape drawn in a ``size``-pixel box."""
    c = (np.arange(size) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    v, u = np.meshgrid(c, c, indexing="ij")  # v: rows (down), u: columns
    r = np.sqrt(u**2 + v**2)
    if shape == "circle":
        m = r <= 0.95
    elif shape == "ring":
        m = (r <= 0.95) & (r >= 0.5)
    elif shape == "square":
        m = (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    elif shape == "triangle":
        m = (v <= 0.85) & (np.abs(u) <= (v + 0.95) / 1.8 * 0.95)
    elif shape == "diamond":
        m = np.abs(u) + np.abs(v) <= 0.95
    elif shape == "cross":
        m = ((np.abs(u) <= 0.28) | (np.abs(v) <= 0.28)) & (np.abs(u) <= 0.95) & (np.abs(v) <= 0.95)
    elif shape == "hbar":
        m = (np.abs(v) <= 0.38) & (np.abs(u) <= 0.95)
    elif shape == "vbar":
        m = (np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m


@lru_cache(maxsize=512)
def texture_mask(texture: str, size: int) -> np.ndarray:
    """Boolean mask ``[size, size]``: pixels darkened by the texture pattern."""
    y, x = np.mgrid[0:size, 0:size]
    if texture == "solid":
        return np.zeros((size, size), bool)
    if texture == "stripes":
        return ((x + y) // 2) % 2 == 1
    if texture == "dots":
        return (x % 4 < 2) & (y % 4 < 2)
    if texture == "checker":
        return ((x // 3) + (y // 3)) % 2 == 1
    raise ValueError(f"unknown texture {texture!r}")


def object_mask(world: World, obj: SceneObject) -> np.ndarray:
    """Boolean ``[H, W]`` mask of the pixels an object covers."""
    size = world.image_size
    out = np.zeros((size, size), bool)
    spec = world.spec["classes"][obj.name]
    x0, y0, x1, y1 = obj.box
    out[y0:y1, x0:x1] = glyph_mask(spec["shape"], obj.size)
    return out


def render(world: World, scene: Scene) -> np.ndarray:
    """RGB image ``uint8 [H, W, 3]`` of a scene."""
    size = world.image_size
    spec = world.spec
    rng = np.random.default_rng(scene.seed)
    bg_noise = rng.normal(0.0, spec["background_noise"] * 255, size=(size, size, 3))
    px_noise = rng.normal(0.0, spec["pixel_noise"] * 255, size=(size, size, 3))
    img = np.asarray(scene.background, np.float64)[None, None, :] + bg_noise
    for x0, y0, w, h, r, g, b in scene.clutter:
        img[y0 : y0 + h, x0 : x0 + w] = (r, g, b)
    for obj in scene.objects:
        cls = spec["classes"][obj.name]
        colour = np.clip(np.asarray(spec["colours"][world.colour_of(obj)]) + np.asarray(obj.jitter), 0, 255)
        m = glyph_mask(cls["shape"], obj.size)
        t = texture_mask(cls["texture"], obj.size) & m
        x0, y0, x1, y1 = obj.box
        patch = img[y0:y1, x0:x1]
        patch[m] = colour
        patch[t] = colour * 0.45
    img = img + px_noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image, mode="RGB")


def label_map(world: World, scene: Scene) -> np.ndarray:
    """``int64 [H, W]``: 1 + class index of the object visible at each pixel, 0 for background
    (later objects cover earlier ones, as drawn)."""
    size = world.image_size
    out = np.zeros((size, size), np.int64)
    for obj in scene.objects:
        out[object_mask(world, obj)] = world.classes.index(obj.name) + 1
    return out


def patch_labels(world: World, scene: Scene, patch_size: int, min_fraction: float = 0.25) -> np.ndarray:
    """``int64 [P]`` (row-major patches): 1 + class index of the object covering most of each
    patch, or 0 (background) when no object covers at least ``min_fraction`` of it.

    The per-patch target of the embedded model's vision pretraining and of the grounding
    probe: a token labelled ``c`` is about its own patch showing class ``c``.
    """
    lab = label_map(world, scene)
    g = world.image_size // patch_size
    blocks = lab[: g * patch_size, : g * patch_size].reshape(g, patch_size, g, patch_size).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(g * g, patch_size * patch_size)
    n_cls = len(world.classes) + 1
    P = len(blocks)
    flat = (blocks + n_cls * np.arange(P)[:, None]).ravel()
    counts = np.bincount(flat, minlength=P * n_cls).reshape(P, n_cls)  # [P, C+1] pixel counts
    counts[:, 0] = 0
    best = counts.argmax(1)
    keep = counts[np.arange(len(best)), best] >= min_fraction * patch_size**2
    return np.where(keep, best, 0)
