"""Markdown tables from tidy DataFrames (reports, the model card, the README)."""

from __future__ import annotations

import pandas as pd


def md_table(df: pd.DataFrame, floatfmt: str = ".2f") -> str:
    """A GitHub markdown table; floats formatted with ``floatfmt``, ints kept as ints."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for r in df.itertuples(index=False):  # keeps each column's type (ints stay ints)
        lines.append("| " + " | ".join(format(v, floatfmt) if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines)


def json_safe(obj):
    """``obj`` with every NaN or infinite float replaced by ``None`` (valid JSON: ``null``, never
    ``NaN``), numpy scalars made plain, recursively through dicts and lists."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
