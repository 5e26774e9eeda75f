"""Traces: run a model and record its language model's attention over the image tokens.

``trace_forward`` records one forward pass (optionally teacher-forcing a continuation);
``trace_generation`` records every step of greedy generation with the KV cache.  Both return
an :class:`~dleaf_analysis.cache.AttentionCache`.  Backends, which must agree (tested):

- ``"nnsight"`` (default): the model under an nnsight trace, reading
  ``layers[l].self_attn.pattern.output`` at every step (``tracer.iter``);
- ``"hooks"``: plain torch hooks on the same hook point (``lens.hook(model, "blocks.{l}.attn.hook_pattern", fn)``);
- ``"transformer-lens"`` (forward only): ``TransformerBridge`` ``blocks.{l}.attn.hook_pattern``
  on a copy of the model.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from dleaf_analysis import detectors  # noqa: F401  (registers the step fields detectors read)
from dleaf_analysis import hooks, lens
from dleaf_analysis.cache import KEY_GROUPS, STEP_FIELDS, AttentionCache, CacheWriter
from dleaf_analysis.models.adapters import ModelAdapter
from dleaf_analysis.models.generation import DEFAULT_CAPTION_PROMPT, DEFAULT_MAX_NEW_TOKENS
from dleaf_analysis.models.inputs import InputError, append_ids
from dleaf_analysis.models.loading import LoadedModel

BACKENDS = ("nnsight", "hooks", "transformer-lens")


@dataclass
class KeyLayout:
    """Which key positions are system / image / prompt tokens for one prompt of length ``P``."""

    image_positions: torch.Tensor  # [n] long
    group_of: torch.Tensor  # [P] long: 0 system, 1 image, 2 prompt, -1 padding
    prompt_length: int

    @classmethod
    def from_inputs(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, adapter: ModelAdapter) -> "KeyLayout":
        """``input_ids [P]`` of one sequence (left padding allowed)."""
        img = adapter.image_mask(input_ids)
        if not img.any():
            raise InputError(
                "the prompt has no image token: build inputs with the model's processor and an image "
                f"(the prompt must contain {adapter.model.config.image_token_id!r} positions)")
        pos = torch.nonzero(img).flatten()
        P = input_ids.shape[0]
        group = torch.full((P,), 2, dtype=torch.long)
        group[: int(pos[0])] = 0
        group[img] = 1
        if attention_mask is not None:
            group[attention_mask == 0] = -1
        return cls(pos, group, P)

    def summarize(self, rows: torch.Tensor, query_positions: torch.Tensor) -> tuple:
        """Attention rows ``[..., H, K]`` of queries at absolute ``query_positions [...]`` (keys
        beyond a query's own position must be zero, e.g. right padding) -> image attention
        ``[..., H, n]``, masses per key group ``[..., H, 4]``, the normalised entropy of each
        whole row over the non-padding keys it can see ``[..., H]``, and every registered step
        field (:func:`~dleaf_analysis.cache.register_field`) as a dict."""
        rows = rows.float()
        K = rows.shape[-1]
        group = torch.cat([self.group_of, torch.full((max(0, K - self.prompt_length),), 3, dtype=torch.long)])[:K]
        onehot = torch.stack([(group == g) for g in range(len(KEY_GROUPS))], -1).float()  # [K, 4]
        img = rows[..., self.image_positions]
        mass = rows @ onehot
        n_keys = (group >= 0).cumsum(0)[query_positions].float()  # [...]
        plogp = torch.where(rows > 0, rows * torch.log(rows.clamp_min(1e-12)), torch.zeros_like(rows))
        ent = -plogp.sum(-1) / torch.log(n_keys.clamp_min(2)).unsqueeze(-1)
        return img, mass, ent, {name: fn(rows, group, query_positions) for name, fn in STEP_FIELDS.items()}


def _prepare(lm: LoadedModel, image, prompt: str, inputs: dict | None = None):
    """Model inputs (built from ``image`` + ``prompt``, or given) and their key layout."""
    adapter = ModelAdapter(lm.model)
    hooks.install(lm.model)
    if inputs is None:
        inputs = lm.inputs([image], [prompt])  # real checkpoints' processors resize any image
    if inputs["input_ids"].shape[0] != 1:
        raise InputError("traces take one sequence at a time (batch size 1)")
    inputs = dict(inputs)
    inputs.setdefault("attention_mask", torch.ones_like(inputs["input_ids"]))
    inputs = lm.to_device(inputs)
    layout = KeyLayout.from_inputs(inputs["input_ids"][0].cpu(), inputs["attention_mask"][0].cpu(), adapter)
    return adapter, inputs, layout


@contextmanager
def friendly_errors():
    """Turn transformers' image-token mismatch into an actionable :class:`InputError`."""
    try:
        yield
    except ValueError as e:
        if "do not match" in str(e) or "image tokens" in str(e).lower():
            raise InputError(
                f"the number of image tokens in the prompt does not match the image features ({e}); "
                "build inputs with the model's processor, which expands the image placeholder") from None
        raise


def _meta(lm: LoadedModel, adapter: ModelAdapter, prompt: str, backend: str, kind: str) -> dict:
    return {"model_id": lm.model_id, "weights_hash": lm.weights_hash, "n_layers": adapter.n_layers,
            "n_heads": adapter.n_heads, "prompt": prompt, "backend": backend, "kind": kind,
            "key_groups": list(KEY_GROUPS)}


def _nnsight(lm: LoadedModel):
    from nnsight import NNsight

    wrapped = getattr(lm, "_nnsight", None)
    if wrapped is None:
        wrapped = NNsight(lm.model)
        lm._nnsight = wrapped
    return wrapped


def _envoy_of(wrapped, model: torch.nn.Module, target: torch.nn.Module):
    """The nnsight envoy of a submodule of ``model`` (same path as the torch module)."""
    for name, module in model.named_modules():
        if module is target:
            env = wrapped
            for part in name.split("."):
                env = env[int(part)] if part.isdigit() else getattr(env, part)
            return env
    raise RuntimeError(f"{type(target).__name__} not found in the nnsight tree")


def _envoy_layers(wrapped, adapter: ModelAdapter):
    """The nnsight envoys of the language-model layers."""
    return _envoy_of(wrapped, adapter.model, adapter.layers)


# -- generation --------------------------------------------------------------------------
def trace_generation(
    lm: LoadedModel,
    image,
    prompt: str = DEFAULT_CAPTION_PROMPT,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    backend: str = "nnsight",
    stream_to: str | Path | None = None,
    dtype: str = "fp32",
    inputs: dict | None = None,
    generate_kwargs: dict | None = None,
    shard_steps: int = 256,
) -> AttentionCache:
    """Greedy generation with the attention of every step recorded.

    ``stream_to``: write steps to a cache directory as they come and return the cache loaded from
    it.  Each step is summarised as soon as it is computed (image
    attention ``[L, H, n]``, key-group masses, row entropy; the rows ``[L, H, K]`` are dropped) and,
    with ``stream_to``, written out when its token is chosen, so memory stays bounded by
    ``shard_steps`` steps whatever the length; the nnsight backend does the same inside its trace
    (its loop body runs as each step executes).  ``inputs``: processor outputs to use instead of
    ``image`` + ``prompt`` (batch size 1).  ``generate_kwargs`` go to ``generate`` (e.g.
    ``min_new_tokens``; decoding stays greedy).
    """
    if backend not in ("nnsight", "hooks"):
        raise ValueError(f"generation traces support backends 'nnsight' and 'hooks', not {backend!r}")
    adapter, inputs, layout = _prepare(lm, image, prompt, inputs)
    L = adapter.n_layers
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=lm.pad_token_id,
                      **(generate_kwargs or {}))
    summaries: list[tuple] = []  # per step: (image attention [L, H, n], masses [L, H, 4], entropy [L, H])
    meta = _meta(lm, adapter, prompt, backend, "generation")
    live = CacheWriter(stream_to, {**meta, "image_positions": layout.image_positions.tolist(),
                                   "prompt_length": layout.prompt_length}, dtype=dtype,
                       shard_steps=shard_steps) if stream_to else None

    def record(summary: tuple, tok: int) -> None:
        """A finished step: to disk (``stream_to``) or to the in-memory list."""
        if live is not None:
            img, mass, ent, extras = summary
            live.append(img, mass, ent, tok, lm.token_strs([tok])[0], live.n_steps + layout.prompt_length - 1, extras)
        else:
            summaries.append(summary)

    def n_done() -> int:
        return live.n_steps if live is not None else len(summaries)

    if backend == "hooks":
        from transformers import LogitsProcessor, LogitsProcessorList

        current: dict[int, torch.Tensor] = {}
        pending: list[tuple] = []  # the summary of the step being decoded, until its token is known

        def make(l):
            def fn(out):
                current[l] = out[0, :, -1, :].detach()  # [H, K]
                if l == L - 1:  # the step is complete: summarise it now, keep only the summary
                    rows = torch.stack([current[j] for j in range(L)]).float().cpu()  # [L, H, K]
                    q = torch.full((L,), layout.prompt_length - 1 + n_done(), dtype=torch.long)
                    pending.append(layout.summarize(rows, q))
                    current.clear()
            return fn

        class _Record(LogitsProcessor):
            """Runs after each step's forward, when its (greedy) token is decided."""

            def __call__(self, input_ids, scores):
                tok = int(scores[0].argmax())
                for summary in pending:
                    record(summary, tok)
                pending.clear()
                return scores

        user_lp = gen_kwargs.pop("logits_processor", None) or []
        gen_kwargs["logits_processor"] = LogitsProcessorList([*user_lp, _Record()])
        hooks.patterns(lm.model)  # raises if the hook point is missing
        with ExitStack() as st:
            for l in range(L):
                st.enter_context(lens.hook(lm.model, f"blocks.{l}.attn.hook_pattern", make(l)))
            # only each step's last query row is read: the prefill's other rows keep the sdpa kernel
            with torch.no_grad(), hooks.prompt_rows(lm.model, "last"), friendly_errors():
                ids = lm.model.generate(**inputs, **gen_kwargs)
    else:
        import warnings

        import nnsight

        wrapped = _nnsight(lm)
        layers = _envoy_layers(wrapped, adapter)
        # the output head, not the model's output: InstructBLIP decodes inside its language model
        head = _envoy_of(wrapped, lm.model, lm.model.get_output_embeddings())
        with torch.no_grad(), hooks.prompt_rows(lm.model, "last"), warnings.catch_warnings(), friendly_errors():
            # the bounded loop ends early when generation stops at EOS: expected, values are kept
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            with wrapped.trace(**inputs, fn=lm.model.generate, **gen_kwargs) as tracer:
                picked = nnsight.save([])
                for _ in tracer.iter[:max_new_tokens]:
                    # this body runs as each step executes: summarise the step's rows now, keep the summary
                    rows = torch.stack([getattr(layers[l], adapter.family.attention).pattern.output[0, :, -1, :].detach()
                                        for l in range(L)]).float().cpu()  # [L, H, K]
                    tok = int(head.output[0, -1].argmax())  # the greedy token
                    q = torch.full((L,), layout.prompt_length - 1 + n_done(), dtype=torch.long)
                    record(layout.summarize(rows, q), tok)
                    picked.append(tok)
        ids = torch.cat([inputs["input_ids"][:1].cpu(), torch.tensor([list(picked)], dtype=torch.long)], 1)
    if live is not None:
        return AttentionCache.load(live.close())
    new_ids = ids[0, inputs["input_ids"].shape[1]:].tolist()
    summaries = summaries[: len(new_ids)]
    H, n = adapter.n_heads, len(layout.image_positions)
    if summaries:
        img_all, mass_all, ent_all = (torch.stack([x[i] for x in summaries]) for i in range(3))
        extras = {k: torch.stack([x[3][k] for x in summaries]) for k in summaries[0][3]}
    else:
        img_all, mass_all, ent_all = torch.zeros(0, L, H, n), torch.zeros(0, L, H, len(KEY_GROUPS)), torch.zeros(0, L, H)
        extras = {}
    return AttentionCache(
        image_attn=img_all,
        mass=mass_all,
        row_entropy=ent_all,
        tokens=new_ids,
        token_strs=lm.token_strs(new_ids),
        query_positions=[layout.prompt_length - 1 + s for s in range(len(new_ids))],
        image_positions=layout.image_positions.tolist(),
        prompt_length=layout.prompt_length,
        meta=meta,
        extras=extras,
    )


