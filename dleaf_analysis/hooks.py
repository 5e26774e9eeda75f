"""The one attention hook point.

A custom transformers attention function (registered as ``"dleaf"`` with
``AttentionInterface``, and its mask with ``AttentionMaskInterface``) computes eager attention
but routes the post-softmax probabilities ``[B, H, Q, K]`` through a named identity module,
``self_attn.pattern``, of every language-model layer, before the product with V.  Capture
(nnsight or plain torch hooks), ablation, patching and D-LEAF all read and write attention
there; nothing copies an attention forward.

Edits are applied by *pattern editors*: callables ``f(pattern, ctx) -> pattern`` kept in a
list on the model (``attach_editor``), run in order inside the identity module's forward.
``ctx`` is an :class:`EditContext`: the layer, the decoding step (counted for the editor by the
hook point: 0 is the prefill, each later forward one more) and the image key positions of the
inputs the editor was attached for.  nnsight and ``register_forward_hook`` see the edited
pattern like any module output.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import repeat_kv

from dleaf_analysis.models.adapters import ModelAdapter, UnsupportedModelError

IMPLEMENTATION = "dleaf"
_UNSUPPORTED_KWARGS = ("s_aux", "sinks")  # attention sinks (gpt-oss style)


@dataclass
class EditContext:
    """What a pattern editor is told each time it runs.

    ``layer``: the language-model layer; ``step``: the decoding step of this attachment (0 =
    the first forward, i.e. the prefill; each later forward adds one); ``image_mask [B, P]``:
    the image-token positions of the prompt the editor was attached for (``None`` if attached
    without inputs).  :meth:`image_keys` and :meth:`image_positions` derive what editors need
    from it once per attachment, never once per step.
    """

    layer: int = 0
    step: int = -1
    image_mask: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def image_keys(self, K: int, device: torch.device | None = None) -> torch.Tensor:
        """``[B, K]`` bool: which of ``K`` key positions are image tokens (generated keys are text)."""
        if self.image_mask is None:
            raise RuntimeError("this editor was attached without inputs: pass inputs= to attach_editor")
        key = ("keys", K, str(device))
        if key not in self._cache:
            m = self.image_mask
            if K > m.shape[1]:
                m = torch.cat([m, torch.zeros(m.shape[0], K - m.shape[1], dtype=torch.bool, device=m.device)], 1)
            self._cache[key] = m[:, :K].to(device) if device is not None else m[:, :K]
        return self._cache[key]

    def image_positions(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pos [B, n], valid [B, n])``: each sequence's image key positions in order, padded to
        the largest count (see :func:`image_positions`)."""
        key = ("pos", str(device))
        if key not in self._cache:
            pos, valid = image_positions(self.image_mask)
            self._cache[key] = (pos.to(device), valid.to(device)) if device is not None else (pos, valid)
        return self._cache[key]

    @property
    def ragged(self) -> bool:
        """Whether the sequences hold different numbers of image tokens."""
        if "ragged" not in self._cache:
            self._cache["ragged"] = not bool(self.image_positions()[1].all())
        return self._cache["ragged"]


PatternEditor = Callable[[torch.Tensor, EditContext], torch.Tensor]


