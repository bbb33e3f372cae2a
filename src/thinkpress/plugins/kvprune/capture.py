"""Capture of post-RoPE queries during decoding, for the KV scorers that need them.

transformers models route attention through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
and receive the query after RoPE. :func:`capture_queries` registers a wrapper implementation
(``thinkpress_capture_<impl>``) that hands every layer's query to a :class:`QueryRecorder` and then
calls the model's own implementation (``sdpa``, ``eager`` or any registered one) with the same
arguments, so the model's outputs do not change (tested). The mask format is the wrapped
implementation's. The config's implementation is restored on exit.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from thinkpress.api import ModelError

_ACTIVE: list[QueryRecorder] = []


class QueryRecorder:
    """Per layer, the last ``window`` queries [B, Hq, <=window, D] (``window=None``: all of them)."""

    def __init__(self, window: int | None):
        self.window = window
        self.queries: dict[int, torch.Tensor] = {}

    def record(self, layer: int, query: torch.Tensor) -> None:
        q = query.detach()
        prev = self.queries.get(layer)
        if prev is not None and prev.shape[0] == q.shape[0]:
            q = torch.cat([prev, q], dim=2)
        if self.window is not None and q.shape[2] > self.window:
            q = q[:, :, -self.window :]
        self.queries[layer] = q

    def last(self, layer: int, n: int | None = None) -> torch.Tensor:
        """The recorded queries of ``layer`` (the last ``n``)."""
        q = self.queries.get(layer)
        if q is None:
            raise ModelError(f"no query was captured for layer {layer}: this model's attention does not go through "
                             "the transformers attention interface, so query-based KV policies cannot run on it")
        return q if n is None else q[:, :, -n:]

    def select_rows(self, idx: torch.Tensor) -> None:
        self.queries = {k: v.index_select(0, idx) for k, v in self.queries.items()}


def _wrapped(impl: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, attention_mask, **kwargs):
        if _ACTIVE:
            _ACTIVE[-1].record(module.layer_idx, query)
        if impl == "eager":
            fn = sys.modules[type(module).__module__].eager_attention_forward
        else:
            fn = ALL_ATTENTION_FUNCTIONS[impl]
        return fn(module, query, key, value, attention_mask, **kwargs)

    return attention


def check_capturable(model) -> str:
    """The model's attention implementation, or a :class:`ModelError` saying why queries cannot be captured."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if not getattr(model, "_supports_attention_backend", False):
        raise ModelError(f"{type(model).__name__} does not use the transformers attention interface, so its "
                         "queries cannot be captured; use a policy without queries (streaming, knorm, keydiff)")
    if impl.startswith("thinkpress_capture_"):
        impl = impl[len("thinkpress_capture_"):]
    if impl.startswith(("flash", "paged", "flex")):
        raise ModelError(f"query capture supports the sdpa and eager attention implementations, not {impl!r}; "
                         "load the model with attn_implementation='sdpa'")
    if impl == "eager" and not hasattr(sys.modules[type(model).__module__], "eager_attention_forward"):
        raise ModelError(f"{type(model).__name__}'s module has no eager_attention_forward to wrap")
    return impl


@contextmanager
def capture_queries(model, recorder: QueryRecorder) -> Iterator[QueryRecorder]:
    """Record every attention layer's post-RoPE queries into ``recorder`` while the block runs."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = check_capturable(model)
    name = f"thinkpress_capture_{impl}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, _wrapped(impl))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    old = {k: c._attn_implementation for k, c in configs.items()}
    for c in configs.values():
        c._attn_implementation = name
    _ACTIVE.append(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.pop()
        for k, c in configs.items():
            c._attn_implementation = old[k]
