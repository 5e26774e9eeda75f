"""The tables behind the worked-example figures, against hand computations."""

import pandas as pd
import torch

from dleaf_analysis.diagnostics import running_z
from dleaf_analysis.studies.examples import correction_rates, mark_hallucinated, running_threshold, token_type


def test_running_threshold_is_dleaf_running_rule():
    """``liae > mu + k sd`` (Figure 1's line) exactly where the running z-score exceeds k, and the
    threshold equals a loop over the earlier steps (population std)."""
    g = torch.Generator().manual_seed(0)
    liae = torch.rand(30, 5, generator=g, dtype=torch.float64)
    k = 1.0
    thr = running_threshold(liae, k)
    assert torch.isnan(thr[0]).all()
    for s in (1, 7, 29):
        past = liae[:s]
        torch.testing.assert_close(thr[s], past.mean(0) + k * past.std(0, unbiased=False))
    assert torch.equal((liae > thr)[2:], (running_z(liae) > k)[2:])


def test_correction_rates_by_hand():
    details = pd.DataFrame({"image": [0, 1], "caption": ["a fork and a knife", "a cup"],
                            "gt_objects": [["fork"], ["cup"]]})
    # steps index caption words: image 0 -> fork at 1 (grounded), knife at 4 (hallucinated); image 1 -> cup at 1
    log = pd.DataFrame({"item": [0, 0, 1, 0], "step": [4, 4, 1, 2], "layer": [2, 3, 2, 2],
                        "heads": [[0, 1], [1], [0], [1]]})
    out = correction_rates(details, log, {"fork", "knife", "cup"}).set_index(["token_type", "layer", "head"])
    assert out.loc[("hallucinated object", 2, 0), "rate"] == 1.0  # 1 correction / 1 hallucinated step
    assert out.loc[("hallucinated object", 3, 1), "corrections"] == 1
    assert out.loc[("grounded object", 2, 0), "rate"] == 0.5  # cup's step: 1 of 2 grounded steps
    assert out.loc[("grounded object", 2, 1), "corrections"] == 0  # step 2 ("and") is not an object token
    assert set(out["n_steps"]) == {1, 2}


def test_marking_and_token_types():
    classes = {"fork", "knife", "cup"}
    assert mark_hallucinated("a fork and a knife .", {"fork"}, classes) == "a fork and a [knife] ."
    assert mark_hallucinated("a knife", set(), classes, upper=True) == "a [KNIFE]"
    assert [token_type(w, {"fork"}, classes) for w in ("fork", "knife", "a")] == \
        ["real object", "hallucinated object", "non-object"]
