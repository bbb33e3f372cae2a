"""Loading a second model for a method (a scorer, a teacher), by the same rules as the run's model."""

from __future__ import annotations

from typing import Any


def load_scoring_engine(model: str, *, dtype: str = "float32", device: str = "auto") -> Any:
    """The ``hf`` engine on ``model`` (an embedded name, a local directory or a Hub id).

    It has the scoring capabilities (``token_scores``, ``context_logits``) and the tokenizer that
    token-level methods need.
    """
    from thinkpress.core.engines.hf import HFEngine
    from thinkpress.core.models import resolve_model_path

    return HFEngine.from_pretrained(resolve_model_path(model), dtype=dtype, device=device)
