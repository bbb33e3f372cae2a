"""max_length never cuts in silence: the trainers count what it would cut and refuse more than 5%."""

from __future__ import annotations

import logging

import pytest
from transformers import AutoTokenizer

from thinkpress.core.config import build_config
from thinkpress.core.context import UI, RunState, StageContext
from thinkpress.core.data import Example, PreferencePair, TrainingSet
from thinkpress.core.errors import ConfigError
from thinkpress.core.plugins import build_registry
from thinkpress.core.store import RunStore
from thinkpress.plugins.baseline.sft import LoraSFT
from thinkpress.plugins.tokenskip.train import TokenSkipSFT
from thinkpress.plugins.tokensqueeze.dpo import DPOLTrainer
from thinkpress.toolkit import lora as sft_mod
from thinkpress.toolkit.lora import check_truncation, count_truncated, encode_example

PROMPT = "Question: what is 2 plus 3?\nAnswer:"
SHORT = " 5."
LONG = " Let us think step by step about this sum" * 12  # ~100 tokens: cut at max_length=48
MAX_LENGTH = 48


def _ctx(tmp_path, model):
    cfg = build_config(preset="smoke", sets=[f"model={model}", f"out={tmp_path / 'run'}", "dtype=float32"])
    state = RunState(cfg, build_registry(load_entry_points=False), RunStore(tmp_path / "run", tmp_path / "c"),
                     UI(quiet=True))
    return StageContext(run=state, stage="trainer", component="x", workdir=tmp_path / "work", key="k")


def _examples(n, n_long):
    tags = {"1": "", "0.5": "<|eot_id|>0.5<|eot_id|>"}  # what the tokenskip pruner attaches
    return [Example(id=str(i), problem_id=str(i), prompt=PROMPT, completion=LONG if i < n_long else SHORT,
                    meta={"gamma": 1.0, "ratio_tags": tags}) for i in range(n)]


def _pairs(n, n_long):
    # the rejected answer is the long one; a pair counts once however many of its answers are cut
    return [PreferencePair(id=str(i), problem_id=str(i), prompt=PROMPT, chosen=LONG if i == 0 and n_long else SHORT,
                           rejected=LONG if i < n_long else SHORT + " Or 6.") for i in range(n)]


TRAINERS = {  # trainer class, its data, the stats' unit
    "lora-sft": (LoraSFT, lambda n, k: TrainingSet(examples=_examples(n, k)), "examples"),
    "tokenskip-sft": (TokenSkipSFT, lambda n, k: TrainingSet(examples=_examples(n, k)), "examples"),
    "dpo-l": (DPOLTrainer, lambda n, k: TrainingSet(pairs=_pairs(n, k)), "pairs"),
}


class ReachedTraining(Exception):
    pass


@pytest.fixture
def no_model(monkeypatch):
    """Stand-in for the model load: the check has passed once a trainer gets here."""
    calls = []

    def load_trainable(ctx, cfg):
        calls.append(cfg.max_length)
        raise ReachedTraining

    monkeypatch.setattr(sft_mod, "load_trainable", load_trainable)
    return calls


# -- counting ------------------------------------------------------------------------------------

def test_count_agrees_with_encode_example_at_the_boundary(smollm_path):
    tok = AutoTokenizer.from_pretrained(smollm_path)
    ids, _ = encode_example(tok, PROMPT, LONG, 10_000)
    n = len(ids)  # prompt + completion + EOS
    ex = _examples(1, 1)
    at = count_truncated(tok, ex, n)
    assert (at.total, at.cut, at.longest, at.unit) == (1, 0, n, "examples")
    assert len(encode_example(tok, PROMPT, LONG, n)[0]) == n  # nothing cut at exactly n
    assert count_truncated(tok, ex, n - 1).cut == 1 and len(encode_example(tok, PROMPT, LONG, n - 1)[0]) == n - 1
    assert count_truncated(tok, [], 8).total == 0


def test_a_pair_counts_once_whichever_answer_is_cut(smollm_path):
    tok = AutoTokenizer.from_pretrained(smollm_path)
    pairs = _pairs(4, 2)  # pair 0: both answers long; pair 1: the rejected one
    t = count_truncated(tok, pairs, MAX_LENGTH)
    assert (t.unit, t.total, t.cut) == ("pairs", 4, 2)
    assert t.longest == len(encode_example(tok, PROMPT, LONG, 10_000)[0])


