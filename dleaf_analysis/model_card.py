"""The embedded model's card: the acceptance checks (is the model in LLaVA's regime, is it grounded,
does it hallucinate?), measured on the frozen splits next to the previous model's values, every
trained candidate with its checks, and the diagnostic-signal table.  Reported as measured: no
model is selected by it, and a failing check is shown as failing.  A top-level module: it
evaluates the model it describes, so it sits above ``evaluation`` and ``studies``.

Checks (issue "A testbed in LLaVA's regime"; dev split, greedy decoding, the default caption
length unless noted):

- hallucination rate at mentions >= 6 at least 5x the rate at the first mention; at least 20% of
  the mentions come after every present object has been named;
- CHAIR_s between 30% and 70%, CHAIR_i between 8% and 25%, recall >= 60%;
- image-attention mass falls with the decoding step (slope's 95% CI below 0);
- grounding read in more than one layer: at least three layers, at least two of them outside the
  first two, each cost >= 10 recall points under a full-strength all-head fault (the leverage map);
- the first text tokens (BOS + system prompt) take >= 20% of the attention in at least half of
  the layers after layer 1;
- the grounding probes: uniform / shuffled / single-token image attention drop recall by >= 30
  points; within-image cosine <= 0.5; the linear patch probe >= 2x chance;
- POPE: random accuracy >= 70%, adversarial below random.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import mannwhitneyu

from dleaf_analysis import diagnostics as D
from dleaf_analysis.evaluation import regime
from dleaf_analysis.evaluation.runner import evaluate
from dleaf_analysis.models.adapters import ModelAdapter
from dleaf_analysis.models.loading import LoadedModel
from dleaf_analysis.scenes import World
from dleaf_analysis.sources import SceneSource
from dleaf_analysis.tables import md_table

PREVIOUS_FILE = "previous_model.json"
CANDIDATES_FILE = "candidates.json"
CARD_LIMITS = {"dev": 1000, "leverage": 300, "attention": 100, "probes": 300}


def object_token_rows(lm: LoadedModel, source: SceneSource, captions: list[str]) -> pd.DataFrame:
    """Teacher-forced re-run of each caption with eager ``output_attentions``; for every object
    token, the attention row of the query that predicted it (plain HF route, no hooks).

    Returns one row per object token with per-layer ``mass_l{l}`` and ``liae_l{l}`` columns."""
    adapter = ModelAdapter(lm.model)
    tok = lm.tokenizer
    words = source.world.object_words
    rows = []
    for i, cap in enumerate(captions):
        inp = lm.inputs([source.image(i)], [source.prompt])
        cap_ids = tok(cap, add_special_tokens=False)["input_ids"]
        if not cap_ids:
            continue
        ids = torch.cat([inp["input_ids"], torch.tensor([cap_ids])], 1)
        with torch.no_grad():
            out = lm.model(input_ids=ids, pixel_values=inp["pixel_values"], output_attentions=True)
        img_mask = adapter.image_mask(ids[0])
        P = inp["input_ids"].shape[1]
        gt = source.objects(i)
        for j, t in enumerate(cap_ids):
            w = tok.convert_ids_to_tokens(t)
            if w not in words:
                continue
            q = P + j - 1  # the query position that predicted token j
            row = {"image": i, "step": j, "token": w, "hallucinated": words[w] not in gt}
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


def regime_metrics(lm: LoadedModel, limits: dict | None = None, progress: bool = True) -> dict:
    """The regime checks' measurements on the dev split: mention-rank profile, CHAIR, attention
    profile (image mass slope, first-text share by layer) and the leverage map."""
    from dleaf_analysis.studies.leverage import leverage_map

    lim = {**CARD_LIMITS, **(limits or {})}
    dev = SceneSource.load("dev", limit=lim["dev"])
    res = evaluate("chair", dev, lm, progress=progress)
    t = regime.mention_table(list(res.details["caption"]), dev.object_sets(), dev.mentions)
    imgs = [dev.image(i) for i in range(min(lim["attention"], len(dev)))]
    prof = regime.attention_profile(lm, imgs, dev.prompt, dev.max_new_tokens, progress=progress)
    lev = leverage_map(lm, dev.limit(lim["leverage"]), progress=progress)
    return {"chair_dev": res.summary.to_dict(orient="records"), "n_dev": len(dev),
            "position": regime.position_summary(t), "position_profile": regime.position_profile(t).to_dict(orient="records"),
            "mass_slope": regime.mass_slope(prof), "first_text_by_layer": regime.first_text_by_layer(prof).to_dict(
                orient="records"), "leverage": lev.to_dict(orient="records"),
            "example_captions_dev": res.details[["caption", "gt_objects", "hallucinated"]].head(6).to_dict(orient="records")}


def card_metrics(lm: LoadedModel, limit: int | None = None, progress: bool = True, limits: dict | None = None) -> dict:
    """Everything the model card reports, as plain dicts/lists (JSON-ready).  ``limit`` caps every
    split (a quick card); ``limits`` the dev-split measurements (``CARD_LIMITS``)."""
    from dleaf_analysis.evaluation.grounding import grounding_report

    world = World.load()
    lim = {**CARD_LIMITS, **(limits or {})}
    if limit is not None:
        lim = {k: min(v, limit) for k, v in lim.items()}
    out: dict = {"limits": lim}
    test, absent = SceneSource.load("test", limit=limit), SceneSource.load("test-partner-absent", limit=limit)
    natural = evaluate("chair", test, lm, progress=progress)
    pa = evaluate("chair", absent, lm, progress=progress)
    out["chair_test"] = natural.summary.to_dict(orient="records")
    out["chair_partner_absent"] = pa.summary.to_dict(orient="records")

    def partner_share(res) -> float:
        tot = part = 0
        for _, r in res.details.iterrows():
            same_group = {m for g in r["gt_objects"] for m in world.spec["groups"].get(world.group_of(g) or "", [])}
            for h in r["hallucinated"]:
                tot += 1
                part += h in same_group
        return 100 * part / tot if tot else float("nan")

    out["hallucinated_share_same_group_test"] = partner_share(natural)
    out["hallucinated_share_same_group_partner_absent"] = partner_share(pa)
    out["pope_test"] = evaluate("pope", test, lm, progress=progress).summary.to_dict(orient="records")
    out["pope_partner_absent"] = evaluate("pope", absent, lm, pope_variants=("adversarial",),
                                          progress=progress).summary.to_dict(orient="records")
    out["example_captions"] = natural.details[["caption", "gt_objects", "hallucinated"]].head(6).to_dict(orient="records")
    tokens = object_token_rows(lm, test.limit(min(len(test), 200)), list(natural.details["caption"])[:200])
    out["signal_table"] = signal_table(tokens, ModelAdapter(lm.model).n_layers).to_dict(orient="records")
    out["protocol_chair"] = natural.protocol.to_dict()
    out["grounding"] = grounding_report(lm, "dev", limit=lim["probes"], n_probe_images=lim["probes"], progress=progress)
    out["regime"] = regime_metrics(lm, lim, progress=progress)
    return out


def _metric(records: list[dict], metric: str, variant: str | None = None) -> float:
    for r in records:
        if r["metric"] == metric and (variant is None or r.get("variant") == variant):
            return float(r["value"])
    return float("nan")


def acceptance(metrics: dict) -> pd.DataFrame:
    """The acceptance checks (see the module doc), one row each: the measured value, the target,
    whether it passes.  Values that a metrics dict lacks (an older card) are NaN and fail."""
    rows = []
    rg = metrics.get("regime", {})
    pos = rg.get("position", {})
    r1, r6 = pos.get("rate_first", np.nan), pos.get("rate_6_plus", np.nan)
    ratio = r6 / r1 if r1 and r1 > 0 else (np.inf if r6 and r6 > 0 else np.nan)
    rows += [
        ("hallucination rate at mentions >= 6 over mention 1 (x, dev)", ratio, ">= 5", bool(ratio >= 5)),
        ("mentions after every present object was named (%, dev)", pos.get("share_after_coverage", np.nan), ">= 20",
         bool(pos.get("share_after_coverage", 0) >= 20)),
    ]
    cd = rg.get("chair_dev", [])
    cs, ci, rec = _metric(cd, "CHAIR_s"), _metric(cd, "CHAIR_i"), _metric(cd, "recall")
    rows += [("CHAIR_s, dev (%)", cs, "30 to 70", bool(30 <= cs <= 70)),
             ("CHAIR_i, dev (%)", ci, "8 to 25", bool(8 <= ci <= 25)),
             ("object recall, dev (%)", rec, ">= 60", bool(rec >= 60))]
    ms = rg.get("mass_slope", {})
    rows.append(("image-attention mass slope (per 100 steps; CI high)", ms.get("ci_high", np.nan), "< 0",
                 bool(ms.get("ci_high", 1) < 0)))
    lev = pd.DataFrame(rg.get("leverage", []))
    strong = sorted(int(l) for l in lev.loc[lev["drecall"] <= -10, "layer"]) if len(lev) else []
    rows.append(("layers costing >= 10 recall points under an all-head fault (count; >= 2 beyond layer 1)",
                 float(len(strong)), ">= 3, two of them >= layer 2",
                 bool(len(strong) >= 3 and sum(l >= 2 for l in strong) >= 2)))
    ft = pd.DataFrame(rg.get("first_text_by_layer", []))
    later = ft[ft["layer"] >= 2] if len(ft) else ft
    share = float((later["first_text_mass"] >= 0.2).mean()) if len(later) else np.nan
    rows.append(("layers after layer 1 where BOS + system prompt take >= 20% of attention (share)", share, ">= 0.5",
                 bool(share >= 0.5)))
    g = metrics.get("grounding", {})
    probes = {r["probe"]: r for r in g.get("probe_recall", [])}
    rows += [(f"recall change, image attention {k} (points, dev)", probes.get(k, {}).get("d_recall", np.nan), "<= -30",
              bool(probes.get(k, {}).get("d_recall", 0) <= -30)) for k in ("uniform", "shuffle", "single")]
    cos = g.get("cosine_within_centred", np.nan)
    rows.append(("within-image cosine of image tokens (centred)", cos, "<= 0.5", bool(cos <= 0.5)))
    pp = g.get("patch_probe", {})
    acc, ch = 100 * pp.get("accuracy_object_patches", np.nan), 100 * pp.get("chance_object_patches", np.nan)
    rows.append(("linear probe: object-patch class accuracy (%, dev)", acc, f">= 2 x chance ({ch:.1f})",
                 bool(acc >= 2 * ch)))
    pr = _metric(metrics.get("pope_test", []), "accuracy", "random")
    pa = _metric(metrics.get("pope_test", []), "accuracy", "adversarial")
    rows += [("POPE accuracy, random (%)", pr, ">= 70", bool(pr >= 70)),
             ("POPE accuracy, adversarial minus random (points)", pa - pr, "< 0", bool(pa - pr < 0))]
    return pd.DataFrame(rows, columns=["check", "value", "target", "passes"])


def _ci_table(records: list[dict]) -> str:
    df = pd.DataFrame(records)
    df["95% CI"] = [f"[{lo:.1f}, {hi:.1f}]" for lo, hi in zip(df["ci_low"], df["ci_high"])]
    keep = [c for c in ("variant", "metric", "value", "95% CI", "n") if c in df.columns]
    return md_table(df[keep])


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.2f}"


def write_card_markdown(model_dir) -> str:
    """Render ``MODEL_CARD.md`` (and ``loss_curve.png``) from ``model_card.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model_dir = Path(model_dir)
    card = json.loads((model_dir / "model_card.json").read_text())
    h = card["history"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    axes[0].plot(h["vision_loss"], lw=0.8)
    axes[0].set(title="stage 1: vision, per-patch targets", xlabel="step", yscale="log")
    axes[1].plot(h.get("text_loss", []), lw=0.8)
    axes[1].set(title="stage 2: language, text only (CE)", xlabel="step", yscale="log")
    axes[2].plot(pd.Series(h["loss"]).rolling(20, min_periods=1).mean(), lw=0.8, label="all")
    axes[2].plot(pd.Series(h["caption_loss"], dtype=float).rolling(20, min_periods=1).mean(), lw=0.8, label="descriptions")
    axes[2].plot(pd.Series(h["question_loss"], dtype=float).rolling(20, min_periods=1).mean(), lw=0.8, label="questions")
    axes[2].set(title="stages 3-5: LLaVA (CE, running mean)", xlabel="step", yscale="log")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(model_dir / "loss_curve.png", dpi=110)
    plt.close(fig)
    m = card.get("metrics", {})
    repro = card.get("reproduction")
    lines = [
        f"# Model card: {card['model_id']}",
        "",
        "Generated by `dleaf train-model` from `data/world.json` and a seed; do not edit by hand.",
        "",
        f"- architecture: {card['architecture']}",
        "- recipe (LLaVA-1.5's, `dleaf_analysis.models.training`): a CLIP vision tower whose LLaVA features are its "
        "patch embedding (each image token sees only its own patch), pretrained on per-patch object labels with each "
        "patch's row, column and colour statistics as auxiliary targets, then frozen; the language model learns the "
        "descriptions as text; the projector is aligned with everything else frozen; projector and language model are "
        "then trained on detailed descriptions and yes/no questions; a chat template with a system prompt",
        f"- parameters: {card['parameters']:,} (language model {card['language_model_parameters']:,})",
        f"- world: {card['world']['name']} (spec hash {card['world']['hash']})",
        f"- training wall time: {h['wall_time_s']} s on this machine ({h.get('threads', '?')} threads); final losses: "
        f"vision {h['vision_loss'][-1]}, LLaVA {h['loss'][-1]}",
        f"- weights: `model.safetensors`, sha256 prefix `{card['weights_hash']}`",
    ]
    if repro:
        lines.append(f"- reproduction: {repro['summary']}")
    lines += [f"- config: `{json.dumps(card['config'])}`",
              "- data manifests: " + ", ".join(f"{k} `{v['content_hash']}`" for k, v in card["data_manifests"].items()),
              "", "![loss curve](loss_curve.png)", ""]
    if m:
        prev = _previous(model_dir)
        lines += _acceptance_section(m, prev)
        lines += _candidates_section(model_dir)
        rg = m.get("regime", {})
        if rg:
            lines += ["## Where hallucinations come (dev, greedy)", "",
                      "Hallucination rate per object mention by its rank in the caption (1 = the first object named), "
                      "with bootstrap 95% CIs over captions:", "", md_table(pd.DataFrame(rg["position_profile"]).round(2)),
                      "", "Leverage map (dev, a full-strength diffusing fault on every head of one layer, every step; "
                      "paired differences against unfaulted greedy decoding, points):", "",
                      md_table(pd.DataFrame(rg["leverage"])[["layer", "drecall", "drecall_low", "drecall_high",
                                                              "dCHAIR_s", "dCHAIR_i"]].round(2)), "",
                      "Share of the current query's attention on the first text tokens (BOS + system prompt) and on "
                      "the image, per layer (dev captions, mean over heads and steps):", "",
                      md_table(pd.DataFrame(rg["first_text_by_layer"]).round(3)), "",
                      f"Image-attention mass per 100 decoding steps: {rg['mass_slope']['slope_per_100_steps']:+.4f} "
                      f"[{rg['mass_slope']['ci_low']:+.4f}, {rg['mass_slope']['ci_high']:+.4f}] "
                      f"({rg['mass_slope']['n_images']} images; mean mass {rg['mass_slope']['mass_first_10_steps']:.3f} "
                      f"in the first 10 steps, {rg['mass_slope']['mass_after_step_60']:.3f} after step 60).", ""]
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
            "grounded object tokens in the greedy captions of the test split (0.5 = no signal; below 0.5 = "
            "lower on hallucinated tokens). Reported as measured; the model was not selected by it.", "",
            md_table(pd.DataFrame(m["signal_table"]), ".3f"), "",
            "## Example descriptions (test)", "",
        ]
        for ex in m["example_captions"]:
            lines.append(f"- `{ex['caption']}` (objects: {', '.join(ex['gt_objects'])}; hallucinated: "
                         f"{', '.join(ex['hallucinated']) or 'none'})")
    text = "\n".join(lines) + "\n"
    (model_dir / "MODEL_CARD.md").write_text(text)
    return text


