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
