"""Adapters are evaluated as trained: the engine runs LoRA unmerged, with the peft model's own logits."""

import pytest
import torch

from thinkpress.core.engines.base import GenParams
from thinkpress.core.engines.hf import HFEngine, load_causal_lm

TEXTS = ["Tom has 3 apples and buys 5 more, so he has 3 + 5 = 8 apples. The answer is 8.",
         "A box holds 12 pens; 4 boxes hold 4 * 12 = 48 pens. The answer is 48."]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, smollm_path) -> str:
    """A small LoRA adapter really trained (a few AdamW steps in fp32) on the smoke model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model, tok = load_causal_lm(smollm_path, dtype="float32", device="cpu")
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    for _ in range(4):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(out, safe_serialization=True)
    return str(out)


def _peft_logprobs(model, ids: list[int], n_prompt: int) -> torch.Tensor:
    """Log-probabilities of ``ids[n_prompt:]`` from one full forward pass of ``model``."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits[n_prompt - 1 : len(ids) - 1], dim=-1)
    return lp.gather(-1, torch.tensor(ids[n_prompt:])[:, None])[:, 0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_evaluated_adapter_logits_equal_unmerged_peft_model(dtype, smollm_path, adapter_dir):
    from peft import PeftModel

    base = HFEngine.from_pretrained(smollm_path, dtype=dtype, system_prompt="Answer.")
    engine = base.with_adapter(adapter_dir)
    ref_model = PeftModel.from_pretrained(load_causal_lm(smollm_path, dtype=dtype)[0], adapter_dir).eval()
    merged = PeftModel.from_pretrained(load_causal_lm(smollm_path, dtype=dtype)[0], adapter_dir).merge_and_unload()

    prompt = engine.chat_prompt("How many apples does Tom have?")
    cont = " Tom has 3 + 5 = 8 apples. The answer is 8."
    p_ids, c_ids = engine._encode(prompt), engine._encode(cont)
    ref = _peft_logprobs(ref_model, p_ids + c_ids, len(p_ids))

    # the teacher-forcing path (scoring, refiner, KL) of the engine
    ours = -engine.token_scores([prompt], [cont])[0].surprisal
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    # the adapter changes the model (the comparison is not vacuous) ...
    base_lp = -base.token_scores([prompt], [cont])[0].surprisal
    assert (base_lp - ref).abs().max() > 1e-2
    # ... and merging it into the weights of this dtype does not give the trained model in bf16
    merged_lp = _peft_logprobs(merged, p_ids + c_ids, len(p_ids))
    if dtype == "bfloat16":
        assert (merged_lp - ref).abs().max() > 1e-3
    else:
        assert torch.allclose(merged_lp, ref, atol=1e-4)

    # the decode loop (evaluation, samplers): greedy tokens and their log-probs equal the peft model's
    out = engine.generate([prompt], GenParams(max_new_tokens=16), logprobs=True)[0][0]
    with torch.inference_mode():
        gen = ref_model.generate(input_ids=torch.tensor([p_ids]), max_new_tokens=16, do_sample=False,
                                 pad_token_id=engine.pad_id)[0, len(p_ids):].tolist()
    cut = next((i for i, t in enumerate(gen) if t in engine.eos_ids), len(gen))
    assert out.token_ids == gen[:cut]
    fwd = _peft_logprobs(ref_model, p_ids + out.token_ids, len(p_ids))
    # bf16: incremental decode and one full pass round differently, and a logit in [16, 32) has a bf16 spacing
    # of 0.125, so one rounding step moves a log-prob by that much (seen: 0.128 on an AVX512-BF16 CPU)
    tol = 1e-4 if dtype == "float32" else 0.25
    assert torch.allclose(torch.tensor(out.logprobs), fwd, atol=tol)
