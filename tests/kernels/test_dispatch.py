"""Every op validates its input the same way on every backend, and the backend name is checked."""

import pytest
import torch

from thinkpress.kernels import key_redundancy, kl_div, token_scores, window_attention_mass


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_input_is_rejected(backend):
    with pytest.raises(ValueError, match="differ in shape"):
        kl_div(torch.zeros(2, 4), torch.zeros(2, 5), backend=backend)
    with pytest.raises(TypeError, match="floating point"):
        token_scores(torch.zeros(2, 4, dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match="out of range"):
        token_scores(torch.zeros(2, 4), torch.tensor([1, -1]), backend=backend)
    with pytest.raises(ValueError, match="empty"):
        token_scores(torch.zeros(0, 4), backend=backend)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        window_attention_mass(torch.zeros(1, 3, 2, 4), torch.zeros(1, 2, 5, 4), backend=backend)
    with pytest.raises(ValueError, match="must not be empty"):
        key_redundancy(torch.zeros(1, 1, 0, 4), backend=backend)
    with pytest.raises(ValueError, match="backend must be"):
        token_scores(torch.zeros(1, 4), backend="cuda")
