"""The report's tuning section and sentence are built from the tuning run's own files (chosen.json
and confirmation.csv): the number of configurations tried, the confirmation CIs, what ships."""

import json

import pandas as pd

from dleaf_analysis.report import _tuning_section, tuning_finding, tuning_record


def _write_run(tmp_path, confirmed_dleaf: bool):
    chosen = {"chosen": {"dleaf": {"gamma": 1.0} if confirmed_dleaf else {}, "vcd": {}},
              "selected_on_tuning_images": {"dleaf": {"gamma": 1.0}, "vcd": {"alpha": 2.0}},
              "confirmed": {"dleaf": confirmed_dleaf, "vcd": False},
              "n_configurations_tried": {"dleaf": 8, "vcd": 8}, "rule": "lowest CHAIR_i",
              "tuning_images": 1000, "confirmation_images": 500, "weights_hash": "abc"}
    (tmp_path / "tuned_methods.json").write_text(json.dumps(chosen))
    pd.DataFrame([{"method": "dleaf", "dCHAIR_i": -1.25, "dCHAIR_i_low": -2.0 if confirmed_dleaf else -2.5,
                   "dCHAIR_i_high": -0.5 if confirmed_dleaf else 0.5, "drecall": -0.4},
                  {"method": "vcd", "dCHAIR_i": 0.8, "dCHAIR_i_low": 0.1, "dCHAIR_i_high": 1.5, "drecall": -2.0}]
                 ).to_csv(tmp_path / "confirmation.csv", index=False)
    return tmp_path / "tuned_methods.json"


def test_tuning_sentence_and_table_from_the_run_files(tmp_path):
    rec = tuning_record(_write_run(tmp_path, confirmed_dleaf=True))
    s = tuning_finding(rec)
    assert s.startswith("Tuning tried 16 configurations (8 for dleaf, 8 for vcd) on 1000 tuning images")
    assert "dleaf -1.25 [-2.00, -0.50]; vcd +0.80 [+0.10, +1.50]" in s
    assert "so dleaf ships its tuned settings and the rest run at their defaults" in s
    table = "\n".join(_tuning_section(rec))
    assert "**-1.25 [-2.00, -0.50]**" in table and '{"gamma": 1.0}' in table and "defaults" in table


def test_unconfirmed_choices_ship_nothing(tmp_path):
    s = tuning_finding(tuning_record(_write_run(tmp_path, confirmed_dleaf=False)))
    assert "so none ship tuned settings (every method runs at its defaults)" in s


def test_no_tuning_run_no_section(tmp_path):
    assert tuning_record(tmp_path / "missing.json") is None
    (tmp_path / "hand.json").write_text(json.dumps({"weights_hash": "x", "chosen": {"dleaf": {}}}))
    assert tuning_record(tmp_path / "hand.json") is None and _tuning_section(None) == [] and tuning_finding(None) is None


def test_scene_tuning_is_confirmed_on_the_confirm_split_whatever_the_source():
    """Regression: `dleaf tune` passed the dev split explicitly and so was never confirmed."""
    from dleaf_analysis.evaluation.tuning import confirmation_source
    from dleaf_analysis.sources import SceneSource, as_source

    conf = confirmation_source(SceneSource.load("dev", limit=4))
    assert conf.record()["split"] == "confirm" and len(conf) == 500
    assert confirmation_source(as_source("dev"), "test").record()["split"] == "test"


def test_a_run_without_confirmation_images(tmp_path):
    f = _write_run(tmp_path, confirmed_dleaf=False)
    d = json.loads(f.read_text())
    f.write_text(json.dumps({**d, "confirmation_images": 0, "confirmed": {"dleaf": None, "vcd": None}}))
    (tmp_path / "confirmation.csv").write_text("\n")  # what an empty table writes
    rec = tuning_record(f)
    assert len(rec[1]) == 0 and tuning_finding(rec).endswith("on 1000 tuning images.")
    assert "n/a" in "\n".join(_tuning_section(rec))


def test_a_tuning_run_of_other_weights_is_not_reported(tmp_path):
    f = _write_run(tmp_path, confirmed_dleaf=True)
    assert tuning_record(f, "abc") is not None and tuning_record(f, "other-weights") is None
