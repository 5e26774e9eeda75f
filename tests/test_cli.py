"""The dleaf command: JSON output, saved protocol, and clear errors for bad input."""

import json

import pytest
from typer.testing import CliRunner

from dleaf_analysis.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_evaluate_chair_json_and_protocol(tmp_path):
    r = run("evaluate", "--benchmark", "chair", "--split", "dev", "--limit", "6", "--json", "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    metrics = {m["metric"]: m for m in d["summary"]}
    assert set(metrics) == {"CHAIR_s", "CHAIR_i", "recall", "length"}
    assert metrics["CHAIR_s"]["ci_low"] <= metrics["CHAIR_s"]["value"] <= metrics["CHAIR_s"]["ci_high"]
    assert d["protocol"]["n_items"] == 6 and d["protocol"]["split"] == "dev"
    saved = json.loads((tmp_path / "protocol.json").read_text())
    assert saved["weights_hash"] == d["protocol"]["weights_hash"] and "protocol_hash" in saved
    assert (tmp_path / "details.jsonl").is_file() and (tmp_path / "summary.csv").is_file()


def test_evaluate_pope_json():
    r = run("evaluate", "--benchmark", "pope", "--split", "dev", "--limit", "3", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert {m["variant"] for m in d["summary"]} == {"random", "popular", "adversarial"}
    assert d["protocol"]["answer_parser"] == "official"


def test_evaluate_with_method_config_file(tmp_path):
    cfg = tmp_path / "dleaf.json"
    cfg.write_text(json.dumps({"method": "dleaf", "gamma": 0.25, "k": 0.5}))
    r = run("evaluate", "--config", str(cfg), "--split", "dev", "--limit", "2", "--json")
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)["protocol"]
    assert p["method"] == "dleaf" and p["method_config"]["gamma"] == 0.25


@pytest.mark.parametrize("args,match", [
    (["evaluate", "--split", "validation"], "unknown split"),
    (["evaluate", "--benchmark", "mmhal"], "unknown benchmark"),
    (["evaluate", "--method", "opera"], "unknown method"),
    (["evaluate", "--model", "/nonexistent/llava"], "model directory not found"),
    (["trace", "--split", "dev", "--index", "999"], "out of range"),
])
def test_bad_input_errors(args, match):
    r = run(*args)
    assert r.exit_code == 2
    assert match in r.output


def test_bad_config_file(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    r = run("evaluate", "--method", "dleaf", "--config", str(bad))
    assert r.exit_code == 2 and "does not parse" in r.output
    bad.write_text(json.dumps({"method": "dleaf", "gamma": 2}))
    r = run("evaluate", "--config", str(bad))
    assert r.exit_code == 2 and "gamma must be in" in r.output


def test_broken_image_file(tmp_path):
    img = tmp_path / "broken.png"
    img.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    r = run("trace", "--image", str(img))
    assert r.exit_code == 2 and "cannot read image" in r.output


def test_trace_then_diagnose(tmp_path):
    r = run("trace", "--split", "dev", "--index", "2", "--out", str(tmp_path / "c"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "c" / "index.json").is_file()
    r = run("diagnose", "--cache", str(tmp_path / "c"), "--json", "--out", str(tmp_path / "d"))
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert {x["detector"] for x in rows} >= {"liae", "image-mass", "row-entropy", "random"}
    assert (tmp_path / "d" / "heads.csv").is_file()