# -- one forward pass --------------------------------------------------------------------
def _forward_patterns(lm: LoadedModel, adapter: ModelAdapter, inputs: dict, backend: str,
                      rows_from: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Attention rows ``[H, T - rows_from, T]`` (queries ``rows_from..T-1``) of every layer and
    the last position's logits ``[V]`` for one forward pass.  Each layer's rows are sliced as the
    layer runs, so a trace of the last ``Q`` queries never holds more than ``[L, H, Q, T]``
    (``rows_from=0``: the full ``[L, H, T, T]`` patterns, only when asked)."""
    if backend == "hooks":
        hooks.patterns(lm.model)  # raises if the hook point is missing
        saved: dict[int, torch.Tensor] = {}
        with ExitStack() as st, friendly_errors(), torch.no_grad():
            for l in range(adapter.n_layers):
                st.enter_context(lens.hook(lm.model, f"blocks.{l}.attn.hook_pattern",
                                           lambda p, l=l: saved.__setitem__(l, p[0, :, rows_from:].detach().clone())))
            logits = lm.model(**inputs).logits
        return [saved[l] for l in range(adapter.n_layers)], logits[0, -1]
    if backend == "nnsight":
        import nnsight

        wrapped = _nnsight(lm)
        layers = _envoy_layers(wrapped, adapter)
        with torch.no_grad(), friendly_errors(), wrapped.trace(**inputs):
            saved = nnsight.save([])
            for l in range(adapter.n_layers):
                saved.append(getattr(layers[l], adapter.family.attention).pattern.output[0][:, rows_from:].detach())
            logits = wrapped.output.logits[0, -1].save()
        return list(saved), logits
    if backend == "transformer-lens":
        pats, logits = _transformer_lens_patterns(lm, inputs)
        return [p[:, rows_from:] for p in pats], logits
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def _transformer_lens_patterns(lm: LoadedModel, inputs: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``blocks.{l}.attn.hook_pattern`` from transformer-lens's TransformerBridge (on a copy)."""
    import os

    from transformer_lens.model_bridge import TransformerBridge

    bridge = getattr(lm, "_tl_bridge", None)
    if bridge is None:
        model = copy.deepcopy(lm.model)
        model.set_attn_implementation({k: "eager" for k in getattr(model.config, "sub_configs", {})} | {"": "eager"})
        if not model.config.architectures:
            model.config.architectures = [type(model).__name__]
        os.environ.setdefault("PIP_CONSTRAINT", "")
        bridge = TransformerBridge.boot_transformers(str(lm.path), hf_model=model, tokenizer=lm.tokenizer)
        lm._tl_bridge = bridge
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(ModelAdapter(lm.model).n_layers)]
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                         attention_mask=inputs.get("attention_mask"), names_filter=lambda n: n in names)
    return [cache[n][0].detach() for n in names], logits[0, -1]


