"""key_redundancy: the Triton exemption search against the chunked reference."""

import pytest
import torch

from thinkpress.kernels import key_redundancy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_key_redundancy_with_exemption_parity(dtype):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 2, 45, 12, generator=g)
    k[:, :, 20] = k[:, :, 4] * 3  # exact repeats: similar copies to exempt
    k[:, :, 40] = k[:, :, 4] + 0.05
    k = k.to(dtype)
    a = key_redundancy(k, exemption_threshold=0.5, backend="triton")
    b = key_redundancy(k, exemption_threshold=0.5, backend="torch")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(a.topk(10, -1).indices.sort(-1).values, b.topk(10, -1).indices.sort(-1).values)
    # the most recent copy (40) is exempted by 4 and 20: it is less redundant than without the exemption
    plain = key_redundancy(k, backend="torch")
    assert (a[..., 40] < plain[..., 40]).all()
