"""kl_div: the Triton kernel against the chunked reference and an explicit formula."""

import pytest
import torch
from kernel_inputs import TOL, logits

from thinkpress.kernels import kl_div


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, v", [(1, 3), (4, 5000)])
def test_kl_parity(dtype, n, v):
    p, q = logits(n, v, dtype, 0), logits(n, v, dtype, 1)
    torch.testing.assert_close(kl_div(p, q, backend="triton"), kl_div(p, q, backend="torch"), **TOL[dtype])
    torch.testing.assert_close(kl_div(p, p, backend="triton"), torch.zeros(n), atol=1e-5, rtol=0)
    torch.testing.assert_close(kl_div(p, q, temperature=2.0, backend="triton"),
                               kl_div(p, q, temperature=2.0, backend="torch"), **TOL[dtype])


def test_kl_with_masked_entries():
    p, q = logits(2, 50, torch.float32, 0), logits(2, 50, torch.float32, 1)
    p[0, :10] = float("-inf")  # p puts no mass there: fine
    q[1, 3] = float("-inf")  # q has no mass where p has some: infinite KL
    a, b = kl_div(p, q, backend="triton"), kl_div(p, q, backend="torch")
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    assert torch.isinf(a[1]) and torch.isinf(b[1])
    p_ref, q_ref = torch.log_softmax(p[0], -1), torch.log_softmax(q[0], -1)
    assert a[0].item() == pytest.approx((p_ref.exp() * (p_ref - q_ref)).nansum().item(), abs=1e-5)
