"""`dleaf reproduce --quick` end to end: method tables, studies, every registered figure with its
data file, and the report; the README is not touched by a quick run."""

import json

import pytest

from dleaf_analysis.figures import FIGURES
from dleaf_analysis.paths import REPO_ROOT


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, embedded):
    from dleaf_analysis.report import reproduce

    out = tmp_path_factory.mktemp("reproduce")
    readme_before = (REPO_ROOT / "README.md").read_text()
    summary = reproduce(out, quick=True, progress=False, log=lambda s: None)
    assert (REPO_ROOT / "README.md").read_text() == readme_before
    return out, summary


def test_reproduce_quick_tables(quick_run):
    import pandas as pd

    out, summary = quick_run
    assert set(summary.method) == {"greedy", "dleaf", "uniform", "pai", "vcd"}
    assert set(summary.pool) == {"test", "replication"} and set(summary.metric) == {"CHAIR_s", "CHAIR_i", "recall"}
    g = summary[summary.method == "greedy"]
    assert (g.paired_diff == 0).all()
    # paired differences from greedy on the same images: the point difference equals the difference of the values
    m = summary[summary.method != "greedy"].merge(g[["pool", "metric", "value"]], on=["pool", "metric"],
                                                   suffixes=("", "_greedy"))
    ok = m.paired_diff.notna()
    assert ok.any()
    assert ((m.paired_diff - (m.value - m.value_greedy))[ok].abs() < 1e-9).all()
    pope = pd.read_csv(out / "methods_pope.csv")
    assert {"greedy", "dleaf", "dleaf-vqa"} <= set(pope.method) and {"accuracy", "f1"} <= set(pope.metric)
    cmp = pd.read_csv(out / "comparisons.csv")
    assert {"headline", "valid", "truncation", "validity"} <= set(cmp.section) and set(cmp.pool) == {"test", "replication"}
    assert (out / "tuning" / "sensitivity.csv").is_file()
    report = (out / "report.md").read_text()
    for heading in ("## Findings", "## Methods on the embedded model", "### POPE", "### D-LEAF component ablation",
                    "### leverage", "### trigger", "### oracle", "### localization", "### dpo", "### calibration",
                    "## Figures"):
        assert heading in report, heading
    assert "liae-z" in report and "layer profile" in report and "truncated greedy" in report
    assert "every method at its defaults" in report  # no tuned settings ship for this model
    for m in ("greedy", "dleaf"):
        p = json.loads((out / "evals" / f"chair-test-{m}" / "protocol.json").read_text())
        assert p["config"]["method"] == m and p["n_items"] == 6


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_every_figure_rendered_with_data(quick_run, name):
    out, _ = quick_run
    fdir = out / "figures"
    for ext in ("png", "pdf", "csv"):
        assert (fdir / f"{name}.{ext}").stat().st_size > 0
    manifest = {e["figure"]: e for e in json.loads((fdir / "manifest.json").read_text())}
    assert manifest[name]["data_sha256"] and manifest[name]["protocol_hash"]


def test_figures_are_deterministic(quick_run, embedded, tmp_path):
    from dleaf_analysis.figures import FigureContext, render

    out, _ = quick_run
    a = render("fig4_suppression_methods", FigureContext(results=out, lm=embedded), tmp_path / "a")
    b = render("fig4_suppression_methods", FigureContext(results=out, lm=embedded), tmp_path / "b")
    assert a["data_sha256"] == b["data_sha256"]
    assert (tmp_path / "a" / "fig4_suppression_methods.png").read_bytes() == (tmp_path / "b" / "fig4_suppression_methods.png").read_bytes()


def test_unknown_figure(quick_run):
    from dleaf_analysis.figures import FigureContext, render

    with pytest.raises(ValueError, match="choose one of"):
        render("fig9", FigureContext())
