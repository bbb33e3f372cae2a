"""TokenSqueeze: selection, the DPO-L loss by hand, reference log-probs, refinement, training on real models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import cli_env, run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from thinkpress.core.config import build_config
from thinkpress.core.context import UI, RunState, StageContext
from thinkpress.core.data import Example, PreferencePair, Problem, Sample, TrainingSet
from thinkpress.core.engines.hf import HFEngine
from thinkpress.core.errors import ConfigError, TrainingError
from thinkpress.core.plugins import build_registry
from thinkpress.core.runner import Runner
from thinkpress.core.store import RunStore
from thinkpress.plugins.tokensqueeze.dpo import (
    REFERENCE_FILE,
    DPOLConfig,
    DPOLTrainer,
    DPOTask,
    completion_logps,
    dpo_l_loss,
)
from thinkpress.plugins.tokensqueeze.refine import KLStepConfig, KLStepRefiner, split_steps, window_kl
from thinkpress.plugins.tokensqueeze.select import ExtraPositives, FixedQuantile, QDyn, ShortestCorrect
from thinkpress.toolkit.lora import collate, encode_example


def _ctx(tmp_path, model="smollm2-135m", stage="selector", sets=()):
    cfg = build_config(preset="smoke", sets=[f"model={model}", f"out={tmp_path / 'run'}", "dtype=float32", *sets])
    state = RunState(cfg, build_registry(load_entry_points=False), RunStore(tmp_path / "run", tmp_path / "c"),
                     UI(quiet=True))
    return StageContext(run=state, stage=stage, component="x", workdir=tmp_path / "work", key="k")


def _s(pid, i, n_tokens, correct, finish="eos"):
    return Sample(problem_id=pid, index=i, prompt=f"Q{pid}", completion=f"{pid}-{i}", n_tokens=n_tokens,
                  finish_reason=finish, correct=correct)


def _problem(pid, level):
    return Problem(id=pid, question="q", answer="1", difficulty=level)


# -- selection ---------------------------------------------------------------------------------

def _mixed():
    # problem a: N=8, c=4 correct (lengths 50, 30, 70, 90), 4 incorrect (20, 60, 100, 320 truncated)
    a = [_s("a", 0, 50, True), _s("a", 1, 30, True), _s("a", 2, 70, True), _s("a", 3, 90, True),
         _s("a", 4, 20, False), _s("a", 5, 60, False), _s("a", 6, 100, False), _s("a", 7, 320, False, "length")]
    b = [_s("b", i, 40 + i, True) for i in range(4)]  # p = 1: no pairs
    c = [_s("c", i, 40 + i, False) for i in range(4)]  # p = 0: no pairs
    return a + b + c, [_problem("a", 2), _problem("b", 1), _problem("c", 3)]


def test_q_dyn_takes_k_shortest_correct_against_longer_incorrect(tmp_path):
    samples, probs = _mixed()
    ctx = _ctx(tmp_path)
    out = QDyn(QDyn.Config()).select(samples, probs, ctx)
    # p = 4/8, q = 0.2 * 0.5 = 0.1, k = ceil(0.4) = 1: the 30-token answer, vs incorrect longer ones (60, 100, 320)
    assert [(p.chosen, p.rejected) for p in out.pairs] == [("a-1", "a-7"), ("a-1", "a-6"), ("a-1", "a-5")]
    assert [e.completion for e in out.examples] == ["a-1"]
    assert out.pairs[0].meta["chosen_tokens"] == 30 and out.pairs[0].meta["rejected_tokens"] == 320
    assert ctx.stats["by_difficulty"]["1"]["all_correct"] == 1 and ctx.stats["by_difficulty"]["3"]["all_wrong"] == 1
    assert ctx.stats["by_difficulty"]["2"] == {"problems": 1, "with_pairs": 1, "pairs": 3}
    assert ctx.stats["k_distribution"] == {"1": 1}

    # alpha = 1: q = 0.5, k = ceil(2.0) = 2 positives (30, 50); round-robin pairs, capped at max_pairs
    out = QDyn(QDyn.Config(alpha=1.0, max_pairs=5)).select(samples, probs, _ctx(tmp_path))
    assert [(p.chosen, p.rejected) for p in out.pairs] == [
        ("a-1", "a-7"), ("a-0", "a-7"), ("a-1", "a-6"), ("a-0", "a-6"), ("a-1", "a-5")]


def test_q_dyn_is_adaptive_only_from_large_n(tmp_path):
    """alpha = 0.2: at N = 8 every problem gets k = 1 (q-dyn == shortest-correct); at N = 32 it does not."""
    def group(pid, n, c):  # c correct answers of 10..(10+c) tokens, n - c incorrect ones of 500+ tokens
        return ([_s(pid, i, 10 + i, True) for i in range(c)] + [_s(pid, c + i, 500 + i, False) for i in range(n - c)])

    def k_dist(n, cs):
        samples = [s for j, c in enumerate(cs) for s in group(f"p{j}", n, c)]
        probs = [_problem(f"p{j}", 1) for j in range(len(cs))]
        ctx = _ctx(tmp_path)
        q = QDyn(QDyn.Config(max_pairs=64)).select(samples, probs, ctx)
        one = ShortestCorrect(ShortestCorrect.Config(max_pairs=64)).select(samples, probs, _ctx(tmp_path))
        return ctx.stats["k_distribution"], {p.chosen for p in q.pairs} == {p.chosen for p in one.pairs}

    # N = 8: alpha (1 - p) c <= 0.2 * 8 / 4 = 0.4 < 1 for every c: k = 1 everywhere, the same pairs
    assert k_dist(8, [1, 2, 4, 6, 7]) == ({"1": 5}, True)
    # N = 32: c = 16 gives ceil(0.2 * 0.5 * 16) = 2, c = 24 gives ceil(1.2) = 2, c = 4 gives ceil(0.7) = 1
    assert k_dist(32, [4, 16, 24]) == ({"1": 1, "2": 2}, False)


def test_selector_variants(tmp_path):
    samples, probs = _mixed()
    one = ShortestCorrect(ShortestCorrect.Config()).select(samples, probs, _ctx(tmp_path))
    assert {p.chosen for p in one.pairs} == {"a-1"}
    fq = FixedQuantile(FixedQuantile.Config(quantile=0.75)).select(samples, probs, _ctx(tmp_path))
    assert {p.chosen for p in fq.pairs} == {"a-1", "a-0", "a-2"}  # ceil(0.75 * 4) = 3
    # extra-positives: the correct answers longer than the positive (50, 70, 90) are rejected ones too
    ep = ExtraPositives(ExtraPositives.Config()).select(samples, probs, _ctx(tmp_path))
    assert sorted(p.rejected for p in ep.pairs) == ["a-0", "a-2", "a-3", "a-5", "a-6", "a-7"]
    assert any(p.meta["rejected_correct"] for p in ep.pairs)
    gap = QDyn(QDyn.Config(min_gap=40)).select(samples, probs, _ctx(tmp_path))  # rejected >= 70 tokens
    assert [p.rejected for p in gap.pairs] == ["a-7", "a-6"]


def test_no_pairs_is_counted_not_a_crash(tmp_path):
    samples = [_s("b", i, 40, True) for i in range(4)] + [_s("c", i, 40, False) for i in range(4)]
    ctx = _ctx(tmp_path)
    out = QDyn(QDyn.Config()).select(samples, [_problem("b", 1), _problem("c", 1)], ctx)
    assert out.pairs == [] and out.examples == [] and ctx.stats["problems_with_pairs"] == 0
    with pytest.raises(TrainingError, match="all-correct or all-wrong"):
        DPOLTrainer(DPOLConfig()).train(out, _ctx(tmp_path, stage="trainer"))


@pytest.mark.parametrize("bad", ["components.self-sampler.n=1", "components.kl-step.epsilon=0",
                                 "components.kl-step.window=0", "components.dpo-l.eta=1.5",
                                 "components.dpo-l.length_sign=0", "components.q-dyn.alpha=0"])
def test_bad_component_values_fail_before_work(tmp_path, bad):
    cfg = build_config(preset="smoke", sets=["plugins=[tokensqueeze]", f"out={tmp_path / 'run'}", bad])
    with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
        Runner(cfg, registry=build_registry(load_entry_points=False), ui=UI(quiet=True))
    assert not (tmp_path / "run").exists()


# -- the DPO-L loss ----------------------------------------------------------------------------

def _hand_loss(pc, pr, rc, rr, lc, lr, beta, eta, lam, sign):
    z = beta * ((pc - rc) - (pr - rr)) + sign * lam * math.log(lr / lc)
    dpo = -math.log(1 / (1 + math.exp(-z)))
    sft = -pc / lc
    return eta * dpo + (1 - eta) * sft


@pytest.mark.parametrize("sign", [-1, 1])
@pytest.mark.parametrize(("eta", "lam"), [(0.5, 1.0), (1.0, 0.0), (0.0, 1.0), (0.5, 0.0)])
def test_dpo_l_loss_matches_hand_computation(sign, eta, lam):
    pc, pr, rc, rr = [-12.0, -40.0], [-30.0, -35.0], [-14.0, -41.0], [-28.0, -30.0]
    lc, lr = [10, 20], [25, 21]
    loss, logs = dpo_l_loss(*(torch.tensor(x) for x in (pc, pr, rc, rr)), torch.tensor(lc), torch.tensor(lr),
                            beta=0.1, eta=eta, length_lambda=lam, length_sign=sign)
    want = sum(_hand_loss(pc[i], pr[i], rc[i], rr[i], lc[i], lr[i], 0.1, eta, lam, sign) for i in range(2)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    # margins by hand: 0.1 * ((-12 + 14) - (-30 + 28)) = 0.4; 0.1 * ((-40 + 41) - (-35 + 30)) = 0.6
    assert logs["reward_margin"] == pytest.approx(0.5) and logs["reward_accuracy"] == 1.0


def test_length_sign_minus_is_a_margin():
    """With sign -1 a longer rejected answer raises the loss (and the gradient) of the same pair."""
    args = [torch.tensor([-10.0]), torch.tensor([-10.0]), torch.tensor([-10.0]), torch.tensor([-10.0])]
    short, _ = dpo_l_loss(*args, torch.tensor([10]), torch.tensor([11]), beta=0.1, eta=1.0, length_lambda=1.0,
                          length_sign=-1)
    long, _ = dpo_l_loss(*args, torch.tensor([10]), torch.tensor([40]), beta=0.1, eta=1.0, length_lambda=1.0,
                         length_sign=-1)
    assert long.item() > short.item() > math.log(2)


def test_completion_logps_and_reference_equal_the_base_model(tiny_llama, tmp_path):
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    pairs = [PreferencePair(id="1", problem_id="a", prompt="Q: 2+2?\nA:", chosen=" 4.", rejected=" It is 5, I think."),
             PreferencePair(id="2", problem_id="b", prompt="A longer question here?\nA:", chosen=" yes",
                            rejected=" no, never, not at all")]
    # by hand: log-softmax of one full forward per sequence, gathered at the completion tokens
    want = []
    for p in pairs:
        for text in (p.chosen, p.rejected):
            ids, labels = encode_example(tok, p.prompt, text, 64)
            logits = base(input_ids=torch.tensor([ids])).logits[0].float()
            lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
            want.append(sum(v for v, lab in zip(lp.tolist(), labels[1:], strict=True) if lab != -100))
    batch = [encode_example(tok, p.prompt, t, 64) for p in pairs for t in (p.chosen, p.rejected)]
    ids, labels, mask = collate(batch, tok.pad_token_id)
    got = completion_logps(base, ids, mask, labels)
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-4, rtol=1e-5)

    # the reference pass disables the adapter: with a non-zero LoRA it still equals the base model
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for n, prm in peft_model.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.5)
    task = DPOTask(pairs, tok, DPOLConfig(batch_size=2))
    task.compute_reference(peft_model, Accelerator(cpu=True))
    torch.testing.assert_close(task.ref.flatten(), torch.tensor(want), atol=1e-4, rtol=1e-5)
    assert task.items[0][2] == len(tok(" 4.", add_special_tokens=False).input_ids) + 1  # EOS counts
    ids, labels, mask = collate([task.items[0][0]], tok.pad_token_id)
    assert completion_logps(peft_model, ids, mask, labels).item() != pytest.approx(want[0], abs=1e-3)

    # a later round continues an adapter: reference="policy" is that adapter as the round starts,
    # reference="base" still the base model
    policy = DPOTask(pairs, tok, DPOLConfig(batch_size=2, reference="policy"), continued=True)
    policy.compute_reference(peft_model, Accelerator(cpu=True))
    rows = [encode_example(tok, p.prompt, t, 64) for p in pairs for t in (p.chosen, p.rejected)]
    ids, labels, mask = collate(rows, tok.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(policy.ref.flatten(), completion_logps(peft_model.eval(), ids, mask, labels),
                                   atol=1e-4, rtol=1e-5)
    anchored = DPOTask(pairs, tok, DPOLConfig(batch_size=2, reference="base"), continued=True)
    anchored.compute_reference(peft_model, Accelerator(cpu=True))
    torch.testing.assert_close(anchored.ref.flatten(), torch.tensor(want), atol=1e-4, rtol=1e-5)


def test_variants_on_the_same_pairs_share_one_reference_computation(tmp_path, tiny_llama, monkeypatch):
    """The reference depends on the pairs and the base model, not on lr or lambda: a second variant reads it."""
    pairs = [PreferencePair(id=str(i), problem_id=str(i), prompt=f"Q: {i}+1?\nA:", chosen=f" {i + 1}.",
                            rejected=f" Adding one to {i} gives {i + 1}, so {i + 1}.") for i in range(4)]
    calls = []
    real = DPOTask.compute_reference
    monkeypatch.setattr(DPOTask, "compute_reference", lambda self, m, a: calls.append(len(self)) or real(self, m, a))
    refs = []
    for i, (lr, lam, ps) in enumerate([(1e-3, 1.0, pairs), (1e-4, 0.0, pairs), (1e-3, 1.0, pairs[:3])]):
        ctx = _ctx(tmp_path, tiny_llama, "trainer")
        ctx.workdir = tmp_path / f"work{i}"
        cfg = DPOLConfig(lr=lr, length_lambda=lam, epochs=1, batch_size=2, grad_accum=1, autocast_bf16=False)
        DPOLTrainer(cfg).train(TrainingSet(pairs=ps), ctx)
        refs.append(torch.load(ctx.workdir / REFERENCE_FILE))
    assert calls == [4, 3]  # the second variant read the first one's; other pairs are another key
    assert torch.equal(refs[0], refs[1]) and torch.equal(refs[0][:3], refs[2])  # fp32: the same numbers anyway


@pytest.mark.parametrize("chunk", [1, 3, 128])
def test_chunked_completion_logps_equal_the_full_logits_values_and_gradients(tiny_llama, chunk):
    from peft import LoraConfig, get_peft_model

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                           LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.1)
    rows = [encode_example(tok, "Q: 2+2?\nA:", " 4, since two and two make four.", 64),
            encode_example(tok, "A much longer question, about many things?\nA:", " no", 64)]
    ids, labels, mask = collate(rows, tok.pad_token_id)
    grads = []
    for c in (0, chunk):
        model.zero_grad()
        lp = completion_logps(model, ids, mask, labels, c)
        (lp * torch.tensor([1.0, -2.0])).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if c == 0:
            want = lp.detach()
        else:
            torch.testing.assert_close(lp.detach(), want, atol=1e-4, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4)


def test_a_later_round_continues_the_previous_adapter(tmp_path, tiny_llama):
    """load_trainable with ctx.adapter: the saved LoRA weights, trainable, not a fresh B = 0 adapter."""
    from safetensors.torch import load_file

    from thinkpress.toolkit.lora import load_trainable, save_random_adapter

    saved = save_random_adapter(tiny_llama, tmp_path / "r1", rank=4)
    ctx = _ctx(tmp_path, tiny_llama, "trainer")
    fresh, _ = load_trainable(ctx, DPOLConfig(rank=4))
    assert all(float(p.detach().abs().max()) == 0 for n, p in fresh.named_parameters() if "lora_B" in n)
    ctx.adapter = saved
    cont, _ = load_trainable(ctx, DPOLConfig(rank=4))
    want = load_file(str(tmp_path / "r1" / "adapter_model.safetensors"))
    got = {n: p for n, p in cont.named_parameters() if "lora_" in n}
    assert got and all(p.requires_grad for p in got.values())
    for name, w in want.items():
        match = [p for n, p in got.items() if n.replace(".default", "").endswith(name.split("base_model.model.")[-1])]
        assert len(match) == 1 and torch.equal(match[0].detach(), w), name


# -- refinement --------------------------------------------------------------------------------

def test_split_steps_round_trips_and_falls_back_to_lines():
    cfg = KLStepConfig()
    text = "First.\n\nSecond line\ncontinues.\n\nThird.\n\nSo \\boxed{3}."
    steps, d = split_steps(text, cfg)
    assert d == "\n\n" and len(steps) == 4 and d.join(steps) == text
    short = "Add 2 and 3.\nThat gives 5.\n\\boxed{5}"
    steps, d = split_steps(short, cfg)
    assert d == "\n" and steps == ["Add 2 and 3.", "That gives 5.", "\\boxed{5}"]


def test_context_logits_batched_equal_one_context_at_a_time(tiny_qwen2):
    from thinkpress.core.engines.base import Engine

    eng = HFEngine.from_pretrained(tiny_qwen2, dtype="float32")
    shared = "Question: what is 2+3? Let us think step by step.\n\n"
    cont = "Then we add them to get 5.\n\nSo the answer is 5."
    for contexts in (["Question: what is 2+3?\nStep one.\n\n", "Q?\n\n", "Some longer context with words.\n\n"],
                     [shared + "Step one: 2.\n\n", shared + "A.", shared + "A much longer first step here.\n\n"],
                     [shared, shared + "x"]):  # a context that is the shared prefix itself
        batched = list(eng.context_logits(contexts, cont, max_tokens=9, chunk_size=4))
        generic = list(Engine.context_logits(eng, contexts, cont, max_tokens=9, chunk_size=4))
        assert [t.tolist() for _, t in batched] == [t.tolist() for _, t in generic]
        assert sum(len(t) for _, t in batched) == 9
        for (a, _), (b, _) in zip(batched, generic, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_window_kl_zero_for_same_context_and_positive_otherwise(tiny_qwen2):
    eng = HFEngine.from_pretrained(tiny_qwen2, dtype="float32")
    cfg = KLStepConfig(window=16, chunk_size=5)
    same, other = window_kl(eng, ["Step A.\n\n", "Step A.\n\n", "Totally different words.\n\n"], "Next step.", cfg)
    assert same == pytest.approx(0.0, abs=1e-6) and other > 1e-4
    total = window_kl(eng, ["Step A.\n\n", "Totally different words.\n\n"], "Next step.",
                      cfg.model_copy(update={"reduce": "sum"}))[0]
    n = eng.count_tokens("Next step.")
    assert total == pytest.approx(other * n, rel=1e-4)


def _trace_set():
    prompt = "<|im_start|>user\nTom has 3 apples and buys 4 more. How many apples does he have?<|im_end|>\n" \
             "<|im_start|>assistant\n"
    trace = ("To determine how many apples Tom has now, we need to add the apples he buys to the apples he "
             "already has.\n\nTom starts with 3 apples and then he buys 4 more apples at the store.\n\n"
             "So 3 + 4 = 7.\n\nThe answer is \\boxed{7}.")
    return prompt, trace, TrainingSet(
        examples=[Example(id="e", problem_id="a", prompt=prompt, completion=trace, meta={"n_tokens": 60})],
        pairs=[PreferencePair(id="p", problem_id="a", prompt=prompt, chosen=trace, rejected="long wrong " * 20)])


def test_kl_step_refiner_accepts_by_epsilon(tmp_path, smollm_path):
    prompt, trace, data = _trace_set()
    ctx = _ctx(tmp_path, smollm_path, "refiner")
    loose = KLStepRefiner(KLStepConfig(n_candidates=16, epsilon=1e9, batch_size=64)).refine(data, ctx)
    st = ctx.stats
    # every step with a continuation is tried; with an unbounded epsilon each takes its shortest candidate
    assert st["steps"] == 4 and st["steps_tried"] == 3
    assert st["steps_shortened"] >= 1 and st["tokens_after"] < st["tokens_before"]
    assert loose.examples[0].completion == loose.pairs[0].chosen != trace
    assert loose.pairs[0].rejected == data.pairs[0].rejected
    assert loose.examples[0].completion.endswith("\n\nThe answer is \\boxed{7}.")  # the last step is kept

    ctx2 = _ctx(tmp_path / "strict", smollm_path, "refiner")
    strict = KLStepRefiner(KLStepConfig(n_candidates=16, epsilon=1e-12, batch_size=64)).refine(data, ctx2)
    assert strict.examples[0].completion == trace and ctx2.stats["steps_shortened"] == 0
    assert ctx2.stats["candidates_scored"] >= 1


def test_single_step_trace_is_a_counted_skip(tmp_path, tiny_llama):
    data = TrainingSet(examples=[Example(id="e", problem_id="a", prompt="Q", completion="\\boxed{7}")])
    ctx = _ctx(tmp_path, tiny_llama, "refiner")
    out = KLStepRefiner(KLStepConfig(n_candidates=2)).refine(data, ctx)
    assert out.examples[0].completion == "\\boxed{7}"
    assert ctx.stats["single_step_traces"] == 1 and ctx.stats["steps_tried"] == 0


# -- training on a real model --------------------------------------------------------------------

def test_dpo_l_training_prefers_the_short_chosen_answers(tmp_path, smollm_path):
    """A few DPO-L + SFT steps on SmolLM2 raise log pi(chosen) - log pi(rejected) over the base model."""
    qs = [f"What is {a} plus {b}?" for a, b in [(2, 3), (10, 5), (7, 8), (4, 4)]]
    ans = [5, 15, 15, 8]
    pairs = [PreferencePair(id=str(i), problem_id=str(i), prompt=f"Question: {q}\nAnswer:", chosen=f" {a}.",
                            rejected=f" Let us think about this carefully. First, we write down the numbers. "
                                     f"Then we add them up, one by one, and finally we get {a + 1}.")
             for i, (q, a) in enumerate(zip(qs, ans, strict=True))]
    ctx = _ctx(tmp_path, smollm_path, "trainer")
    cfg = DPOLConfig(lr=1e-3, epochs=3, batch_size=2, grad_accum=1, autocast_bf16=False, warmup_ratio=0.0,
                     dropout=0.0)
    res = DPOLTrainer(cfg).train(TrainingSet(pairs=pairs), ctx)
    assert res.metrics["steps"] == 6 and (tmp_path / "work" / "adapter" / "adapter_config.json").exists()
    assert res.metrics["reward_accuracy_mean_last_epoch"] == 1.0
    base = HFEngine.from_pretrained(smollm_path, dtype="float32")
    trained = base.with_adapter(res.adapter_path)

    def pref(eng):
        c = eng.score([p.prompt for p in pairs], [p.chosen for p in pairs])
        r = eng.score([p.prompt for p in pairs], [p.rejected for p in pairs])
        return [sum(a) - sum(b) for a, b in zip(c, r, strict=True)]

    before, after = pref(base), pref(trained)
    assert all(a > b + 1.0 for a, b in zip(after, before, strict=True)), (before, after)
    assert ctx.stats["mean_log_length_ratio"] > 1.0


@pytest.mark.slow
def test_tokensqueeze_smoke_run_end_to_end(tmp_path):
    out = tmp_path / "run"
    # the smoke preset, with fewer pairs per problem and shorter evaluation answers: each decode step of
    # SmolLM2 costs ~0.2 s in fp32 on a 2-core AVX2 CPU whatever the batch, so CI time is in steps
    r = run_cli(["run", "--plugins", "tokensqueeze", "--preset", "smoke", "--out", str(out), "--quiet",
                 "--set", "components.q-dyn.max_pairs=2", "--set", "eval.generation.max_new_tokens=64"],
                env=cli_env(), timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["plan"]["sampler"] == "self-sampler" and rep["plan"]["selector"] == "q-dyn"
    assert rep["plan"]["refiners"] == ["kl-step"] and rep["plan"]["trainer"] == "dpo-l"
    rows = {v["name"]: v for v in rep["variants"]}
    assert set(rows) == {"base", "trained"}
    stages = rep["stages"]
    sel = next(v for k, v in stages.items() if "selector" in k)["stats"]
    ref = next(v for k, v in stages.items() if "refiner" in k)["stats"]
    assert sel["pairs"] >= 1 and ref["steps_tried"] >= 1
    assert ref["tokens_after"] <= ref["tokens_before"]


def test_all_wrong_training_set_stops_with_a_clear_message_and_keeps_the_samples(tmp_path, tiny_llama):
    out = tmp_path / "run"
    args = ["run", "--plugins", "tokensqueeze", "--preset", "smoke", "--model", tiny_llama, "--out", str(out),
            "--quiet", "--set", "train_data.limit=2", "--set", "components.self-sampler.n=2",
            "--set", "components.self-sampler.max_new_tokens=4"]
    r = run_cli(args)
    assert r.returncode != 0
    assert "training set is empty after selection by 'q-dyn'" in r.stderr and "all-correct or all-wrong" in r.stderr
    assert "Traceback" not in r.stderr
    samples = next((out / "stages").glob("1-sampler-self-sampler")) / "samples.jsonl"
    assert len(samples.read_text().splitlines()) == 4


@pytest.mark.parametrize(("sets", "want"), [
    ([], {"selector": "q-dyn", "refiners": ["kl-step"], "trainer": "dpo-l"}),
    (["stages.selector=shortest-correct"], {"selector": "shortest-correct"}),
    (["stages.selector=fixed-quantile", "components.fixed-quantile.quantile=0.5"], {"selector": "fixed-quantile"}),
    (["stages.selector=extra-positives"], {"selector": "extra-positives"}),
    (["stages.refiners=[]"], {"refiners": []}),
    (["stages.trainer=lora-sft"], {"trainer": "lora-sft"}),
])
def test_ablation_variants_are_selectable_by_config(tmp_path, sets, want):
    cfg = build_config(preset="smoke", sets=["plugins=[tokensqueeze]", f"out={tmp_path / 'run'}", *sets])
    plan = Runner(cfg, registry=build_registry(load_entry_points=False), ui=UI(quiet=True)).plan
    got = plan.describe()
    assert got["sampler"] == "self-sampler"
    assert {k: got[k] for k in want} == want


@pytest.mark.parametrize(("objective", "eta", "lam"), [("dpo", 1.0, 0.0), ("sft", 0.0, 1.0), ("dpo+sft", 0.5, 0.0)])
def test_objective_ablations_reach_the_trainer(tmp_path, objective, eta, lam):
    cfg = build_config(preset="smoke", sets=["plugins=[tokensqueeze]", f"out={tmp_path / 'run'}",
                                             f"components.dpo-l.eta={eta}", f"components.dpo-l.length_lambda={lam}",
                                             "components.q-dyn.alpha=0.5", "components.kl-step.epsilon=0.01"])
    plan = Runner(cfg, registry=build_registry(load_entry_points=False), ui=UI(quiet=True)).plan
    assert (plan.trainer.instance.config.eta, plan.trainer.instance.config.length_lambda) == (eta, lam), objective
    assert plan.selector.instance.config.alpha == 0.5 and plan.refiners[0].instance.config.epsilon == 0.01
