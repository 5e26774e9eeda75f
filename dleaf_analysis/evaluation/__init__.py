"""Evaluation: CHAIR and POPE over any image source, bootstrap CIs, the saved manifest, ``evaluate``."""

from dleaf_analysis.evaluation.chair import chair_details, chair_summary, object_mentions
from dleaf_analysis.evaluation.pope import ANSWER_PARSERS, get_parser, pope_summary
from dleaf_analysis.evaluation.runner import BENCHMARKS, EvalResult, Protocol, evaluate

__all__ = [
    "ANSWER_PARSERS", "BENCHMARKS", "EvalResult", "Protocol", "chair_details", "chair_summary",
    "evaluate", "get_parser", "object_mentions", "pope_summary",
]
