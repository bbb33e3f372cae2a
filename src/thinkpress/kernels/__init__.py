"""Token-importance kernels.

``token_scores`` computes per-row log-sum-exp, entropy and surprisal of target ids over the
vocabulary. This module holds the pure-torch reference, chunked over rows so that peak memory is
O(chunk * V) rather than O(N * V); it is the CPU path and what the engine uses for log-probs.
"""

from thinkpress.kernels.reference import TokenScores, token_scores

__all__ = ["TokenScores", "token_scores"]
