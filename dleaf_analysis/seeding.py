"""Seeds derived from names, the same in every process (never Python's salted ``hash()``)."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from ``parts`` (e.g. ``derive_seed(0, "12:3")``), stable across processes."""
    blob = "\x1f".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "little") & 0x7FFFFFFF
