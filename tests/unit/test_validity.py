"""Output validity and the length-matched truncation baseline, against hand computations."""

import pandas as pd
import pytest

from dleaf_analysis.evaluation.chair import chair_details
from dleaf_analysis.evaluation.validity import compare, degenerate, truncated_greedy, with_validity

VOCAB = {"cup": "cup", "cups": "cup", "fork": "fork", "knife": "knife", "plate": "plate"}


@pytest.mark.parametrize("text, n, kind", [
    ("yes", 0, "yes/no"), ("a yes", 0, "yes/no"), ("No.", 0, "yes/no"),
    ("a cup .", 1, "not a description"),
    ("the the the the the the the the the the the cup", 1, "not a description"),
    ("the image shows a kitchen scene with nothing", 0, "no object"),
    ("the image shows a red cup on the left .", 1, None),
])
def test_degenerate_kinds(text, n, kind):
    assert degenerate(text, n) == kind


def test_truncation_cuts_greedy_to_the_methods_object_count():
    g = with_validity(chair_details(["there is a cup , a fork and a knife and a plate here ."], [{"cup", "fork"}], VOCAB))
    m = with_validity(chair_details(["there is a cup and a plate in this image ."], [{"cup", "fork"}], VOCAB))
    assert truncated_greedy(g, m) == [["cup", "fork"]]  # greedy's first two distinct objects


def test_compare_hand_computed():
    gt = [{"cup", "fork"}, {"plate"}, {"knife"}]
    greedy = ["there is a cup , a fork and a knife on the table .",      # knife hallucinated (3rd object)
              "the image shows a plate and a cup next to it .",         # cup hallucinated (2nd)
              "there is a knife and a fork on the left side ."]          # fork hallucinated (2nd)
    method = ["there is a cup and a fork on the table today .",          # 2 objects, none hallucinated
              "yes",                                                     # degenerate: dropped from valid
              "there is a knife on the left side of it ."]              # 1 object
    g, m = chair_details(greedy, gt, VOCAB), chair_details(method, gt, VOCAB)
    c = compare(g, m, n_resamples=200)
    assert c["n_valid"] == 2
    v = c["validity"].set_index("caption")
    assert v.loc["method", "degenerate"] == pytest.approx(100 / 3) and v.loc["greedy", "degenerate"] == 0
    t = c["truncation"].set_index("metric")
    # valid images 0 and 2: truncated greedy = [cup, fork] and [knife]: no hallucination either -> no advantage
    assert t.loc["objects_CHAIR_i", "diff"] == pytest.approx(0.0)
    h = c["valid"].set_index("metric")
    # on those images greedy has 2 hallucinated of 5 mentions (CHAIR_i 40), the method 0 of 3
    assert h.loc["CHAIR_i", "diff"] == pytest.approx(-40.0)
    assert "no more than saying less" in c["verdict"] or "no reduction" in c["verdict"]
