"""TokenSkip: answer splitting, word aggregation and the budget, mixing, scorers on real models, the run."""

from __future__ import annotations

import importlib.util
import json
import random
from collections import Counter

import pytest
import torch
from conftest import cli_env, run_cli
from pydantic import ValidationError

from thinkpress.core.config import build_config
from thinkpress.core.context import UI, RunState, StageContext
from thinkpress.core.data import Example, Problem, Sample, TrainingSet
from thinkpress.core.engines.hf import HFEngine
from thinkpress.core.errors import ConfigError, TrainingError
from thinkpress.core.planning import resolve_plan
from thinkpress.core.plugins import build_registry
from thinkpress.core.scoring import TokenScorer, check_surfaces, surfaces_from_offsets
from thinkpress.core.store import RunStore
from thinkpress.plugins.tokenskip.prune import (
    TokenSkipPruner,
    Word,
    prune_cot,
    ratio_tag,
    rebuild,
    select_words,
    word_scores,
)
from thinkpress.plugins.tokenskip.scorers import EntropyScorer, SelfInformationScorer, keep_probabilities
from thinkpress.plugins.tokenskip.select import CoTFilter, split_answer
from thinkpress.plugins.tokenskip.train import TokenSkipSFT, controllability

COT = ("To find the total,  we add the apples and the pears.\n\n"  # two spaces: gamma 1.0 keeps them
       "Step 1: Anna has 12 apples.\nStep 2: She buys 7 pears, so she has 12 + 7 = 19 fruits.\n\n"
       "So the number of fruits is 19.")


def _ctx(tmp_path, model="smollm2-135m", stage="pruner", sets=()):
    cfg = build_config(preset="smoke", overrides={"plugins": ["tokenskip"]},
                       sets=[f"model={model}", f"out={tmp_path / 'run'}", "dtype=float32", *sets])
    state = RunState(cfg, build_registry(load_entry_points=False), RunStore(tmp_path / "run", tmp_path / "c"),
                     UI(quiet=True))
    return StageContext(run=state, stage=stage, component="tokenskip", workdir=tmp_path / "work", key="k")


# -- splitting the answer off --------------------------------------------------------------------

@pytest.mark.parametrize("text,pred,cot,tail", [
    ("We add 3 and 4.\n\nSo the answer is \\(\\boxed{7}\\).", "7", "We add 3 and 4.",
     "\n\nSo the answer is \\(\\boxed{7}\\)."),
    ("12 + 7 = 19\n#### 19\nThe answer is: 19", "19", "12 + 7 = 19", "\n#### 19\nThe answer is: 19"),
    ("Add them:\n\\[\n\\boxed{42}\n\\]", "42", "Add them:", "\n\\[\n\\boxed{42}\n\\]"),
    ("She has 5 cats.\nShe buys 2 more.\nNow she has 7 cats.", "7", "She has 5 cats.\nShe buys 2 more.",
     "\nNow she has 7 cats."),
])
def test_split_answer(text, pred, cot, tail):
    assert split_answer(text, pred) == (cot, tail)
    assert cot + tail == text


def test_split_answer_without_an_answer_line():
    assert split_answer("no number at all", "5") is None
    assert split_answer("we got 15 then", "5") is None  # 5 inside 15 is not the answer


def test_cot_filter_counts_every_skip(tmp_path):
    def s(pid, completion, correct=True, finish="eos", n=20):
        return Sample(problem_id=pid, index=0, prompt=f"P{pid}", completion=completion, n_tokens=n,
                      finish_reason=finish, pred="7", correct=correct)

    samples = [s("ok", "3 + 4 = 7.\nThe answer is \\boxed{7}."), s("wrong", "x\n\\boxed{8}", correct=False),
               s("trunc", "3 + 4 = 7 and", finish="length"), s("long", "a\n\\boxed{7}", n=501),
               s("noline", "seven it is"), s("empty", "The answer is \\boxed{7}.")]
    probs = [Problem(id=x.problem_id, question=f"question {x.problem_id}", answer="7") for x in samples]
    ctx = _ctx(tmp_path, stage="selector")
    out = CoTFilter(CoTFilter.Config(max_tokens=500)).select(samples, probs, ctx)
    assert [e.problem_id for e in out.examples] == ["ok"]
    meta = out.examples[0].meta
    assert meta["cot"] == "3 + 4 = 7." and meta["answer_tail"] == "\nThe answer is \\boxed{7}."
    assert meta["question"] == "question ok"
    assert {k: ctx.stats[k] for k in ("wrong", "truncated", "too_long", "no_answer_line", "empty_cot")} == \
        {"wrong": 1, "truncated": 1, "too_long": 1, "no_answer_line": 1, "empty_cot": 1}


