"""`core eval`: a model as it is, with a saved adapter, on several test sets; one table per set, with intervals."""

import json

import pytest
from conftest import run_cli


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_llama) -> str:
    """A LoRA adapter with random (non-zero) weights on the tiny llama: it changes the model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    cfg = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("tiny-adapter") / "adapter"
    get_peft_model(model, cfg).save_pretrained(out, safe_serialization=True)
    return str(out)


@pytest.mark.slow
def test_eval_command_two_sets_base_and_adapter(tmp_path, tiny_llama, tiny_adapter):
    args = ["eval", "--model", tiny_llama, "--adapter", tiny_adapter, "--data", "gsm8k", "--data", "arith",
            "--set", "test_data.limit=6", "--set", "eval.generation.max_new_tokens=12", "--set", "eval.batch_size=3",
            "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "engine=hf", "--quiet"]
    bad = run_cli([*args[:-1], "--out", str(tmp_path / "r0")])
    assert bad.returncode == 2 and "eval.batch_size: unknown key" in bad.stderr
    args[args.index("eval.batch_size=3")] = "eval.generation.batch_size=3"
    res = run_cli([*args, "--out", str(tmp_path / "r")])
    assert res.returncode == 0, res.stderr
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["plan"]["train"] is False and not any(k.startswith("1-sampler") for k in rep["stages"])
    assert [t["name"] for t in rep["test_sets"]] == ["gsm8k", "arith"]
    assert rep["dataset"]["name"] == "gsm8k" and rep["variants"] == rep["test_sets"][0]["variants"]
    for t in rep["test_sets"]:
        assert t["dataset"]["n"] == 6
        base, ad = t["variants"]
        assert (base["name"], ad["name"]) == ("base", "adapter") and ad["flips_vs"] == "base"
        for v in (base, ad):
            lo, hi = v["accuracy_ci"]
            assert 0 <= lo <= v["accuracy"] <= hi <= 1 and hi - lo > 0.2  # n = 6: wide
        assert ad["tokens_saved_ci"] is not None and ad["accuracy_delta_ci"] is not None
        preds = [json.loads(x) for x in (tmp_path / "r" / "eval" / t["name"] / "adapter" / "predictions.jsonl")
                 .read_text().splitlines()]
        base_preds = [json.loads(x) for x in (tmp_path / "r" / "eval" / t["name"] / "base" / "predictions.jsonl")
                      .read_text().splitlines()]
        assert len(preds) == 6 and [p["token_ids"] for p in preds] != [p["token_ids"] for p in base_preds]
    assert len(rep["summary"]) == 2 and all("adapter vs base" in s for s in rep["summary"])
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Evaluation: gsm8k (test, n=6)" in md and "## Evaluation: arith (test, n=6)" in md
    assert "## Summary" in md and (tmp_path / "r" / "plot.png").stat().st_size > 0
    assert "gsm8k" in res.stdout and "arith" in res.stdout  # one table per set printed

    # a missing adapter is refused before any work, naming the key
    no_adapter = [str(tmp_path) if a == tiny_adapter else a for a in args]
    res = run_cli([*no_adapter, "--out", str(tmp_path / "r2")])
    assert res.returncode == 2 and "eval.adapter" in res.stderr and not (tmp_path / "r2").exists()
