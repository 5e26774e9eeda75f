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
    assert d["protocol"]["n_items"] == 6 and d["protocol"]["source"]["split"] == "dev"
    saved = json.loads((tmp_path / "protocol.json").read_text())
    assert saved["model"]["weights_hash"] == d["protocol"]["model"]["weights_hash"]
    assert saved["config"] == d["protocol"]["config"] and saved["run"] == "evaluate"
    assert (tmp_path / "details.jsonl").is_file() and (tmp_path / "summary.csv").is_file()


def test_evaluate_pope_json():
    r = run("evaluate", "--benchmark", "pope", "--split", "dev", "--limit", "3", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert {m["variant"] for m in d["summary"]} == {"random", "popular", "adversarial"}
    assert d["protocol"]["config"]["answer_parser"] == "official"


def test_evaluate_with_method_config_file(tmp_path):
    cfg = tmp_path / "dleaf.json"
    cfg.write_text(json.dumps({"method": "dleaf", "gamma": 0.25, "k": 0.5}))
    r = run("evaluate", "--config", str(cfg), "--split", "dev", "--limit", "2", "--json")
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)["protocol"]
    assert p["config"]["method"] == "dleaf" and p["config"]["method_config"]["gamma"] == 0.25


# Every bad input gets exit code 2 and a message that says what is wrong.  Rows marked
# ``before_load`` must fail before a model is loaded (the loader is replaced by a tripwire).
BAD_INPUTS = [
    # (args, message fragment, fails before loading a model)
    (["evaluate", "--split", "validation"], "unknown split", True),
    (["evaluate", "--benchmark", "mmhal"], "unknown benchmark", True),
    (["evaluate", "--method", "opera"], "unknown method", True),
    (["evaluate", "--limit", "0"], "--limit", True),
    (["evaluate", "--batch-size", "0"], "--batch-size", True),
    (["evaluate", "--dtype", "fp64"], "choose one of fp32, bf16, fp16", True),
    (["evaluate", "--device", "cuda"], "no CUDA device is visible", True),
    (["evaluate", "--device", "tpu"], "choose cpu, cuda", True),
    (["evaluate", "--benchmark", "pope", "--answer-parser", "yesno"], "choose one of official", True),
    (["evaluate", "--config", "/nonexistent/cfg.json"], "no such file", True),
    (["evaluate", "--model", "/nonexistent/llava"], "model directory not found", False),
    (["study", "bogus"], "unknown study", True),
    (["study", "ablation", "--limit", "0"], "--limit", True),
    (["study", "ablation", "--split", "nope"], "unknown split", True),
    (["study", "ablation", "--device", "cuda:3"], "no CUDA device", True),
    (["tune", "--limit", "-2"], "--limit", True),
    (["trace", "--split", "dev", "--index", "99999"], "out of range", True),
    (["trace", "--backend", "torchlens"], "unknown backend", True),
    (["trace", "--cache-dtype", "fp64"], "--cache-dtype", True),
    (["trace", "--image", "/nonexistent.png"], "/nonexistent.png", True),
    (["diagnose", "--cache", "/nonexistent/cache"], "/nonexistent/cache", True),
    (["pope-coco", "--coco-images", "/nonexistent"], "COCO images folder not found", True),
    (["pope-coco", "--coco-images", ".", "--pope-version", "2019"], "unknown POPE version", True),
    (["pope-coco", "--coco-images", ".", "--variant", "hard"], "unknown POPE variant", True),
    (["pope-coco", "--coco-images", ".", "--shard", "4/4"], "need 0 <= i < N", True),
    (["caption-coco", "--coco-images", ".", "--image-ids", "/nonexistent.txt"], "/nonexistent.txt", True),
    (["chair-score", "--captions", "/nonexistent.jsonl"], "/nonexistent.jsonl", True),
    (["merge-shards", "/nonexistent/a", "/nonexistent/b"], "/nonexistent/a", True),
    (["figures", "--only", "fig9"], "unknown figure", True),
    (["figures", "--dtype", "fp8"], "choose one of fp32, bf16, fp16", True),
    (["tune", "--device", "cuda"], "no CUDA device is visible", True),
    (["reproduce", "--device", "cuda:0"], "no CUDA device is visible", True),
    (["info", "--device", "gpu"], "choose cpu, cuda", True),
    (["study", "ablation", "--split", "dev", "--images-jsonl", "x.jsonl"], "give one image source", True),
    (["study", "ablation", "--coco-images", "."], "needs --coco-images DIR and --coco-annotations FILE", True),
    (["study", "ablation", "--image-ids", "ids.txt"], "--image-ids selects COCO images", True),
    (["study", "ablation", "--coco-images", ".", "--coco-annotations", "/nonexistent.json"],
     "COCO annotations not found", True),
    (["study", "ablation", "--images-jsonl", "/nonexistent.jsonl"], "annotated image list not found", True),
    (["study", "ablation", "--shard", "2/2"], "need 0 <= i < N", True),
    (["study", "ablation", "--event-token", "word"], "unknown --event-token", True),
    (["study", "ablation", "--batch-size", "0"], "--batch-size", True),
    (["study", "localization", "--merge", "/nonexistent/s0"], "holds no localization results", True),
    (["tune", "--shard", "0/2"], "cannot be sharded", True),
    (["tune", "--split", "test"], "uses the dev split", True),
    (["reproduce", "--tuned", "/nonexistent.json"], "no such file", True),
    (["reproduce", "--shard", "0/2"], "apply to a real checkpoint", True),
]