# -- words, budget, rebuilding ------------------------------------------------------------------

def test_word_scores_average_the_overlapping_tokens():
    toks = [("Ste", 1.0), ("p", 3.0), (" 1", 2.0), (":", 4.0), ("\n", 9.0), ("go", 5.0), ("!", 7.0)]
    words = word_scores("Step 1:\ngo!", toks)
    assert [(w.text, w.score) for w in words] == [("Step", 2.0), ("1:", 3.0), ("go!", 6.0)]
    with pytest.raises(ValueError, match="cover"):
        word_scores("Step 1:", toks)


def test_surfaces_from_offsets_concatenate_to_the_text():
    text = "a  bc\nd"
    # trimmed offsets (whitespace left out) still give a partition of the text
    assert surfaces_from_offsets(text, [0, 3, 6]) == ["a  ", "bc\n", "d"]
    with pytest.raises(ValueError, match="concatenate"):
        check_surfaces(text, [("a", 1.0)], "s")
    with pytest.raises(ValueError, match="non-finite"):
        check_surfaces("ab", [("a", 1.0), ("b", float("nan"))], "s")


def _words(costs, scores, forced=()):
    return [Word(i, i + 1, f"w{i}", s, i in forced, c) for i, (c, s) in enumerate(zip(costs, scores, strict=True))]


def test_select_words_fills_the_budget_by_score_and_counts_forced_words():
    # total cost 10; gamma 0.5 -> 5 tokens: the forced word (cost 2) + the best words up to 5
    words = _words([2, 1, 3, 1, 2, 1], [0.0, 9.0, 5.0, 8.0, 1.0, 7.0], forced={0})
    keep, over = select_words(words, 0.5)
    assert keep == [True, True, False, True, False, True] and not over
    # every kept non-forced word scores at least as high as every dropped one
    kept = [w.score for w, k in zip(words, keep, strict=True) if k and not w.forced]
    dropped = [w.score for w, k in zip(words, keep, strict=True) if not k]
    assert min(kept) >= max(dropped)
    assert select_words(words, 1.0) == ([True] * 6, False)
    # forced words alone over the budget: all kept, nothing else, flagged
    keep, over = select_words(_words([3, 3, 1, 1], [0, 0, 9, 9], forced={0, 1}), 0.5)
    assert keep == [True, True, False, False] and over


def test_kept_token_fraction_tracks_gamma_on_random_scores():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(40, 120)
        words = _words([rng.randint(1, 4) for _ in range(n)], [rng.random() for _ in range(n)])
        total = sum(w.cost for w in words)
        for g in (0.9, 0.7, 0.5):
            keep, _ = select_words(words, g)
            frac = sum(w.cost for w, k in zip(words, keep, strict=True) if k) / total
            assert abs(frac - g) <= 4 / total + 1e-9  # within one word of the target


def test_rebuild_keeps_lines_and_paragraphs():
    text = "alpha beta\n\ngamma delta\nepsilon\n\n\n   zeta  eta"
    words = word_scores(text, [(c, 1.0) for c in text])
    keep = [w.text in {"alpha", "delta", "zeta", "eta"} for w in words]
    # 'epsilon' line gone, one blank line at most, indentation kept, spaces between words normalised
    assert rebuild(text, words, keep) == "alpha\n\ndelta\n\n   zeta eta"


def test_prune_cot_keeps_digits_and_forced_tokens():
    toks = [(c, 0.0 if c.isalpha() else 1.0) for c in COT]  # letters unimportant: only forced words survive
    out, info = prune_cot(COT, toks, 0.3, force_tokens=["Step", ":"], keep_digits=True, cost=lambda w: 1)
    for w in ("Step", "1:", "12", "7", "19", "2:", "19."):
        assert w in out.split()
    assert "apples" not in out and "\n" in out
    assert info["kept_words"] < info["words"]


