"""The evaluation protocol: everything that determines a number, saved with every result."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import dleaf_analysis


@dataclass
class Protocol:
    """Model, data, prompt, decoding and scoring settings of one evaluation run."""

    benchmark: str
    split: str
    split_hash: str
    n_items: int
    model_id: str
    weights_hash: str
    prompt: str
    max_new_tokens: int
    decoding: str = "greedy"
    method: str = "greedy"
    method_config: dict = field(default_factory=dict)
    answer_parser: str | None = None
    pope_variants: list[str] | None = None
    n_resamples: int = 1000
    seed: int = 0
    package_version: str = dleaf_analysis.__version__

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Protocol":
        return cls(**d)

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({**self.to_dict(), "protocol_hash": self.hash}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Protocol":
        d = json.loads(Path(path).read_text())
        d.pop("protocol_hash", None)
        return cls.from_dict(d)

    def describe(self) -> str:
        """A one-paragraph human-readable summary."""
        parts = [
            f"{self.benchmark} on split '{self.split}' ({self.n_items} items, data {self.split_hash})",
            f"model {self.model_id} (weights {self.weights_hash})",
            f"method {self.method} {json.dumps(self.method_config, sort_keys=True) if self.method_config else ''}".strip(),
            f"{self.decoding} decoding, max {self.max_new_tokens} new tokens, prompt {self.prompt!r}",
        ]
        if self.answer_parser:
            parts.append(f"answer parser {self.answer_parser}")
        parts.append(f"bootstrap {self.n_resamples}, seed {self.seed}")
        return "; ".join(parts)
