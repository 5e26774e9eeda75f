"""Pilot of the attention-sink lever (issue 20): does language pretraining alone (stage 2 of
``dleaf train-model``) put attention on the first text tokens?

Trains stage 2 only (stage 1 for one step, stages 3-5 skipped) with the given recipe and prints
one JSON line: for 64 dev descriptions, the attention share (mean over heads and over the
description's query tokens) on the first text tokens in each layer -- ``L{l}``: BOS + system
prompt with ``--text-format chat`` (the keys the acceptance check counts), BOS alone with
``plain`` -- ``bos{l}``: BOS alone, and ``uniform``: the share uniform causal attention would
give those keys.  A sink formed here is what the later stages would inherit.  Usage::

    OMP_NUM_THREADS=1 python scripts/sink_pilot.py --text-format chat --steps 800 --heads 8
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

from dleaf_analysis.evaluation.regime import first_text_mask, turn_marker
from dleaf_analysis.models.embedded import EmbeddedModelConfig
from dleaf_analysis.models.training import Trainer, TrainConfig
from dleaf_analysis.scenes import load_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text-format", choices=("plain", "chat"), default="chat")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    fmt = a.text_format
    cfg = TrainConfig(model=EmbeddedModelConfig(text_heads=a.heads), vision_steps=1, text_steps=a.steps,
                      align_steps=0, full_steps=0, question_steps=0, weight_decay=a.weight_decay, lr=a.lr,
                      threads=a.threads, text_format=fmt, seed=a.seed)
    t0 = time.time()
    tr = Trainer(cfg, None, progress=False, log=lambda s: None)
    tr.run()
    m, tok = tr.model, tr.tok
    m.set_attn_implementation("eager")
    caps = [tr.world.caption(sc) for sc in load_split("dev", tr.world, limit=64).scenes]
    tok.padding_side = "right"
    enc = tok([tr.text_sample(c) for c in caps], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = m(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_attentions=True)
    ids = enc["input_ids"]  # [B, T]
    pos = torch.arange(ids.shape[1])[None]
    real = enc["attention_mask"].bool()
    # the acceptance check's first text tokens: BOS + system prompt (chat), BOS alone (plain: no user turn)
    prefix = first_text_mask(SimpleNamespace(tokenizer=tok), ids, enc["attention_mask"])
    if fmt == "chat":  # the description follows the assistant turn's "assistant :" (the system prompt
        # also contains the word "assistant", never followed by ":")
        turn = turn_marker(ids, tok.convert_tokens_to_ids("assistant"), tok.convert_tokens_to_ids(":"))
        start = turn.float().argmax(-1)[:, None]
        query = (pos > start + 1) & real  # the description's tokens
    else:
        query = (pos >= 1) & real
    # what uniform causal attention would put on the first text tokens, for scale
    uniform = (prefix.cumsum(-1).float() / (pos + 1).float())[query].mean()
    res = {"text_format": fmt, "steps": a.steps, "weight_decay": a.weight_decay, "lr": a.lr, "heads": a.heads,
           "seed": a.seed, "text_loss_end": round(sum(tr.history["text_loss"][-20:]) / 20, 4),
           "n_first_text": int(prefix[0].sum()), "uniform": round(100 * float(uniform), 1)}
    for layer, att in enumerate(out.attentions):
        att = att.float().mean(1)  # [B, T, T], mean over heads
        res[f"L{layer}"] = round(100 * float((att * prefix[:, None, :]).sum(-1)[query].mean()), 1)
        res[f"bos{layer}"] = round(100 * float(att[:, :, 0][query].mean()), 1)
    res["wall_s"] = round(time.time() - t0)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