def test_ratio_tag_and_gamma_draw():
    assert ratio_tag("<|eot_id|>{gamma}<|eot_id|>", 0.5) == "<|eot_id|>0.5<|eot_id|>"
    assert ratio_tag("<|eot_id|>{gamma}<|eot_id|>", 1.0) == ""
    p = TokenSkipPruner(TokenSkipPruner.Config())
    ids = [f"ex{i}" for i in range(1200)]
    draws = [p.draw(i, 0)[0] for i in ids]
    assert draws == [p.draw(i, 0)[0] for i in ids]  # seeded per id
    assert [p.draw(i, 0)[0] for i in reversed(ids)] == draws[::-1]  # independent of order
    counts = Counter(draws)
    assert set(counts) == {1.0, 0.9, 0.8, 0.7, 0.6, 0.5}
    assert all(140 <= c <= 260 for c in counts.values()), counts  # uniform: 200 expected each
    assert [p.draw(i, 1)[0] for i in ids] != draws
    three = TokenSkipPruner(TokenSkipPruner.Config(draws_per_example=3))
    assert all(len(set(three.draw(i, 0))) == 3 for i in ids[:50])


# -- config errors before any work ----------------------------------------------------------------

@pytest.mark.parametrize("sets,msg", [
    (["components.tokenskip.gammas=[0.9, 1.5]"], "components.tokenskip.gammas"),
    (["components.tokenskip.gammas=[0]"], "in (0, 1]"),
    (["components.tokenskip.scorer=nope"], "available: entropy, llmlingua2, self-information"),
    (["components.tokenskip.scorer_options={batch: 2}"], "components.tokenskip.scorer_options.batch: unknown key"),
    (["components.tokenskip.tag_format=<tag>"], "must contain {gamma}"),
])
def test_bad_config_fails_before_work(tmp_path, sets, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]").replace("{", r"\{").replace("}", r"\}")):
        cfg = build_config(preset="smoke", overrides={"plugins": ["tokenskip"]}, sets=sets)
        resolve_plan(cfg, build_registry(load_entry_points=False))


def test_llmlingua2_without_the_package_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llmlingua" else real(name, *a))
    cfg = build_config(preset="smoke", overrides={"plugins": ["tokenskip"]},
                       sets=["components.tokenskip.scorer=llmlingua2"])
    with pytest.raises(ConfigError, match="needs the 'llmlingua' package"):
        resolve_plan(cfg, build_registry(load_entry_points=False))


def test_keep_probabilities_from_a_token_classifier(tiny_llama):
    from transformers import AutoTokenizer, LlamaForTokenClassification

    torch.manual_seed(0)
    model = LlamaForTokenClassification.from_pretrained(tiny_llama, num_labels=2).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    texts = [COT, "short one"]
    out = keep_probabilities(model, tok, texts, max_length=16)  # several windows for the long text
    for text, toks in zip(texts, out, strict=True):
        check_surfaces(text, toks, "llmlingua2")
        assert all(0.0 <= p <= 1.0 for _, p in toks)
    # windows score tokens with the classifier, not with a constant
    assert len({round(p, 6) for _, p in out[0]}) > 5


# -- scorers on a real model ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol(smollm_path):
    return HFEngine.from_pretrained(smollm_path, dtype="float32")


