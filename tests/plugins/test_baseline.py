"""The baseline plugin's components on real (tiny) models."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from thinkpress.core.config import build_config
from thinkpress.core.context import UI, RunState, StageContext
from thinkpress.core.data import Example, Problem, Sample, TrainingSet
from thinkpress.core.errors import TrainingError
from thinkpress.core.plugins import build_registry
from thinkpress.core.store import RunStore
from thinkpress.plugins.baseline import KeepCorrect, RejectionSampler
from thinkpress.plugins.baseline.sft import LoraSFT
from thinkpress.toolkit import lora as sft_mod
from thinkpress.toolkit.lora import encode_example


def _ctx(tmp_path, model, stage="trainer"):
    cfg = build_config(preset="smoke", sets=[f"model={model}", f"out={tmp_path / 'run'}", "dtype=float32"])
    state = RunState(cfg, build_registry(load_entry_points=False), RunStore(tmp_path / "run", tmp_path / "c"),
                     UI(quiet=True))
    return StageContext(run=state, stage=stage, component="x", workdir=tmp_path / "work", key="k")


def _sample(pid, i, text, correct=True, finish="eos", n=5):
    return Sample(problem_id=pid, index=i, prompt="P", completion=text, n_tokens=n, finish_reason=finish,
                  correct=correct)


def test_keep_correct_filters_dedupes_and_caps(tmp_path):
    samples = [_sample("a", 0, "x"), _sample("a", 1, "x"), _sample("a", 2, "y", n=50), _sample("a", 3, "z", False),
               _sample("b", 0, "w", finish="length"), _sample("c", 0, "v")]
    out = KeepCorrect(KeepCorrect.Config()).select(samples, [], _ctx(tmp_path, "smollm2-135m", "selector"))
    assert [e.id for e in out.examples] == ["a#0", "a#2", "c#0"]
    capped = KeepCorrect(KeepCorrect.Config(max_tokens=10, max_per_problem=1)).select(
        samples, [], _ctx(tmp_path, "smollm2-135m", "selector"))
    assert [e.id for e in capped.examples] == ["a#0", "c#0"]


def test_rejection_sampler_grades_real_samples(tmp_path, tiny_llama):
    ctx = _ctx(tmp_path, tiny_llama, "sampler")
    probs = [Problem(id="p0", question="1+1?", answer="2"), Problem(id="p1", question="2+3?", answer="5")]
    comp = RejectionSampler(RejectionSampler.Config(n=3, temperature=1.0, max_new_tokens=8, batch_size=4))
    samples = comp.sample(probs, ctx)
    assert [(s.problem_id, s.index) for s in samples] == [(p, i) for p in ("p0", "p1") for i in range(3)]
    for s in samples:
        assert s.n_tokens <= 8 and s.logprob is not None and s.logprob < 0
        assert s.correct == (s.pred is not None and float(s.pred.replace(",", "")) == float(
            {"p0": 2, "p1": 5}[s.problem_id]))
    assert ctx.stats["samples"] == 6


def test_completion_loss_equals_full_masked_loss(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    batch = [encode_example(tok, "Q: 1+1?\nA:", " 2, since one and one make two.", 64),
             encode_example(tok, "A much longer question about apples and pears?\nA:", " 5", 64)]
    ids, labels, mask = sft_mod.collate(batch, tok.pad_token_id)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(sft_mod.completion_loss(model, ids, mask, labels), ref)


def test_labels_mask_the_prompt(smollm_path):
    tok = AutoTokenizer.from_pretrained(smollm_path)
    ids, labels = encode_example(tok, "Question: 1+1?\n", "The answer is 2.", 64)
    n_prompt = len(tok("Question: 1+1?\n", add_special_tokens=False).input_ids)
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
    assert encode_example(tok, "a long prompt " * 20, "x", 8) is None


def test_lora_sft_learns_and_saves_adapter(tmp_path, smollm_path):
    # A real model: a random tiny one cannot express a peaked distribution (its logits stay near uniform).
    ctx = _ctx(tmp_path, smollm_path)
    ex = [Example(id=str(i), problem_id=str(i), prompt="Q: what is the code?\nA:", completion=" 7 7 7 7")
          for i in range(8)]
    cfg = LoraSFT.Config(epochs=3, batch_size=4, grad_accum=1, lr=2e-3, warmup_ratio=0.0, scheduler="constant")
    res = LoraSFT(cfg).train(TrainingSet(examples=ex), ctx)
    assert res.metrics["steps"] == 6 and res.metrics["loss_last"] < 0.5 * res.metrics["loss_first"]
    assert (tmp_path / "work" / "adapter" / "adapter_model.safetensors").exists()
    cfg_json = json.loads((tmp_path / "work" / "adapter" / "adapter_config.json").read_text())
    assert cfg_json["r"] == 8 and cfg_json["lora_alpha"] == 16
    # evaluation loads base + adapter: the trained engine now prefers the learned continuation
    from thinkpress.core.engines.hf import HFEngine

    base = HFEngine.from_pretrained(smollm_path, dtype="float32", system_prompt=None)
    tuned = base.with_adapter(res.adapter_path)
    lp_base = sum(base.score(["Q: what is the code?\nA:"], [" 7 7 7 7"])[0])
    lp_tuned = sum(tuned.score(["Q: what is the code?\nA:"], [" 7 7 7 7"])[0])
    assert lp_tuned > lp_base + 1.0


def test_non_finite_loss_stops_with_clear_error_and_keeps_last_good_adapter(tmp_path, tiny_llama, monkeypatch):
    real = sft_mod.load_trainable

    def poisoned(ctx, cfg):
        model, tok = real(ctx, cfg)
        calls = {"n": 0}
        orig = model.forward

        def forward(*a, **k):
            out = orig(*a, **k)
            calls["n"] += 1
            if calls["n"] >= 3:
                out.logits = out.logits * torch.tensor(float("nan"))
            return out

        model.forward = forward
        return model, tok

    monkeypatch.setattr(sft_mod, "load_trainable", poisoned)
    ctx = _ctx(tmp_path, tiny_llama)
    ex = [Example(id=str(i), problem_id=str(i), prompt="Q:", completion=" a b c") for i in range(8)]
    cfg = LoraSFT.Config(epochs=4, batch_size=2, grad_accum=1, save_every=1, autocast_bf16=False)
    with pytest.raises(TrainingError, match=r"non-finite training loss .* at optimizer step 2.*last good adapter"):
        LoraSFT(cfg).train(TrainingSet(examples=ex), ctx)
    good = tmp_path / "work" / "adapter_last_good"
    assert (good / "adapter_model.safetensors").exists()
    assert json.loads((good / "step.json").read_text())["step"] == 2
    assert not (tmp_path / "work" / "adapter").exists()


def test_a_random_adapter_changes_the_model_and_is_reproducible(tmp_path, tiny_llama):
    from peft import PeftModel

    from thinkpress.core.models import load_causal_lm
    from thinkpress.toolkit.lora import save_random_adapter

    a = save_random_adapter(tiny_llama, tmp_path / "a", rank=4)
    b = save_random_adapter(tiny_llama, tmp_path / "b", rank=4)
    ids = torch.tensor([[1, 5, 9, 13]])
    model, _ = load_causal_lm(tiny_llama, dtype="float32", device="cpu")
    with torch.no_grad():
        base = model(ids).logits
        la = PeftModel.from_pretrained(model, a).eval()(ids).logits
    model_b, _ = load_causal_lm(tiny_llama, dtype="float32", device="cpu")
    with torch.no_grad():
        lb = PeftModel.from_pretrained(model_b, b).eval()(ids).logits
    assert not torch.allclose(la, base, atol=1e-4)  # B is not zero: the adapter does something
    torch.testing.assert_close(la, lb)  # same seed, same adapter
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 4
