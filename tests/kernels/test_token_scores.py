"""token_scores: the chunked reference against a materialised log-softmax, and the Triton kernel (through
TRITON_INTERPRET=1 on CPU) against the reference. Small shapes: the interpreter is slow."""

import pytest
import torch
from kernel_inputs import TOL, logits

from thinkpress.kernels import token_scores
from thinkpress.kernels.ops.token_scores import token_scores_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_scores_match_materialised_log_softmax(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(37, 1001) * 4).to(dtype)
    tgt = torch.randint(0, 1001, (37,))
    s = token_scores_reference(logits, tgt, chunk_size=8)
    lp = torch.log_softmax(logits.float(), -1)
    torch.testing.assert_close(s.surprisal, -lp.gather(1, tgt[:, None]).squeeze(1))
    torch.testing.assert_close(s.entropy, -(lp.exp() * lp).sum(-1))
    torch.testing.assert_close(s.lse, torch.logsumexp(logits.float(), -1))


def test_temperature_and_maskedlogits():
    logits = torch.tensor([[0.0, 1.0, float("-inf")], [2.0, 2.0, 2.0]])
    s = token_scores_reference(logits, torch.tensor([1, 0]), temperature=0.5)
    lp = torch.log_softmax(logits / 0.5, -1)
    assert s.surprisal[0] == pytest.approx(-lp[0, 1].item())
    assert s.entropy[1] == pytest.approx(torch.log(torch.tensor(3.0)).item())
    assert torch.isfinite(s.entropy[0])


def test_reference_rejects_bad_input():
    with pytest.raises(ValueError, match="out of range"):
        token_scores(torch.zeros(2, 4), torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="floating point"):
        token_scores(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        token_scores(torch.zeros(4))
    with pytest.raises(ValueError, match="targets must be"):
        token_scores(torch.zeros(2, 4), torch.tensor([0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, v", [(1, 7), (5, 1001), (3, 5000)])  # V = 5000 spans two 4096-blocks, masked tail
def test_token_scores_parity(dtype, n, v):
    x = logits(n, v, dtype)
    t = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(1))
    for temp in (1.0, 0.7):
        a = token_scores(x, t, temperature=temp, margin=v > 1, backend="triton")
        b = token_scores(x, t, temperature=temp, margin=v > 1, backend="torch")
        for name in ("surprisal", "entropy", "lse", "margin"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), **TOL[dtype], msg=name)


def test_token_scores_non_contiguous_rows_inf_and_extreme_values():
    base = logits(8, 300, torch.float32)
    base[1, :150] = float("-inf")  # masked vocabulary
    base[2, 7] = 1e4  # extreme logit: a one-hot distribution
    base[3] = -1e4
    x = base[::2]  # row stride 600
    assert not x.is_contiguous()
    t = torch.tensor([5, 7, 0, 3])
    a = token_scores(x, t, margin=True, backend="triton")
    b = token_scores(x, t, margin=True, backend="torch")
    for name in ("surprisal", "entropy", "lse", "margin"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5, msg=name)
    assert a.entropy[1] == pytest.approx(0.0, abs=1e-6) and a.margin[1] == pytest.approx(1.0)
    all_inf = torch.full((1, 5), float("-inf"))
    assert torch.isnan(token_scores(all_inf, backend="triton").lse).all()
    assert torch.isnan(token_scores(all_inf, backend="torch").lse).all()