def trace_forward(
    lm: LoadedModel,
    image,
    prompt: str = DEFAULT_CAPTION_PROMPT,
    continuation: str | None = None,
    backend: str = "nnsight",
    full_patterns: bool = False,
    inputs: dict | None = None,
    continuation_ids: list[int] | None = None,
) -> AttentionCache:
    """One forward pass over prompt (+ teacher-forced ``continuation``, or its token ids
    ``continuation_ids``, e.g. generated ids); step ``s`` is the query at position ``P - 1 + s``
    (it predicts continuation token ``s``; the last step predicts the next token, recorded as the
    model's argmax)."""
    if continuation is not None and continuation_ids is not None:
        raise ValueError("give continuation (text) or continuation_ids, not both")
    adapter, inputs, layout = _prepare(lm, image, prompt, inputs)
    tok = lm.tokenizer
    cont = list(continuation_ids) if continuation_ids is not None else (
        tok(continuation, add_special_tokens=False)["input_ids"] if continuation else [])
    if cont:
        inputs = append_ids(inputs, cont)
    P = layout.prompt_length
    pats, logits = _forward_patterns(lm, adapter, inputs, backend, rows_from=0 if full_patterns else P - 1)
    R = torch.stack([p[:, -(inputs["input_ids"].shape[1] - P + 1):, :] for p in pats]).permute(2, 0, 1, 3)  # [Q, L, H, K]
    Q = R.shape[0]
    img, mass, ent, extras = layout.summarize(R, (P - 1 + torch.arange(Q))[:, None].expand(Q, R.shape[1]))
    tokens = cont + [int(logits.argmax())]  # the last query predicts the next token: its argmax
    return AttentionCache(
        image_attn=img, mass=mass, row_entropy=ent, tokens=tokens, token_strs=lm.token_strs(tokens),
        query_positions=[P - 1 + s for s in range(len(tokens))], image_positions=layout.image_positions.tolist(),
        prompt_length=P, meta=_meta(lm, adapter, prompt, backend, "forward"),
        full_patterns=torch.stack([p.float() for p in pats]) if full_patterns else None, extras=extras,
    )
