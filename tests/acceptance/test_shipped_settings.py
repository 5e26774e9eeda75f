"""The shipped method settings (data/tuned_methods.json) follow the tuning protocol: each was one of
the configurations tried on dev, and it ships only if it was confirmed on the separate
confirmation split -- otherwise the method runs at its defaults.  Settings tuned for another model
are never shipped: without a file for the shipped weights every method runs at its defaults."""

import json

from dleaf_analysis.evaluation.tuning import grids_for
from dleaf_analysis.models.adapters import ModelAdapter
from dleaf_analysis.report import METHOD_ORDER, method_configs
from dleaf_analysis.settings import TUNED_FILE


def test_shipped_settings_were_tried_and_confirmed(embedded):
    if not TUNED_FILE.is_file():  # not tuned for this model: every method at its defaults, in the tuning grid
        configs = method_configs(embedded)
        assert set(configs) == set(METHOD_ORDER) and all(cfg == {} for cfg in configs.values()), configs
        return
    d = json.loads(TUNED_FILE.read_text())
    assert d["weights_hash"] == embedded.weights_hash  # tuned for the shipped model
    grids, _ = grids_for(ModelAdapter(embedded.model).n_layers)
    for method, cfg in d["chosen"].items():
        assert d["n_configurations_tried"][method] == len(grids[method])
        if cfg:  # a shipped choice: tried in the grid and confirmed on separate images
            assert cfg in grids[method], (method, cfg)
            assert d["confirmed"][method] is True, method
        else:  # not confirmed: the defaults
            assert d["confirmed"][method] in (False, None)
    assert d["tuning_images"] >= 1000 and d["confirmation_images"] >= 500


def test_shipped_confirmation_follows_the_rule_on_its_own_table():
    """Each shipped "confirmed" flag is the rule applied to the confirmation table that ships with it."""
    import pandas as pd

    if not TUNED_FILE.is_file():
        return
    d = json.loads(TUNED_FILE.read_text())
    conf = pd.read_csv(TUNED_FILE.parent / "tuning" / "confirmation.csv").set_index("method")
    drop = float(d["rule"].split("recall >= greedy - ")[1].split()[0])
    for method, ok in d["confirmed"].items():
        c = conf.loc[method]
        rule = bool(c["dCHAIR_i_high"] < 0 and c["drecall"] >= -drop - 1e-9
                    and c["degenerate"] <= c["greedy_degenerate"] + 1.0)
        assert ok == rule == bool(c["confirmed"]), method
        assert (d["chosen"][method] != {}) == ok or d["selected_on_tuning_images"][method] == {}, method
        assert c["n_images"] >= 500