@pytest.mark.parametrize(("n", "n_long", "refused"), [(40, 1, False), (20, 1, False), (19, 1, True), (10, 5, True)])
def test_more_than_five_percent_is_refused(smollm_path, n, n_long, refused):
    tok = AutoTokenizer.from_pretrained(smollm_path)
    cfg = DPOLTrainer.Config(max_length=MAX_LENGTH)
    if refused:
        with pytest.raises(ConfigError, match=rf"^components\.dpo-l\.max_length={MAX_LENGTH} would cut {n_long} of "
                                              rf"{n} pairs \(\d+(\.\d+)?%.*raise it \(the longest .* is \d+ tokens\)"):
            check_truncation(tok, _pairs(n, n_long), cfg, component="dpo-l")
    else:  # 1 of 20 is exactly 5%: allowed
        t = check_truncation(tok, _pairs(n, n_long), cfg, component="dpo-l")
        assert (t.cut, t.total) == (n_long, n)


# -- each trainer runs the check before loading its model -------------------------------------------

@pytest.mark.parametrize("name", list(TRAINERS))
def test_trainer_records_a_small_cut_and_goes_on(tmp_path, smollm_path, no_model, caplog, name):
    cls, data, unit = TRAINERS[name]
    ctx = _ctx(tmp_path, smollm_path)
    with caplog.at_level(logging.INFO, logger="thinkpress"), pytest.raises(ReachedTraining):
        cls(cls.Config(max_length=MAX_LENGTH)).train(data(40, 2), ctx)
    assert no_model == [MAX_LENGTH]
    assert ctx.stats[unit] == 40 and ctx.stats[f"truncated_{unit}"] == 2
    assert f"max_length={MAX_LENGTH} cuts 2 of 40 {unit} (5%, within the 5% allowed)" in caplog.text


@pytest.mark.parametrize("name", list(TRAINERS))
def test_trainer_refuses_a_large_cut_before_loading_the_model(tmp_path, smollm_path, no_model, name):
    cls, data, unit = TRAINERS[name]
    ctx = _ctx(tmp_path, smollm_path)
    with pytest.raises(ConfigError, match=rf"components\.{name}\.max_length={MAX_LENGTH} would cut 3 of 20 {unit} "
                                          r"\(15%"):
        cls(cls.Config(max_length=MAX_LENGTH)).train(data(20, 3), ctx)
    assert no_model == []
    assert ctx.stats[unit] == 20 and ctx.stats[f"truncated_{unit}"] == 3


def test_no_cut_is_said_too(tmp_path, smollm_path, no_model, caplog):
    ctx = _ctx(tmp_path, smollm_path)
    with caplog.at_level(logging.INFO, logger="thinkpress"), pytest.raises(ReachedTraining):
        LoraSFT(LoraSFT.Config(max_length=512)).train(TrainingSet(examples=_examples(4, 1)), ctx)
    assert ctx.stats["truncated_examples"] == 0 and "max_length=512 cuts none of the 4 examples" in caplog.text


# -- through a real trainer, nothing stubbed -----------------------------------------------------------

def test_real_dpo_l_on_the_smoke_model_refuses_before_any_step(tmp_path, smollm_path):
    ctx = _ctx(tmp_path, smollm_path)
    cfg = DPOLTrainer.Config(max_length=MAX_LENGTH)
    with pytest.raises(ConfigError, match=rf"components\.dpo-l\.max_length={MAX_LENGTH} would cut 2 of 20 pairs"):
        DPOLTrainer(cfg).train(TrainingSet(pairs=_pairs(20, 2)), ctx)
    assert ctx.stats == {"pairs": 20, "truncated_pairs": 2}
    assert not (tmp_path / "work").exists()  # no adapter, not even the step-0 checkpoint: nothing was trained


def test_real_dpo_l_trains_at_exactly_five_percent(tmp_path, tiny_llama):
    # the tiny random llama (SmolLM2's tokenizer): the same counts, a training step in a second
    ctx = _ctx(tmp_path, tiny_llama)
    cfg = DPOLTrainer.Config(max_length=MAX_LENGTH, epochs=0.05, batch_size=1, grad_accum=1, autocast_bf16=False)
    res = DPOLTrainer(cfg).train(TrainingSet(pairs=_pairs(20, 1)), ctx)
    assert res.metrics["steps"] == 1 and (tmp_path / "work" / "adapter" / "adapter_config.json").exists()
    assert ctx.stats["pairs"] == 20 and ctx.stats["truncated_pairs"] == 1
