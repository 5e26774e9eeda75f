"""The attention cache: what a trace records, with its layout, diagnostics, DataFrames and
(sharded) storage.

Layout (one image + prompt, one generated sequence):

- ``image_attn [S, L, H, n]``: attention of the current query over the ``n`` image tokens at
  step ``s`` (step 0 = the prefill's last query, which predicts the first generated token);
- ``mass [S, L, H, 4]``: attention mass on the key groups ``system`` (prompt tokens before the
  image), ``image``, ``prompt`` (prompt tokens after the image) and ``generated``;
- ``row_entropy [S, L, H]``: normalised entropy of the whole attention row (all keys);
- ``tokens [S]``: the token predicted at each step; ``query_positions [S]``;
- ``extras {name: [S, L, H, ...]}``: the step fields registered with :func:`register_field` (a
  detector that needs more than the fields above registers the summary it reads; traces compute
  every registered field, and caches store and load them).

Memory is O(S x L x H x n): never O(T^2), except for the optional ``full_patterns
[L, H, T, T]`` of one forward pass, kept only when asked for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from dleaf_analysis import diagnostics as D
from dleaf_analysis.errors import DleafError

KEY_GROUPS = ("system", "image", "prompt", "generated")
FORMAT_VERSION = 1

# name -> fn(rows [..., H, K] float, key_group [K] long, query_positions [...]) -> [..., H, *]
STEP_FIELDS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {}
_BUILTIN_FIELDS = ("image_attn", "mass", "row_entropy")


def register_field(name: str, fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Register a per-step summary of the attention rows that traces compute and caches keep
    (``cache.extras[name]``, ``[S, L, H, ...]``).  ``fn(rows [..., H, K], key_group [K], query_positions [...])``:
    ``key_group`` is 0 system, 1 image, 2 prompt, 3 generated, -1 padding (see :data:`KEY_GROUPS`)."""
    if name in _BUILTIN_FIELDS:
        raise ValueError(f"{name!r} is a built-in cache field")
    STEP_FIELDS[name] = fn


class CacheFileError(DleafError, RuntimeError):
    """A cache on disk that is incomplete, corrupted, or from another model."""