def image_positions(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``img [B, K]`` bool -> key positions of each sequence's image tokens, in order, padded to the
    largest count ``n``: ``pos [B, n]`` (padding points at key 0) and ``valid [B, n]``.  Sequences
    may hold different numbers of image tokens (LLaVA-NeXT anyres, mixed image sizes)."""
    counts = img.sum(-1)
    n = int(counts.max()) if img.shape[0] else 0  # one host read per call, never per step
    order = torch.argsort((~img).to(torch.int8), dim=-1, stable=True)[:, :n]  # image positions first, in order
    valid = torch.arange(n, device=img.device)[None] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


class AttentionPattern(nn.Identity):
    """Identity on the attention probabilities ``[B, H, Q, K]``; the hook point.

    ``editors`` (shared per model) are applied in order; each gets ``(pattern, layer)``.
    """

    def __init__(self, layer: int, editors: list) -> None:
        super().__init__()
        self.layer = layer
        self._editors = editors  # a plain list shared by all layers (not a submodule)
        # which prompt query rows get explicit probabilities in a multi-row (prefill) call:
        # "all" (every row: the pattern is [B, H, Q, K]) or "last" (the other rows use the fast
        # sdpa kernel and the pattern is the last row only, [B, H, 1, K]); see ``prompt_rows``
        self.prompt_rows = "all"

    def forward(self, pattern: torch.Tensor) -> torch.Tensor:
        for edit in self._editors:
            pattern = edit(pattern, self.layer)  # an _Attached: counts steps, passes the context
        return pattern

    def extra_repr(self) -> str:
        return f"layer={self.layer}"


def dleaf_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    """Eager attention whose softmax output passes through ``module.pattern``.

    Honours what the eager attention of the supported text models does: ``scaling``, grouped
    key/value heads (GQA), logit soft-capping (``softcap``, Gemma 2), sliding windows (through the
    mask, built by transformers' eager mask function) and dropout in training only.  Options it
    cannot reproduce (attention sinks) are refused with a message rather than silently ignored.
    """
    unsupported = [k for k in _UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
    if unsupported:
        raise UnsupportedModelError(
            f"{type(module).__name__} calls attention with {unsupported}, which the dleaf hook point does not "
            "implement; this text model is not supported")
    n_rep = getattr(module, "num_key_value_groups", 1)  # GQA (the family's `gqa` attribute)
    key_states = repeat_kv(key, n_rep)
    value_states = repeat_kv(value, n_rep)
    pattern = getattr(module, "pattern", None)
    if (pattern is not None and pattern.prompt_rows == "none" and attention_mask is not None
            and not pattern._editors and not pattern._forward_hooks  # nothing reads or edits probabilities
            and kwargs.get("softcap") is None and not module.training):
        mask = attention_mask[..., : key_states.shape[-2]].to(query.dtype)
        out = nn.functional.scaled_dot_product_attention(query, key_states, value_states, attn_mask=mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    if (pattern is not None and pattern.prompt_rows == "last" and query.shape[2] > 1 and attention_mask is not None
            and kwargs.get("softcap") is None and not module.training):
        return _last_row_explicit(pattern, query, key_states, value_states, attention_mask, scaling)
    scores = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    if pattern is not None:
        probs = pattern(probs)
    out = torch.matmul(probs, value_states).transpose(1, 2).contiguous()
    return out, probs


def _last_row_explicit(pattern: "AttentionPattern", query, key_states, value_states, attention_mask, scaling: float):
    """A prefill in ``prompt_rows="last"`` mode: rows ``0..Q-2`` through sdpa (no probabilities
    materialised), the last row eager, its probabilities ``[B, H, 1, K]`` through the hook point.
    Query ``[B, H, Q, d]``, keys/values ``[B, H, K, d]``, additive mask ``[B, 1, Q, K]``."""
    mask = attention_mask[..., : key_states.shape[-2]]
    head = nn.functional.scaled_dot_product_attention(query[:, :, :-1], key_states, value_states,
                                                      attn_mask=mask[:, :, :-1].to(query.dtype), scale=scaling)
    scores = torch.matmul(query[:, :, -1:], key_states.transpose(2, 3)) * scaling + mask[:, :, -1:]
    probs = pattern(nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype))
    last = torch.matmul(probs, value_states)
    return torch.cat([head, last], dim=2).transpose(1, 2).contiguous(), probs


@contextmanager
def prompt_rows(model: nn.Module, rows: str = "last") -> Iterator[None]:
    """Within the block, a multi-row (prefill) forward gives explicit attention probabilities only
    for the last query row (``rows="last"``; the other rows use the fast sdpa kernel and editors
    and hooks see ``[B, H, 1, K]``), or for every row (``"all"``, the default outside the block).
    Decoding steps (one row) are unaffected.  Methods that read only the current query row use
    ``"last"``; anything that reads or edits earlier prompt rows needs ``"all"``; forwards that
    read and edit no attention probabilities at all (head-output patching) use ``"none"``: every
    row through sdpa, the hook point sees nothing."""
    if rows not in ("all", "last", "none"):
        raise ValueError(f"rows must be 'all', 'last' or 'none', got {rows!r}")
    pats = install(model)
    before = [p.prompt_rows for p in pats]
    for p in pats:
        p.prompt_rows = rows
    try:
        yield
    finally:
        for p, b in zip(pats, before):
            p.prompt_rows = b


AttentionInterface.register(IMPLEMENTATION, dleaf_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)


def _text_config_key(model: nn.Module) -> str:
    cfg = model.config
    for key in getattr(cfg, "sub_configs", {}):
        if getattr(cfg, key, None) is cfg.get_text_config():
            return key
    return "text_config"


def install(model: nn.Module) -> list[AttentionPattern]:
    """Install the hook point on every language-model layer (idempotent); returns the
    ``pattern`` modules.  The vision tower keeps eager attention."""
    adapter = ModelAdapter(model)
    editors = getattr(model, "_dleaf_editors", None)
    if editors is None:
        editors = []
        model._dleaf_editors = editors  # plain attribute: not a parameter or buffer
    patterns = []
    for l in range(adapter.n_layers):
        attn = adapter.attention(l)
        if not isinstance(getattr(attn, "pattern", None), AttentionPattern):
            attn.pattern = AttentionPattern(l, editors)
        patterns.append(attn.pattern)
    impl = {k: "eager" for k in getattr(model.config, "sub_configs", {})}
    impl[_text_config_key(model)] = IMPLEMENTATION
    model.set_attn_implementation(impl)
    return patterns


def is_installed(model: nn.Module) -> bool:
    try:
        return model.config.get_text_config()._attn_implementation == IMPLEMENTATION
    except AttributeError:
        return False


def check_attention_readable(model: nn.Module) -> None:
    """Raise if the language model's attention cannot give or take patterns (sdpa, flash)."""
    impl = model.config.get_text_config()._attn_implementation
    if impl not in (IMPLEMENTATION, "eager"):
        raise RuntimeError(
            f"the language model uses {impl!r} attention, which returns no attention weights; "
            "load it with attn_implementation='eager' or call dleaf_analysis.hooks.install(model)"
        )


def patterns(model: nn.Module) -> list[AttentionPattern]:
    """The installed ``pattern`` modules, one per language-model layer."""
    if not is_installed(model):
        raise RuntimeError("the dleaf hook point is not installed; call dleaf_analysis.hooks.install(model)")
    ad = ModelAdapter(model)
    return [ad.attention(l).pattern for l in range(ad.n_layers)]


class _Attached:
    """One attached editor with its own context (step counter, image positions)."""

    def __init__(self, editor: PatternEditor, image_mask: torch.Tensor | None) -> None:
        self.editor = editor
        self.ctx = EditContext(image_mask=image_mask)
        if image_mask is not None:  # the one host read of the layout, here and not inside an editor
            self.ctx.image_positions(image_mask.device)
            _ = self.ctx.ragged

    def __call__(self, pattern: torch.Tensor, layer: int) -> torch.Tensor:
        if layer == 0:
            self.ctx.step += 1
        self.ctx.layer = layer
        return self.editor(pattern, self.ctx)


@contextmanager
def attach_editor(model: nn.Module, editor: PatternEditor, inputs: dict | None = None) -> Iterator[EditContext]:
    """Apply ``editor(pattern, ctx)`` inside every layer's hook point for the block's duration;
    ``inputs`` (the model inputs it edits) give the context its image positions.  Yields the
    context (its ``step`` is the last step run)."""
    install(model)
    mask = ModelAdapter(model).image_mask(inputs["input_ids"]) if inputs is not None else None
    attached = _Attached(editor, mask)
    editors = model._dleaf_editors
    editors.append(attached)
    try:
        yield attached.ctx
    finally:
        editors.remove(attached)
