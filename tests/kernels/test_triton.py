"""Triton kernels (through TRITON_INTERPRET=1 on CPU) against the torch references. Small shapes: the
interpreter is slow."""

import pytest
import torch

from thinkpress.kernels import key_redundancy, kl_div, token_scores, window_attention_mass

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-4, rtol=1e-4),
       torch.float16: dict(atol=1e-4, rtol=1e-4)}


def _logits(n, v, dtype, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, v", [(1, 7), (5, 1001), (3, 5000)])  # V = 5000 spans two 4096-blocks, masked tail
def test_token_scores_parity(dtype, n, v):
    x = _logits(n, v, dtype)
    t = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(1))
    for temp in (1.0, 0.7):
        a = token_scores(x, t, temperature=temp, margin=v > 1, backend="triton")
        b = token_scores(x, t, temperature=temp, margin=v > 1, backend="torch")
        for name in ("surprisal", "entropy", "lse", "margin"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), **TOL[dtype], msg=name)


def test_token_scores_non_contiguous_rows_inf_and_extreme_values():
    base = _logits(8, 300, torch.float32)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, v", [(1, 3), (4, 5000)])
def test_kl_parity(dtype, n, v):
    p, q = _logits(n, v, dtype, 0), _logits(n, v, dtype, 1)
    torch.testing.assert_close(kl_div(p, q, backend="triton"), kl_div(p, q, backend="torch"), **TOL[dtype])
    torch.testing.assert_close(kl_div(p, p, backend="triton"), torch.zeros(n), atol=1e-5, rtol=0)
    torch.testing.assert_close(kl_div(p, q, temperature=2.0, backend="triton"),
                               kl_div(p, q, temperature=2.0, backend="torch"), **TOL[dtype])


def test_kl_with_masked_entries():
    p, q = _logits(2, 50, torch.float32, 0), _logits(2, 50, torch.float32, 1)
    p[0, :10] = float("-inf")  # p puts no mass there: fine
    q[1, 3] = float("-inf")  # q has no mass where p has some: infinite KL
    a, b = kl_div(p, q, backend="triton"), kl_div(p, q, backend="torch")
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    assert torch.isinf(a[1]) and torch.isinf(b[1])
    p_ref, q_ref = torch.log_softmax(p[0], -1), torch.log_softmax(q[0], -1)
    assert a[0].item() == pytest.approx((p_ref.exp() * (p_ref - q_ref)).nansum().item(), abs=1e-5)


def _qk(b, hq, hkv, w, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, w, d, generator=g).to(dtype), torch.randn(b, hkv, n, d, generator=g).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(1, 2, 2, 1, 5, 4), (2, 6, 2, 3, 37, 12)])  # GQA group 3, odd N and D
def test_window_attention_mass_parity_and_topk(dtype, causal, shape):
    q, k = _qk(*shape, dtype)
    a = window_attention_mass(q, k, causal=causal, backend="triton")
    b = window_attention_mass(q, k, causal=causal, backend="torch")
    torch.testing.assert_close(a, b, **TOL[dtype])
    # each query's probabilities sum to 1, so the mean over queries sums to 1 over keys
    torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:2]), atol=1e-4, rtol=0)
    kk = max(1, shape[4] // 3)
    assert torch.equal(a.topk(kk, -1).indices.sort(-1).values, b.topk(kk, -1).indices.sort(-1).values)


def test_window_attention_mass_matches_explicit_softmax_and_pooling():
    q, k = _qk(1, 4, 2, 3, 10, 8, torch.float32)
    sc = torch.einsum("bhwd,bhnd->bhwn", q, k.repeat_interleave(2, dim=1)) / 8 ** 0.5
    qpos = torch.arange(7, 10)
    sc = sc.masked_fill(torch.arange(10)[None, :] > qpos[:, None], float("-inf"))
    ref = sc.softmax(-1).reshape(1, 2, 2 * 3, 10).mean(2)
    torch.testing.assert_close(window_attention_mass(q, k, backend="triton"), ref, atol=1e-6, rtol=1e-5)
    pooled = window_attention_mass(q, k, pool_kernel=3, backend="triton")
    torch.testing.assert_close(pooled[..., 4], ref[..., 3:6].amax(-1), atol=1e-6, rtol=1e-5)


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