@dataclass
class AttentionCache:
    image_attn: torch.Tensor  # [S, L, H, n]
    mass: torch.Tensor  # [S, L, H, 4]
    row_entropy: torch.Tensor  # [S, L, H]
    tokens: list[int]
    token_strs: list[str]
    query_positions: list[int]
    image_positions: list[int]
    prompt_length: int
    meta: dict = field(default_factory=dict)
    full_patterns: torch.Tensor | None = None  # [L, H, T, T], forward traces only, on request
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # registered step fields, [S, L, H, ...]

    def field(self, name: str) -> torch.Tensor:
        """A step field by name (built-in or registered), ``[S, L, H, ...]``."""
        if name in _BUILTIN_FIELDS:
            return getattr(self, name)
        if name not in self.extras:
            raise CacheFileError(f"this cache has no field {name!r} (fields: {list(_BUILTIN_FIELDS) + sorted(self.extras)}); "
                                 "it was traced before the field was registered: trace again")
        return self.extras[name]

    # -- layout --------------------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        return self.image_attn.shape[0]

    @property
    def n_layers(self) -> int:
        return self.image_attn.shape[1]

    @property
    def n_heads(self) -> int:
        return self.image_attn.shape[2]

    @property
    def n_image(self) -> int:
        return self.image_attn.shape[3]

    def __repr__(self) -> str:
        return (f"AttentionCache(steps={self.n_steps}, layers={self.n_layers}, heads={self.n_heads}, "
                f"image_tokens={self.n_image}, model={self.meta.get('model_id')!r}, "
                f"backend={self.meta.get('backend')!r})")

    def text(self) -> str:
        return " ".join(self.token_strs)

    # -- diagnostics (docs/method.md) -------------------------------------------------------
    def liae(self, variant: str = "mean-map") -> torch.Tensor:
        """LIAE ``[S, L]``."""
        return D.liae(self.image_attn.float(), variant)

    def iaf(self, variant: str = "mass") -> torch.Tensor:
        """IAF ``[S, L, H]``."""
        return D.iaf(self.image_attn.float(), variant)

    def head_entropy(self) -> torch.Tensor:
        """Per-head normalised image-attention entropy ``[S, L, H]``."""
        return D.head_entropy(self.image_attn.float())

    # -- tidy frames ------------------------------------------------------------------------
    def _step_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"step": range(self.n_steps), "token": self.token_strs,
                             "position": self.query_positions})

    def liae_frame(self, variant: str = "mean-map") -> pd.DataFrame:
        """One row per (step, layer): ``step, token, position, layer, liae``."""
        v = self.liae(variant)
        df = pd.DataFrame({
            "step": torch.arange(self.n_steps).repeat_interleave(self.n_layers).numpy(),
            "layer": torch.arange(self.n_layers).repeat(self.n_steps).numpy(),
            "liae": v.reshape(-1).numpy(),
        })
        df = self._step_frame().merge(df, on="step")
        df["variant"] = variant
        return df

    def to_frame(self, iaf_variant: str = "mass") -> pd.DataFrame:
        """One row per (step, layer, head): masses per key group, IAF and head entropy."""
        S, L, H = self.n_steps, self.n_layers, self.n_heads
        idx = torch.cartesian_prod(torch.arange(S), torch.arange(L), torch.arange(H)).numpy()
        df = pd.DataFrame({"step": idx[:, 0], "layer": idx[:, 1], "head": idx[:, 2]})
        m = self.mass.float().reshape(-1, len(KEY_GROUPS)).numpy()
        for g, name in enumerate(KEY_GROUPS):
            df[f"mass_{name}"] = m[:, g]
        df["iaf"] = self.iaf(iaf_variant).reshape(-1).numpy()
        df["image_entropy"] = self.head_entropy().reshape(-1).numpy()
        df["row_entropy"] = self.row_entropy.float().reshape(-1).numpy()
        return self._step_frame().merge(df, on="step")

    # -- storage ----------------------------------------------------------------------------
    def save(self, path: str | Path, dtype: str = "fp16", shard_steps: int = 256) -> Path:
        """Write a cache directory (``index.json`` + step shards)."""
        w = CacheWriter(path, self.meta_for_disk(), dtype=dtype, shard_steps=shard_steps)
        for s in range(self.n_steps):
            w.append(self.image_attn[s], self.mass[s], self.row_entropy[s], self.tokens[s], self.token_strs[s],
                     self.query_positions[s], {k: v[s] for k, v in self.extras.items()})
        if self.full_patterns is not None:
            w.full_patterns = self.full_patterns
        return w.close()

    def meta_for_disk(self) -> dict:
        return {**self.meta, "image_positions": list(self.image_positions), "prompt_length": self.prompt_length}

    @classmethod
    def load(cls, path: str | Path, expect_weights_hash: str | None = None) -> "AttentionCache":
        """Load a cache directory; refuse a truncated one or one from another model."""
        path = Path(path)
        index_file = path / "index.json"
        if not index_file.is_file():
            raise CacheFileError(
                f"{path} is not a complete attention cache (no index.json): the run that wrote it did not "
                "finish; re-run the trace")
        index = json.loads(index_file.read_text())
        if index.get("format") != FORMAT_VERSION:
            raise CacheFileError(f"{path}: cache format {index.get('format')} is not {FORMAT_VERSION}")
        meta = index["meta"]
        if expect_weights_hash is not None and meta.get("weights_hash") != expect_weights_hash:
            raise CacheFileError(
                f"{path} was traced with model {meta.get('model_id')!r} (weights {meta.get('weights_hash')}), "
                f"not the model given (weights {expect_weights_hash}); trace again with this model")
        parts = []
        for shard in index["shards"]:
            f = path / shard["file"]
            if not f.is_file() or f.stat().st_size != shard["bytes"] or _sha(f) != shard["sha256"]:
                raise CacheFileError(f"{f} is missing, truncated or corrupted; re-run the trace")
            parts.append(torch.load(f, weights_only=True))
        cat = (lambda k: torch.cat([p[k] for p in parts]).float()) if parts else None
        L, H, n = meta["n_layers"], meta["n_heads"], len(meta["image_positions"])
        cache = cls(
            image_attn=cat("image_attn") if parts else torch.zeros(0, L, H, n),
            mass=cat("mass") if parts else torch.zeros(0, L, H, len(KEY_GROUPS)),
            row_entropy=cat("row_entropy") if parts else torch.zeros(0, L, H),
            tokens=[t for p in parts for t in p["tokens"].tolist()],
            token_strs=index["token_strs"],
            query_positions=[q for p in parts for q in p["query_positions"].tolist()],
            image_positions=meta.pop("image_positions"),
            prompt_length=meta.pop("prompt_length"),
            meta=meta,
            extras={k: torch.cat([p["extras"][k] for p in parts]).float()
                    for k in (parts[0].get("extras", {}) if parts else {})},
        )
        fp = path / "full_patterns.pt"
        if fp.is_file():
            cache.full_patterns = torch.load(fp, weights_only=True).float()
        if cache.n_steps != index["n_steps"]:
            raise CacheFileError(f"{path}: index says {index['n_steps']} steps, shards hold {cache.n_steps}")
        return cache


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class CacheWriter:
    """Streams steps to disk in shards, so memory stays O(L x H x n) per step.

    ``index.json`` is written last (by ``close``): a directory without it is incomplete.
    """

    def __init__(self, path: str | Path, meta: dict, dtype: str = "fp16", shard_steps: int = 256) -> None:
        if dtype not in ("fp16", "fp32"):
            raise ValueError(f"dtype must be 'fp16' or 'fp32', not {dtype!r}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "index.json").unlink(missing_ok=True)
        self.meta = meta
        self.dtype = torch.float16 if dtype == "fp16" else torch.float32
        self.shard_steps = shard_steps
        self.buf: list[tuple] = []
        self.shards: list[dict] = []
        self.token_strs: list[str] = []
        self.n_steps = 0
        self.full_patterns: torch.Tensor | None = None

    def append(self, image_attn: torch.Tensor, mass: torch.Tensor, row_entropy: torch.Tensor, token: int,
               token_str: str, position: int, extras: dict[str, torch.Tensor] | None = None) -> None:
        """One step: ``image_attn [L, H, n]``, ``mass [L, H, 4]``, ``row_entropy [L, H]``, registered fields."""
        cast = lambda t: t.detach().to("cpu", self.dtype)  # noqa: E731
        self.buf.append((cast(image_attn), cast(mass), token, position, cast(row_entropy),
                         {k: cast(v) for k, v in (extras or {}).items()}))
        self.token_strs.append(token_str)
        self.n_steps += 1
        if len(self.buf) >= self.shard_steps:
            self._flush()

    def _flush(self) -> None:
        if not self.buf:
            return
        name = f"steps-{len(self.shards):05d}.pt"
        torch.save({
            "image_attn": torch.stack([b[0] for b in self.buf]),
            "mass": torch.stack([b[1] for b in self.buf]),
            "row_entropy": torch.stack([b[4] for b in self.buf]),
            "tokens": torch.tensor([b[2] for b in self.buf]),
            "query_positions": torch.tensor([b[3] for b in self.buf]),
            "extras": {k: torch.stack([b[5][k] for b in self.buf]) for k in self.buf[0][5]},
        }, self.path / name)
        f = self.path / name
        self.shards.append({"file": name, "steps": len(self.buf), "bytes": f.stat().st_size, "sha256": _sha(f)})
        self.buf = []

    def close(self) -> Path:
        self._flush()
        if self.full_patterns is not None:
            torch.save(self.full_patterns.to(self.dtype), self.path / "full_patterns.pt")
        index = {"format": FORMAT_VERSION, "n_steps": self.n_steps, "shards": self.shards,
                 "token_strs": self.token_strs, "dtype": str(self.dtype).replace("torch.", ""), "meta": self.meta}
        (self.path / "index.json").write_text(json.dumps(index, indent=1))
        return self.path