def _previous(model_dir) -> dict | None:
    """The previous embedded model's card metrics (its own card plus the regime checks measured on it)."""
    p = Path(model_dir) / PREVIOUS_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def _acceptance_section(m: dict, prev: dict | None) -> list[str]:
    acc = acceptance(m)
    acc["value"] = acc["value"].map(_fmt)
    acc["passes"] = acc["passes"].map({True: "yes", False: "**no**"})
    if prev is not None:
        pa = acceptance(prev["metrics"])
        acc.insert(1, "previous model", pa["value"].map(_fmt))
    lines = ["## Acceptance checks", "",
             "Each check is a function of the package (`dleaf_analysis.model_card.acceptance`) asserted by the tests "
             "on the shipped model.  `previous model`: the 6-layer model of 15-word lists this one replaces "
             f"(weights `{prev['weights_hash']}`), measured by the same functions on its own world "
             f"(`{PREVIOUS_FILE}`)." if prev else "## Acceptance checks", "", md_table(acc), ""]
    g = m["grounding"]
    probes = pd.DataFrame(g["probe_recall"])
    lines += ["Grounding probes on dev (image attention replaced in every layer and head by a uniform "
              "distribution, a shuffle across image positions, or one image token, at the same mass):", "",
              md_table(probes.round(2)), "",
              f"Token cosines: within-image raw {g['cosine_within_raw']:.3f}, centred {g['cosine_within_centred']:.3f}; "
              f"between-image raw {g['cosine_between_raw']:.3f}, centred {g['cosine_between_centred']:.3f}.", ""]
    return lines


