"""Token-importance and KV-cache scoring kernels, one op per module.

Each op (:mod:`.ops`) validates its input, then dispatches:

* ``backend=None`` (default): Triton for CUDA tensors when Triton is installed, the torch reference
  otherwise (the CPU path);
* ``backend="triton"``: force the Triton kernel (on CPU tensors this needs ``TRITON_INTERPRET=1`` set
  before the first Triton call: the interpreter, for tests);
* ``backend="torch"``: force the chunked torch reference.

An op's module holds its checks, its torch reference (``<op>_reference``) and its public function;
its Triton kernel and launcher are in :mod:`.triton` under the same name (imported on first use);
its tests are ``tests/kernels/test_<op>.py`` and its benchmark rows are in ``benchmarks/test_kernels.py``.

Ops: :func:`token_scores` (surprisal, entropy, log-sum-exp, optional top-1 margin), :func:`kl_div`
(per-row KL between two logit tensors), :func:`window_attention_mass` (attention each cached key
receives from a window of queries, GQA-aware, optional pooling) and :func:`key_redundancy` (R-KV's
mean cosine similarity, sum form or with the recent-copy exemption).
"""

from __future__ import annotations

from thinkpress.kernels.ops._common import HAS_TRITON, use_triton
from thinkpress.kernels.ops.key_redundancy import key_redundancy
from thinkpress.kernels.ops.kl_div import kl_div
from thinkpress.kernels.ops.token_scores import TokenScores, token_scores
from thinkpress.kernels.ops.window_attention_mass import window_attention_mass

__all__ = ["HAS_TRITON", "TokenScores", "key_redundancy", "kl_div", "token_scores", "use_triton",
           "window_attention_mass"]
