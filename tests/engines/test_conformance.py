"""One contract, every engine: what the core and the methods rely on, checked on each implementation.

``fake`` (a weightless toy LM), ``hf`` (a 2-layer random llama with SmolLM2's tokenizer, fp32) and
``vllm`` (SmolLM2-135M, fp32; after all other tests) run here; a new engine adds itself to the
``engine`` fixture. Capability-specific checks run only where the engine
declares the capability, and the others must refuse with a clear ``ModelError``.
"""

import pytest

from thinkpress.core.engines.base import Capability, GenParams, KVPolicy
from thinkpress.core.engines.fake import FakeEngine
from thinkpress.core.engines.hf import HFEngine
from thinkpress.core.errors import ModelError

QUESTIONS = ["Tom has 3 apples and buys 5 more. How many apples does he have?", "What is 7 times 8?",
             "A box holds 12 pens. How many pens are in 4 boxes?"]


@pytest.fixture(params=["fake", "hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def engine(request):
    if request.param == "fake":
        return FakeEngine(system_prompt="Answer.")
    if request.param == "vllm":  # SmolLM2-135M in fp32 (vLLM's CPU attention needs real head sizes)
        return request.getfixturevalue("vllm_engine")
    return HFEngine.from_pretrained(request.getfixturevalue("tiny_llama"), dtype="float32", system_prompt="Answer.")


class _Evicting(KVPolicy):
    name = "evicting"

    def begin(self, cache, mask, prompt_lengths):
        return mask


def test_prompts_hold_the_question_and_the_suffix(engine):
    p = engine.chat_prompt(QUESTIONS[1], suffix=" [0.5]")
    assert QUESTIONS[1] + " [0.5]" in p and engine.count_tokens("seven times eight") > 0


def test_generate_shape_limits_and_stats(engine):
    prompts = [engine.chat_prompt(q) for q in QUESTIONS]
    engine.stats.reset()
    out = engine.generate(prompts, GenParams(max_new_tokens=12, temperature=0.8), n=2, seeds=[1, 2, 3],
                          batch_size=4, logprobs=True)
    assert [len(r) for r in out] == [2, 2, 2]
    for row in out:
        for c in row:
            assert c.finish_reason in ("eos", "stop", "length") and c.n_tokens <= 12
            assert c.n_tokens == 12 if c.finish_reason == "length" else True
            assert len(c.logprobs) == c.n_tokens and all(lp <= 0 for lp in c.logprobs)
    assert engine.stats.new_tokens == sum(c.n_tokens for row in out for c in row)
    assert engine.stats.sequences == 6


def test_greedy_is_deterministic_and_independent_of_batching(engine):
    prompts = [engine.chat_prompt(q) for q in QUESTIONS]
    params = GenParams(max_new_tokens=10)
    together = engine.generate(prompts, params, batch_size=3)
    again = engine.generate(prompts, params, batch_size=3)
    alone = [engine.generate([p], params, batch_size=1)[0] for p in prompts]
    assert [r[0].token_ids for r in together] == [r[0].token_ids for r in again] == [r[0].token_ids for r in alone]


def test_sampling_is_seeded_per_prompt(engine):
    prompts = [engine.chat_prompt(q) for q in QUESTIONS[:2]]
    params = GenParams(max_new_tokens=10, temperature=1.0)
    a = engine.generate(prompts, params, n=2, seeds=[5, 6])
    b = engine.generate(prompts[::-1], params, n=2, seeds=[6, 5], batch_size=1)[::-1]
    assert [[c.token_ids for c in r] for r in a] == [[c.token_ids for c in r] for r in b]
    c = engine.generate(prompts, params, n=2, seeds=[7, 8])
    assert [[x.token_ids for x in r] for r in a] != [[x.token_ids for x in r] for r in c]


def test_stop_strings_cut_the_text_before_them(engine):
    prompt = engine.chat_prompt(QUESTIONS[0])
    free = engine.generate([prompt], GenParams(max_new_tokens=16, ignore_eos=True))[0][0]
    words = free.text.split()
    assert len(words) >= 4
    stopped = engine.generate([prompt], GenParams(max_new_tokens=16, stop=[words[3]], ignore_eos=True))[0][0]
    assert stopped.finish_reason == "stop" and words[3] not in stopped.text and free.text.startswith(stopped.text)


def test_scoring_agrees_with_itself_or_is_refused(engine):
    prompt, cont = engine.chat_prompt(QUESTIONS[1]), " So the answer is 56."
    if not engine.supports(Capability.SCORING):
        with pytest.raises(ModelError, match="scoring"):
            engine.score([prompt], [cont])
        return
    n = engine.count_tokens(cont)
    (lp,) = engine.score([prompt], [cont])
    (ts,) = engine.token_scores([prompt], [cont])
    offsets = engine.token_offsets(cont)
    assert len(lp) == len(ts.surprisal) == len(offsets) == n and offsets == sorted(offsets)
    assert lp == pytest.approx((-ts.surprisal).tolist(), abs=1e-5) and all(x <= 0 for x in lp)
    chunks = list(engine.context_logits([prompt, engine.chat_prompt(QUESTIONS[0])], cont, chunk_size=2))
    assert sum(len(t) for _, t in chunks) == n and chunks[0][0].shape[0] == 2


def test_greedy_logprobs_equal_teacher_forcing_of_the_same_tokens(engine):
    if not engine.supports(Capability.SCORING):
        pytest.skip("no scoring capability: covered by test_scoring_agrees_with_itself_or_is_refused")
    prompt = engine.chat_prompt(QUESTIONS[2])
    out = engine.generate([prompt], GenParams(max_new_tokens=8, ignore_eos=True), logprobs=True)[0][0]
    ids = out.token_ids
    encode = getattr(engine, "_encode", None)
    if encode is not None:  # hf: score the generated ids themselves (text need not survive decode + encode)
        engine._encode = lambda text: ids if text == out.text else encode(text)
    try:
        (lp,) = engine.score([prompt], [out.text])
    finally:
        if encode is not None:
            engine._encode = encode
    assert lp == pytest.approx(out.logprobs, abs=1e-4)


def test_capabilities_not_declared_are_refused(engine):
    prompt = engine.chat_prompt(QUESTIONS[0])
    if not engine.supports(Capability.KV_POLICY):
        with pytest.raises(ModelError):
            engine.generate([prompt], GenParams(max_new_tokens=4), kv_policy=_Evicting())
    else:
        assert engine.generate([prompt], GenParams(max_new_tokens=4), kv_policy=_Evicting())[0][0].n_tokens > 0
    if not engine.supports(Capability.FORCED_DECODE):
        with pytest.raises(ModelError, match="forced_decode"):
            engine.forced_decode([prompt], [[1, 2]])
    if not engine.supports(Capability.ADAPTERS):
        with pytest.raises(ModelError, match="adapters"):
            engine.with_adapter("/nowhere")