def _reference(engine, prompt, text):
    """Per text token: -log p and entropy from one plain full forward pass (no chunking, no batching)."""
    tok = engine.tokenizer
    p = tok(prompt, add_special_tokens=False).input_ids
    t = tok(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = engine.model(torch.tensor([p + t])).logits[0, len(p) - 1 : len(p) + len(t) - 1].double()
    lp = torch.log_softmax(logits, -1)
    return -lp[torch.arange(len(t)), torch.tensor(t)], -(lp.exp() * lp).sum(-1)


def test_self_information_and_entropy_scorers_match_a_plain_forward(smol):
    prompts = ["Question: Anna has 12 apples and buys 7 pears. How many fruits?\nAnswer: ", "Q: 2+2?\nA: "]
    texts = [COT, "2 + 2 = 4, so the answer is 4."]
    si = SelfInformationScorer(engine=smol, batch_size=2)
    ent = EntropyScorer(engine=smol)
    for scorer, which in ((si, 0), (ent, 1)):
        out = scorer.score_batch(prompts, texts)  # batched, right-padded
        for prompt, text, toks in zip(prompts, texts, out, strict=True):
            check_surfaces(text, toks, scorer.name)
            ref = _reference(smol, prompt, text)[which]
            got = torch.tensor([s for _, s in toks], dtype=torch.float64)
            assert torch.allclose(got, ref, atol=2e-3), (got - ref).abs().max()
        alone = scorer.score(prompts[1], texts[1])  # unbatched: padding does not change the scores
        assert [t for t, _ in alone] == [t for t, _ in out[1]]
        assert [v for _, v in alone] == pytest.approx([v for _, v in out[1]], abs=2e-3)


def test_pruner_hits_gamma_in_model_tokens_and_tags_the_prompt(tmp_path, smollm_path):
    ctx = _ctx(tmp_path, smollm_path)
    engine = ctx.engine
    q = "Anna has 12 apples and buys 7 pears. How many fruits does she have?"
    examples = [Example(id=f"e{i}", problem_id=f"p{i}", prompt=engine.chat_prompt(q), completion=COT + tail,
                        meta={"question": q, "cot": COT, "answer_tail": tail})
                for i, tail in enumerate(["\n\nThe answer is \\boxed{19}."] * 12)]
    pruner = TokenSkipPruner(TokenSkipPruner.Config(batch_size=4))
    out = pruner.prune(TrainingSet(examples=examples), ctx)
    by_gamma = ctx.stats["by_gamma"]
    assert set(by_gamma) == {"1", "0.9", "0.8", "0.7", "0.6", "0.5"}
    for g, st in by_gamma.items():
        assert abs(st["mean_token_ratio"] - float(g)) <= 0.06, (g, st)
    n_full = engine.count_tokens(COT)
    for e in out.examples:
        g = e.meta["gamma"]
        assert e.completion == e.meta["pruned_cot"] + "\n\nThe answer is \\boxed{19}."
        if g == 1.0:
            assert e.prompt == engine.chat_prompt(q) and e.meta["pruned_cot"] == COT
        else:
            assert e.prompt == engine.chat_prompt(q, suffix=f"<|eot_id|>{g:g}<|eot_id|>")
            assert engine.count_tokens(e.meta["pruned_cot"]) < n_full
            assert "19" in e.meta["pruned_cot"] and "Step" in e.meta["pruned_cot"]
    # the scores are journaled: a second run reuses them (resume) and gives the same output
    again = TokenSkipPruner(TokenSkipPruner.Config(batch_size=4)).prune(TrainingSet(examples=examples), ctx)
    assert [e.completion for e in again.examples] == [e.completion for e in out.examples]
    assert ctx.stats["resumed_chunks"] == 3
    two = TokenSkipPruner(TokenSkipPruner.Config(batch_size=4, draws_per_example=2)).prune(
        TrainingSet(examples=examples), ctx).examples
    assert len(two) == 24 and len({e.id for e in two}) == 24
    assert all(len({x.meta["gamma"] for x in two if x.problem_id == e.problem_id}) == 2 for e in examples)
    # tag_position response: the user turn is untouched and the model's turn starts with the tag
    resp = TokenSkipPruner(TokenSkipPruner.Config(batch_size=4, tag_position="response")).prune(
        TrainingSet(examples=examples), ctx).examples
    assert [e.completion for e in resp] == [e.completion for e in out.examples]
    for e in resp:
        tag = "" if e.meta["gamma"] == 1.0 else f"<|eot_id|>{e.meta['gamma']:g}<|eot_id|>"
        assert e.prompt == engine.chat_prompt(q) + tag and e.meta["tag_position"] == "response"


def test_trainer_evaluates_each_gamma_with_the_tag_where_it_trained(tmp_path):
    import json

    ctx = _ctx(tmp_path, stage="trainer")
    ctx.workdir.mkdir(parents=True)
    (ctx.workdir / "ratio_tags.json").write_text(json.dumps({"1": "", "0.5": "<r0.5>"}))
    sft = TokenSkipSFT(TokenSkipSFT.Config())
    before = sft.eval_variants(ctx)  # an adapter trained before tag_position existed: the question
    assert [(v.name, v.prompt_suffix, v.response_prefix) for v in before] == [
        ("trained@gamma=1", "", ""), ("trained@gamma=0.5", "<r0.5>", "")]
    (ctx.workdir / "ratio_tag_position.json").write_text(json.dumps({"tag_position": "response"}))
    after = sft.eval_variants(ctx)
    assert [(v.prompt_suffix, v.response_prefix) for v in after] == [("", ""), ("", "<r0.5>")]


def test_eval_gammas_picks_the_evaluated_ratios_without_changing_the_training_key(tmp_path):
    ctx = _ctx(tmp_path, stage="trainer")
    ctx.workdir.mkdir(parents=True)
    (ctx.workdir / "ratio_tags.json").write_text(json.dumps({"1": "", "0.9": "<r0.9>", "0.7": "<r0.7>",
                                                             "0.5": "<r0.5>"}))
    every = TokenSkipSFT(TokenSkipSFT.Config())
    assert [v.params["gamma"] for v in every.eval_variants(ctx)] == [1.0, 0.9, 0.7, 0.5]
    some = TokenSkipSFT(TokenSkipSFT.Config(eval_gammas=[0.5, 0.7]))
    assert [v.params["gamma"] for v in some.eval_variants(ctx)] == [1.0, 0.7, 0.5]  # 1.0: the ratio's reference
    with pytest.raises(TrainingError, match=r"\[0\.6\] were not trained.*0\.9"):
        TokenSkipSFT(TokenSkipSFT.Config(eval_gammas=[0.6])).eval_variants(ctx)
    with pytest.raises(ValidationError, match="eval_gammas"):
        TokenSkipSFT.Config(eval_gammas=[1.5])
    # evaluation-only: the trained stage is reused, while a training setting changes the key
    assert some.config.key_dump() == every.config.key_dump()
    assert "eval_gammas" in some.config.model_dump()
    assert TokenSkipSFT.Config(lr=1e-3).key_dump() != every.config.key_dump()


def test_third_party_scorer_drives_the_pruner(tmp_path, smollm_path):
    class LengthScorer(TokenScorer):
        name = "length"

        def score_batch(self, prompts, texts):
            return [[(w, float(len(w.strip()))) for w in _split_keep(t)] for t in texts]

    reg = build_registry(load_entry_points=False)
    reg.scorers["length"] = (LengthScorer, "mine")
    ctx = _ctx(tmp_path, smollm_path)
    ctx.run.registry = reg
    ex = Example(id="e", problem_id="p", prompt="P", completion=COT, meta={"question": "q", "cot": COT,
                                                                            "answer_tail": ""})
    pruner = TokenSkipPruner(TokenSkipPruner.Config(scorer="length", gammas=[0.5], include_full=False,
                                                    force_tokens=[], keep_digits=False))
    pruner.check(reg)
    out = pruner.prune(TrainingSet(examples=[ex]), ctx).examples[0].meta["pruned_cot"]
    # long words are the important ones under this scorer
    assert "apples" in out and "fruits" in out and "we" not in out.split()


def _split_keep(text):
    import re

    return [m.group(0) for m in re.finditer(r"\s*\S+|\s+", text)]


def test_trainer_requires_ratio_tagged_examples(tmp_path, tiny_llama):
    ctx = _ctx(tmp_path, tiny_llama, "trainer")
    data = TrainingSet(examples=[Example(id="e", problem_id="p", prompt="P", completion="c")])
    with pytest.raises(TrainingError, match="ratio tag"):
        TokenSkipSFT(TokenSkipSFT.Config()).train(data, ctx)


def test_controllability_rows():
    from thinkpress.api import EvalVariant, TestSetResult, VariantResult

    rows = [{"name": "base", "mean_tokens": 200.0, "accuracy": 0.5},
            {"name": "trained@gamma=1", "mean_tokens": 100.0, "accuracy": 0.6},
            {"name": "trained@gamma=0.5", "mean_tokens": 62.0, "accuracy": 0.55}]
    params = [{}, {"gamma": 1.0}, {"gamma": 0.5}]
    result = TestSetResult(test_set=None, variants=[VariantResult(EvalVariant(r["name"], p), r)
                                                   for r, p in zip(rows, params, strict=True)])
    ctrl = controllability(result)
    assert [r["name"] for r in ctrl] == ["trained@gamma=1", "trained@gamma=0.5"]
    assert rows[2]["actual_ratio"] == pytest.approx(0.62) and rows[2]["adherence_error"] == pytest.approx(0.12)
    assert rows[2]["accuracy_vs_full"] == pytest.approx(-0.05) and "actual_ratio" not in rows[0]
    assert "actual_ratio_ci" not in rows[2]  # no per-problem tokens, no interval
    # with per-problem tokens: a paired interval around the ratio; every problem at exactly half: [0.5, 0.5]
    half = {"trained@gamma=1": [100.0, 80.0, 120.0, 100.0], "trained@gamma=0.5": [50.0, 40.0, 60.0, 50.0]}
    controllability(result, half)
    assert rows[2]["actual_ratio_ci"] == pytest.approx([0.5, 0.5])
    spread = {"trained@gamma=1": [100.0, 80.0, 120.0, 100.0], "trained@gamma=0.5": [30.0, 70.0, 60.0, 90.0]}
    controllability(result, spread)
    lo, hi = rows[2]["actual_ratio_ci"]
    assert lo < 250 / 400 < hi and hi - lo > 0.1


def test_tokens_per_problem_aligns_variants_by_problem_id(tmp_path):
    from thinkpress.api import write_jsonl
    from thinkpress.plugins.tokenskip.train import tokens_per_problem

    def write(name, rows):
        write_jsonl(tmp_path / name / "predictions.jsonl", [{"problem_id": p, "n_tokens": n} for p, n in rows])

    write("a", [("p2", 5), ("p1", 7)])
    write("b", [("p1", 3), ("p2", 1)])
    assert tokens_per_problem(tmp_path, ["a", "b"]) == {"a": [7.0, 5.0], "b": [3.0, 1.0]}
    assert tokens_per_problem(tmp_path, ["a", "missing"]) is None
    write("c", [("p9", 3), ("p2", 1)])
    assert tokens_per_problem(tmp_path, ["a", "c"]) is None


# -- the whole method ------------------------------------------------------------------------------

@pytest.mark.slow
def test_tokenskip_smoke_run_end_to_end(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--plugins", "tokenskip", "--preset", "smoke", "--out", str(out), "--quiet",
            "--set", "test_data.limit=8", "--set", "components.tokenskip.gammas=[0.8, 0.5]",
            "--set", "components.tokenskip-sft.epochs=1",
            # every kept CoT at all three ratios: the pruner's per-gamma stats below then hold each gamma whenever
            # SmolLM2 gets at least one answer right, not only when the seeded draws happen to cover all three
            "--set", "components.tokenskip.draws_per_example=3",
            # one sampling batch and shorter evaluation answers: CI time is in decode steps (~0.2 s each here)
            "--set", "components.greedy-sampler.batch_size=96", "--set", "eval.generation.max_new_tokens=64"]
    r = run_cli(args, env=cli_env(), timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["plan"]["pruners"] == ["tokenskip"] and rep["plan"]["trainer"] == "tokenskip-sft"
    rows = {v["name"]: v for v in rep["variants"]}
    assert set(rows) == {"base", "trained@gamma=1", "trained@gamma=0.8", "trained@gamma=0.5"}
    assert rows["trained@gamma=0.5"]["params"]["gamma"] == 0.5
    full = rows["trained@gamma=1"]["mean_tokens"]
    assert rows["trained@gamma=0.5"]["actual_ratio"] == pytest.approx(rows["trained@gamma=0.5"]["mean_tokens"] / full)
    assert (out / "ratio.png").exists() and "Controllability" in (out / "report.md").read_text()
    stats = next(v for k, v in rep["stages"].items() if "pruner" in k)["stats"]
    assert stats["examples"] >= 1 and set(stats["by_gamma"]) == {"1", "0.8", "0.5"}
    # a second run with the same config reuses every stage
    r = run_cli(args + ["--overwrite"], env=cli_env(), timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    rep2 = json.loads((out / "report.json").read_text())
    assert all(s["cached"] for s in rep2["stages"].values())