def _candidates_section(model_dir) -> list[str]:
    p = Path(model_dir) / CANDIDATES_FILE
    if not p.is_file():
        return []
    cands = json.loads(p.read_text())
    rows = []
    for c in cands:
        acc = acceptance(c["metrics"]) if c.get("metrics") else None
        rows.append({"candidate": c["name"], "what changed": c["change"],
                     "checks passed": f"{int(acc['passes'].sum())}/{len(acc)}" if acc is not None else "n/a",
                     "failed": "; ".join(acc.loc[~acc["passes"], "check"]) if acc is not None else "",
                     "shipped": "yes" if c.get("shipped") else "no", "note": c.get("note", "")})
    return ["## Every trained candidate", "",
            "Every model trained for this card, in order, with its checks (no candidate was selected by what the "
            f"studies answer; `{CANDIDATES_FILE}` holds their full metrics):", "", md_table(pd.DataFrame(rows)), ""]


def finalize_card(model_dir, limit: int | None = None, progress: bool = True) -> dict:
    """Complete ``model_card.json`` of a freshly trained directory (provenance and every metric)
    and render ``MODEL_CARD.md``.  The directory's card must hold ``train`` and ``history``."""
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
        "config": card["train"] if "train" in card else card["config"],  # re-finalising a finished card
        "parameters": sum(p.numel() for p in lm.model.parameters()),
        "language_model_parameters": sum(p.numel() for p in ModelAdapter(lm.model).language_model.parameters()),
        "weights_hash": lm.weights_hash,
        "world": {"name": world.spec["name"], "hash": world.spec_hash},
        "data_manifests": {n: {"annotations_hash": m["annotations_hash"], "content_hash": m["content_hash"]}
                           for n, m in manifests.items()},
        "history": card["history"],
        **({"reproduction": card["reproduction"]} if "reproduction" in card else {}),
    }
    (model_dir / "model_card.json").write_text(json.dumps(card, indent=1) + "\n")
    card["metrics"] = card_metrics(load_model(model_dir), limit=limit, progress=progress)
    (model_dir / "model_card.json").write_text(json.dumps(card, indent=1, default=str) + "\n")
    write_card_markdown(model_dir)
    return card


__all__ = ["acceptance", "card_metrics", "finalize_card", "regime_metrics", "signal_table", "write_card_markdown"]