@pytest.mark.parametrize("args,match,before_load", BAD_INPUTS, ids=[" ".join(a) for a, _, _ in BAD_INPUTS])
def test_bad_input_errors(monkeypatch, args, match, before_load):
    import importlib

    import dleaf_analysis.models.loading as loading

    # modules that bind `load_model` at import are imported first, so that a command importing one of
    # them for the first time under the tripwire does not keep the tripwire after the test
    for m in ("device_check", "evaluation.runner", "evaluation.tuning", "figures", "model_card", "report",
              "studies.base"):
        importlib.import_module(f"dleaf_analysis.{m}")

    if before_load:
        def tripwire(*a, **k):
            raise AssertionError("a model was loaded before the options were checked")
        monkeypatch.setattr(loading, "load_model", tripwire)
    r = run(*args)
    assert r.exit_code == 2, r.output
    assert match in r.output, r.output
    assert "Traceback" not in r.output


def test_expected_failure_is_one_line_and_debug_shows_the_traceback():
    r = run("diagnose", "--cache", "/nonexistent/cache")
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1, r.output
    with pytest.raises(Exception, match="/nonexistent/cache"):
        run("--debug", "diagnose", "--cache", "/nonexistent/cache")
    from dleaf_analysis import cli

    cli._STATE["debug"] = False


def test_version():
    import dleaf_analysis

    r = run("--version")
    assert r.exit_code == 0 and r.output.strip() == f"dleaf-analysis {dleaf_analysis.__version__}"


def test_every_command_renders_its_help():
    from typer.main import get_command

    for name in get_command(app).commands:
        r = run(name, "--help")
        assert r.exit_code == 0 and "Usage" in r.output, (name, r.output)


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


def test_train_model_options_reach_the_training_config(tmp_path, monkeypatch):
    """Every ``train-model`` option sets its field of TrainConfig (and only that one); a bad
    ``--text-format`` is refused before training starts."""
    from dleaf_analysis.models import training

    seen = []

    class Stop(Exception):
        pass

    def fake_train(cfg, **kw):
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr(training, "train_embedded", fake_train)
    with pytest.raises(Stop):
        run("train-model", "--out", str(tmp_path), "--seed", "3", "--vision-steps", "7", "--text-steps", "11",
            "--full-steps", "13", "--weight-decay", "0.1", "--threads", "1", "--text-format", "chat", "--no-card")
    cfg, default = seen[0], training.TrainConfig()
    changed = {k: v for k, v in cfg.to_dict().items() if default.to_dict().get(k) != v}
    assert changed == {"seed": 3, "vision_steps": 7, "text_steps": 11, "full_steps": 13, "weight_decay": 0.1,
                       "threads": 1, "text_format": "chat"}
    r = runner.invoke(app, ["train-model", "--out", str(tmp_path), "--text-format", "poems", "--no-card"])
    assert r.exit_code == 2 and "text_format must be one of" in r.output and len(seen) == 1
