"""The embedded model's card: targets measured on the frozen splits, the grounding probes and
acceptance checks, and the diagnostic-signal table (how well per-layer image-attention mass and
LIAE separate hallucinated from grounded object tokens, as AUROC).  Reported as measured; no
model is selected by it.  A top-level module: it evaluates the model it describes, so it sits
above ``evaluation`` (``models`` does not import ``evaluation``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy.stats import mannwhitneyu

from dleaf_analysis import diagnostics as D
from dleaf_analysis.tables import md_table
from dleaf_analysis.evaluation.runner import evaluate
from dleaf_analysis.models.adapters import ModelAdapter
from dleaf_analysis.models.inputs import PromptBuilder
from dleaf_analysis.models.loading import LoadedModel
from dleaf_analysis.scenes import World, load_split


def object_token_rows(lm: LoadedModel, images, prompt: str, captions: list[str], gt_sets, classes) -> pd.DataFrame:
    """Teacher-forced re-run of each caption with eager ``output_attentions``; for every object
    token, the attention row of the query that predicted it (plain HF route, no hooks).

    Returns one row per object token with per-layer ``mass_l{l}`` and ``liae_l{l}`` columns.
    """
    builder = PromptBuilder(lm.processor)
    adapter = ModelAdapter(lm.model)
    tok = lm.tokenizer
    rows = []
    for i, (img, cap, gt) in enumerate(zip(images, captions, gt_sets)):
        inp = builder.inputs([img], [prompt], lm.image_size)
        cap_ids = tok(cap, add_special_tokens=False)["input_ids"]
        if not cap_ids:
            continue
        ids = torch.cat([inp["input_ids"], torch.tensor([cap_ids])], 1)
        with torch.no_grad():
            out = lm.model(input_ids=ids, pixel_values=inp["pixel_values"], output_attentions=True)
        img_mask = adapter.image_mask(ids[0])
        P = inp["input_ids"].shape[1]
        for j, t in enumerate(cap_ids):
            w = tok.convert_ids_to_tokens(t)
            if w not in classes:
                continue
            q = P + j - 1  # the query position that predicted token j
            row = {"image": i, "step": j, "token": w, "hallucinated": w not in gt}
            for l, att in enumerate(out.attentions):
                a_img = att[0, :, q, img_mask]  # [H, n]
                row[f"mass_l{l}"] = float(D.layer_image_mass(a_img))
                row[f"liae_l{l}"] = float(D.liae(a_img))
            rows.append(row)
    return pd.DataFrame(rows)


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties halved (Mann-Whitney U / n1 n2)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))


def signal_table(tokens: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    """Per layer: AUROC of image mass and of LIAE for hallucinated (positive) vs grounded tokens."""
    h = tokens["hallucinated"].to_numpy(bool)
    return pd.DataFrame([
        {"layer": l,
         "auroc_image_mass": auroc(tokens.loc[h, f"mass_l{l}"].to_numpy(), tokens.loc[~h, f"mass_l{l}"].to_numpy()),
         "auroc_liae": auroc(tokens.loc[h, f"liae_l{l}"].to_numpy(), tokens.loc[~h, f"liae_l{l}"].to_numpy()),
         "n_hallucinated": int(h.sum()), "n_grounded": int((~h).sum())}
        for l in range(n_layers)
    ])


def card_metrics(lm: LoadedModel, limit: int | None = None, progress: bool = True) -> dict:
    """Everything the model card reports, as plain dicts/lists (JSON-ready)."""
    world = World.load()
    out: dict = {}
    natural = evaluate("chair", "test", lm, limit=limit, progress=progress)
    absent = evaluate("chair", "test-partner-absent", lm, limit=limit, progress=progress)
    out["chair_test"] = natural.summary.to_dict(orient="records")
    out["chair_partner_absent"] = absent.summary.to_dict(orient="records")
    # are the hallucinated objects co-occurrence partners of present objects?
    def partner_share(res) -> float:
        tot = part = 0
        for _, r in res.details.iterrows():
            gt = set(r["gt_objects"])
            same_group = {m for g in gt for m in world.spec["groups"].get(world.group_of(g) or "", [])}
            for h in r["hallucinated"]:
                tot += 1
                part += h in same_group
        return 100 * part / tot if tot else float("nan")
    out["hallucinated_share_same_group_test"] = partner_share(natural)
    out["hallucinated_share_same_group_partner_absent"] = partner_share(absent)
    pope = evaluate("pope", "test", lm, limit=limit, progress=progress)
    pope_pa = evaluate("pope", "test-partner-absent", lm, limit=limit, pope_variants=("adversarial",), progress=progress)
    out["pope_test"] = pope.summary.to_dict(orient="records")
    out["pope_partner_absent"] = pope_pa.summary.to_dict(orient="records")
    out["example_captions"] = natural.details[["caption", "gt_objects", "hallucinated"]].head(8).to_dict(orient="records")
    # diagnostic-signal table on both test splits' greedy captions
    frames = []
    for res, name in ((natural, "test"), (absent, "test-partner-absent")):
        split = load_split(name, world, limit=limit)
        imgs = [split.image(i) for i in range(len(split))]
        t = object_token_rows(lm, imgs, res.protocol.prompt, list(res.details["caption"]),
                              [s.name_set for s in split.scenes], set(world.classes))
        frames.append(t)
    tokens = pd.concat(frames, ignore_index=True)
    out["signal_table"] = signal_table(tokens, ModelAdapter(lm.model).n_layers).to_dict(orient="records")
    out["protocol_chair"] = natural.protocol.to_dict()
    from dleaf_analysis.evaluation.grounding import grounding_report

    out["grounding"] = grounding_report(lm, "dev", limit=limit, progress=progress)
    return out


def _metric(records: list[dict], metric: str, variant: str | None = None) -> float:
    for r in records:
        if r["metric"] == metric and (variant is None or r.get("variant") == variant):
            return float(r["value"])
    return float("nan")


def acceptance(metrics: dict) -> pd.DataFrame:
    """The embedded model's acceptance checks (issue 10): grounding probes and hallucination
    targets, one row each with the measured value, the target, and whether it passes."""
    g = metrics["grounding"]
    probes = {r["probe"]: r for r in g["probe_recall"]}
    pp = g["patch_probe"]
    rows = [(f"recall change, image attention {k} (points, dev)", probes[k]["d_recall"], "<= -30",
             probes[k]["d_recall"] <= -30) for k in ("uniform", "shuffle", "single")]
    rows += [
        ("within-image cosine of image tokens (centred)", g["cosine_within_centred"], "<= 0.5",
         g["cosine_within_centred"] <= 0.5),
        ("linear probe: object-patch class accuracy (%, dev)", 100 * pp["accuracy_object_patches"],
         f">= 2 x chance ({100 * pp['chance_object_patches']:.1f})",
         pp["accuracy_object_patches"] >= 2 * pp["chance_object_patches"]),
    ]
    cs, rec = _metric(metrics["chair_test"], "CHAIR_s"), _metric(metrics["chair_test"], "recall")
    cs_pa = _metric(metrics["chair_partner_absent"], "CHAIR_s")
    share = metrics["hallucinated_share_same_group_partner_absent"]
    pr = _metric(metrics["pope_test"], "accuracy", "random")
    pa = _metric(metrics["pope_test"], "accuracy", "adversarial")
    rows += [
        ("CHAIR_s, test (%)", cs, "15 to 50", 15 <= cs <= 50),
        ("object recall, test (%)", rec, ">= 60", rec >= 60),
        ("CHAIR_s, partner-absent minus test (points)", cs_pa - cs, "> 0 (clearly)", cs_pa - cs >= 10),
        ("hallucinated objects from a present object's group, partner-absent (%)", share, "> 50", share > 50),
        ("POPE accuracy, random (%)", pr, ">= 70", pr >= 70),
        ("POPE accuracy, adversarial minus random (points)", pa - pr, "< 0", pa - pr < 0),
    ]
    return pd.DataFrame(rows, columns=["check", "value", "target", "passes"])


def _ci_table(records: list[dict]) -> str:
    df = pd.DataFrame(records)
    df["95% CI"] = [f"[{lo:.1f}, {hi:.1f}]" for lo, hi in zip(df["ci_low"], df["ci_high"])]
    keep = [c for c in ("variant", "metric", "value", "95% CI", "n") if c in df.columns]
    return md_table(df[keep])


def write_card_markdown(model_dir) -> str:
    """Render ``model_card.md`` (and ``loss_curve.png``) from ``model_card.json``."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model_dir = Path(model_dir)
    card = json.loads((model_dir / "model_card.json").read_text())
    h = card["history"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    axes[0].plot(h["vision_loss"], lw=0.8)
    axes[0].set(title="stage 1: vision, per-patch labels (CE)", xlabel="step", yscale="log")
    axes[1].plot(h.get("text_loss", []), lw=0.8)
    axes[1].set(title="stage 2: language, text only (CE)", xlabel="step", yscale="log")
    axes[2].plot(pd.Series(h["loss"]).rolling(20, min_periods=1).mean(), lw=0.8, label="all")
    axes[2].plot(pd.Series(h["caption_loss"], dtype=float).rolling(20, min_periods=1).mean(), lw=0.8, label="captions")
    axes[2].plot(pd.Series(h["question_loss"], dtype=float).rolling(20, min_periods=1).mean(), lw=0.8, label="questions")
    axes[2].set(title="stages 3-5: LLaVA (CE, running mean)", xlabel="step", yscale="log")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(model_dir / "loss_curve.png", dpi=110)
    plt.close(fig)
    m = card.get("metrics", {})
    lines = [
        f"# Model card: {card['model_id']}",
        "",
        "Generated by `dleaf train-model` from `data/world.json` and a seed; do not edit by hand.",
        "",
        f"- architecture: {card['architecture']}",
        "- recipe (LLaVA-1.5's, `dleaf_analysis.models.training`): the vision tower's LLaVA features are its "
        "penultimate hidden state, i.e. the patch embedding, so each image token sees only its own patch; it is "
        "pretrained on per-patch object labels, with each patch's row, column and colour statistics as auxiliary "
        "targets (label cross-entropy alone collapses an image's background patches onto one point), and then "
        "frozen; the language model learns the captions as text; "
        "the projector is aligned with everything else frozen; projector and language model are then trained on "
        "captions and yes/no questions",
        f"- parameters: {card['parameters']:,} (language model {card['language_model_parameters']:,})",
        f"- world: {card['world']['name']} (spec hash {card['world']['hash']})",
        f"- training wall time: {h['wall_time_s']} s on this machine; final losses: vision {h['vision_loss'][-1]}, "
        f"LLaVA {h['loss'][-1]}",
        f"- weights: `model.safetensors`, sha256 prefix `{card['weights_hash']}`",
        f"- config: `{json.dumps(card['config'])}`",
        "- data manifests: " + ", ".join(f"{k} `{v['content_hash']}`" for k, v in card["data_manifests"].items()),
        "",
        "![loss curve](loss_curve.png)",
        "",
    ]
    if m:
        prev = _previous(model_dir)
        lines += _acceptance_section(m, prev)
        lines += [
            "## Captioning (greedy), CHAIR on the natural test split", "", _ci_table(m["chair_test"]), "",
            "## CHAIR on the partner-absent test split", "", _ci_table(m["chair_partner_absent"]), "",
            f"Share of hallucinated objects from the group of a present object (co-occurrence partners): "
            f"{m['hallucinated_share_same_group_test']:.1f}% on test, "
            f"{m['hallucinated_share_same_group_partner_absent']:.1f}% on partner-absent.", "",
            "## POPE on the test split", "", _ci_table(m["pope_test"]), "",
            "## POPE adversarial on the partner-absent split", "", _ci_table(m["pope_partner_absent"]), "",
            "## Diagnostic signal per layer", "",
            "AUROC of each layer's image-attention mass and LIAE (mean-map) for telling hallucinated from "
            "grounded object tokens in the greedy captions of both test splits (0.5 = no signal; below 0.5 = "
            "lower on hallucinated tokens). Reported as measured; the model was not selected by it.", "",
            md_table(pd.DataFrame(m["signal_table"]), ".3f"), "",
            "## Example captions (test)", "",
        ]
        for ex in m["example_captions"]:
            lines.append(f"- `{ex['caption']}` (objects: {', '.join(ex['gt_objects'])}; hallucinated: "
                         f"{', '.join(ex['hallucinated']) or 'none'})")
    text = "\n".join(lines) + "\n"
    (model_dir / "MODEL_CARD.md").write_text(text)
    return text


PREVIOUS_FILE = "previous_model.json"


def _previous(model_dir) -> dict | None:
    """The previous embedded model's card metrics and grounding report, if shipped beside the card."""
    import json
    from pathlib import Path

    p = Path(model_dir) / PREVIOUS_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def _acceptance_section(m: dict, prev: dict | None) -> list[str]:
    acc = acceptance(m)
    acc["value"] = acc["value"].map(lambda v: f"{v:.2f}")
    acc["passes"] = acc["passes"].map({True: "yes", False: "**no**"})
    if prev is not None:
        try:
            pa = acceptance(prev["metrics"])
            acc.insert(1, "previous model", pa["value"].map(lambda v: f"{v:.2f}"))
        except KeyError:
            pass
    g = m["grounding"]
    lines = ["## Acceptance: is the model grounded, and does it hallucinate?", "",
             "Grounding probes (issue 10): where attention falls inside the image must decide what the model says. "
             "The probes replace, in every layer and head, each text query's attention over the image tokens by a "
             "uniform distribution, a shuffle across image positions, or a single image token, all at the same "
             "image mass (`dleaf_analysis.interventions.ImageAttentionProbe`), and caption the dev split. "
             "The cosine is between two image tokens of one image after subtracting the mean token "
             "(raw cosines are dominated by the offset all tokens share; raw and between-image values below). "
             "The linear probe reads each patch's object class from its own token (fitted on train images, "
             "scored on dev). `previous model`: the 64-token model this one replaces, measured by the same "
             "functions (`data/embedded-llava/previous_model.json`).", "",
             md_table(acc), ""]
    probes = pd.DataFrame(g["probe_recall"])
    lines += ["Probe captions on dev (this model):", "", md_table(probes.round(2)), "",
              f"Token cosines (this model): within-image raw {g['cosine_within_raw']:.3f}, centred "
              f"{g['cosine_within_centred']:.3f}; between-image raw {g['cosine_between_raw']:.3f}, centred "
              f"{g['cosine_between_centred']:.3f}; within-image share of variance "
              f"{g['within_image_variance_share']:.3f}."]
    if prev is not None and "grounding" in prev.get("metrics", {}):
        pg = prev["metrics"]["grounding"]
        lines += [f"Previous model: within-image raw {pg['cosine_within_raw']:.3f}, centred "
                  f"{pg['cosine_within_centred']:.3f}; between-image raw {pg['cosine_between_raw']:.3f}; "
                  f"within-image share of variance {pg['within_image_variance_share']:.3f}."]
    return lines + [""]


def finalize_card(model_dir, limit: int | None = None, progress: bool = True) -> dict:
    """Complete ``model_card.json`` of a freshly trained directory (provenance and every metric)
    and render ``MODEL_CARD.md``.  The directory's card must hold ``train`` and ``history``."""
    import json
    from pathlib import Path

    from dleaf_analysis.models.loading import load_model
    from dleaf_analysis.scenes import SPLITS
    from dleaf_analysis.scenes.splits import SPLITS_DIR

    model_dir = Path(model_dir)
    card = json.loads((model_dir / "model_card.json").read_text())
    lm = load_model(model_dir)
    world = World.load()
    manifests = {n: json.loads((SPLITS_DIR / f"{n}.json").read_text()) for n in SPLITS}
    card = {
        "model_id": "dleaf-embedded-llava",
        "architecture": "LlavaForConditionalGeneration (CLIP vision tower + Llama decoder)",
        "config": card["train"],
        "parameters": sum(p.numel() for p in lm.model.parameters()),
        "language_model_parameters": sum(p.numel() for p in ModelAdapter(lm.model).language_model.parameters()),
        "weights_hash": lm.weights_hash,
        "world": {"name": world.spec["name"], "hash": world.spec_hash},
        "data_manifests": {n: {"annotations_hash": m["annotations_hash"], "content_hash": m["content_hash"]}
                           for n, m in manifests.items()},
        "history": card["history"],
    }
    (model_dir / "model_card.json").write_text(json.dumps(card, indent=1) + "\n")
    card["metrics"] = card_metrics(load_model(model_dir), limit=limit, progress=progress)
    (model_dir / "model_card.json").write_text(json.dumps(card, indent=1, default=str) + "\n")
    write_card_markdown(model_dir)
    return card
