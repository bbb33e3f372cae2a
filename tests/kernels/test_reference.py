import pytest
import torch

from thinkpress.kernels.reference import token_scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_scores_match_materialised_log_softmax(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(37, 1001) * 4).to(dtype)
    tgt = torch.randint(0, 1001, (37,))
    s = token_scores(logits, tgt, chunk_size=8)
    lp = torch.log_softmax(logits.float(), -1)
    torch.testing.assert_close(s.surprisal, -lp.gather(1, tgt[:, None]).squeeze(1))
    torch.testing.assert_close(s.entropy, -(lp.exp() * lp).sum(-1))
    torch.testing.assert_close(s.lse, torch.logsumexp(logits.float(), -1))


def test_temperature_and_masked_logits():
    logits = torch.tensor([[0.0, 1.0, float("-inf")], [2.0, 2.0, 2.0]])
    s = token_scores(logits, torch.tensor([1, 0]), temperature=0.5)
    lp = torch.log_softmax(logits / 0.5, -1)
    assert s.surprisal[0] == pytest.approx(-lp[0, 1].item())
    assert s.entropy[1] == pytest.approx(torch.log(torch.tensor(3.0)).item())
    assert torch.isfinite(s.entropy[0])


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="out of range"):
        token_scores(torch.zeros(2, 4), torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="floating point"):
        token_scores(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        token_scores(torch.zeros(4))
    with pytest.raises(ValueError, match="targets must be"):
        token_scores(torch.zeros(2, 4), torch.tensor([0]))
