"""``python -m dleaf_analysis ...`` is the ``dleaf`` command (what ``torchrun -m`` launches)."""

from dleaf_analysis.cli import app

app(prog_name="dleaf")
