"""The hf engine's manual decode loop against transformers' own generate() and forward passes."""

import pytest
import torch

from thinkpress.core.engines.base import GenParams, KVPolicy
from thinkpress.core.engines.hf import HFEngine

QUESTIONS = ["Tom has 3 apples and buys 5 more. How many apples does he have?", "What is 7 times 8?",
             "A box holds 12 pens. How many pens are in 4 boxes? Answer briefly."]


def _engine(path):
    return HFEngine.from_pretrained(path, dtype="float32", system_prompt="Answer.")


def _reference(engine, prompts, max_new_tokens):
    tok = engine.tokenizer
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = engine.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=engine.pad_id)
    ref = []
    for r in range(len(prompts)):
        ids = out[r, enc.input_ids.shape[1]:].tolist()
        cut = next((i for i, x in enumerate(ids) if x in engine.eos_ids), len(ids))
        ref.append(ids[:cut])
    return ref


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_qwen2", "smollm_path"])
def test_greedy_loop_equals_generate_token_for_token(model_fixture, request):
    engine = _engine(request.getfixturevalue(model_fixture))
    prompts = [engine.chat_prompt(q) for q in QUESTIONS]  # different lengths: left padding matters
    n = 24
    ours = engine.generate(prompts, GenParams(max_new_tokens=n), batch_size=3)
    ref = _reference(engine, prompts, n)
    for r in range(3):
        assert ours[r][0].token_ids == ref[r]
        assert ours[r][0].finish_reason == ("length" if len(ref[r]) == n else "eos")


def test_teacher_forced_scores_match_decode_logprobs(tiny_llama):
    engine = _engine(tiny_llama)
    prompts = [engine.chat_prompt(q) for q in QUESTIONS]
    outs = engine.generate(prompts, GenParams(max_new_tokens=12), logprobs=True, batch_size=3)
    # score() tokenizes text, and a random model's output need not survive decode + encode: give score() the
    # decoded token ids of each output, so that every row of the (right-padded) batch is compared
    texts = [f"<output {r}>" for r in range(len(prompts))]
    ids = {t: o[0].token_ids for t, o in zip(texts, outs, strict=True)}
    encode = engine._encode
    engine._encode = lambda text: ids[text] if text in ids else encode(text)
    try:
        scored = engine.score(prompts, texts, batch_size=3)
    finally:
        engine._encode = encode
    assert all(o[0].token_ids for o in outs)
    for r in range(len(prompts)):
        assert scored[r] == pytest.approx(outs[r][0].logprobs, abs=1e-4)
    full = engine.score(prompts[:2], ["The answer is 8.", "56"])
    assert [len(x) for x in full] == [engine.count_tokens("The answer is 8."), engine.count_tokens("56")]


def test_iter_logits_chunks_equal_one_forward_pass(tiny_qwen2):
    engine = _engine(tiny_qwen2)
    prompt, cont = engine.chat_prompt(QUESTIONS[0]), "First add 3 and 5 to get 8 apples in total."
    chunks = list(engine.iter_logits(prompt, cont, chunk_size=4))
    logits = torch.cat([c[0] for c in chunks])
    ids = torch.tensor([engine._encode(prompt) + engine._encode(cont)])
    with torch.no_grad():
        ref = engine.model(ids).logits[0, len(engine._encode(prompt)) - 1 : -1]
    assert len(chunks) == -(-len(engine._encode(cont)) // 4)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


def test_sampling_is_seeded_per_prompt_independent_of_batching(tiny_llama):
    engine = _engine(tiny_llama)
    prompts = [engine.chat_prompt(q) for q in QUESTIONS]
    params = GenParams(max_new_tokens=10, temperature=1.0, top_p=0.9)
    seeds = [11, 22, 33]
    together = engine.generate(prompts, params, n=2, seeds=seeds, batch_size=6)
    for r, (p, seed) in enumerate(zip(prompts, seeds, strict=True)):  # every prompt, not one
        alone = engine.generate([p], params, n=2, seeds=[seed], batch_size=2)[0]
        assert [c.token_ids for c in together[r]] == [c.token_ids for c in alone]
        assert together[r][0].token_ids != together[r][1].token_ids  # the n samples differ
        other = engine.generate([p], params, n=2, seeds=[seed + 1], batch_size=2)[0]
        assert [c.token_ids for c in other] != [c.token_ids for c in alone]


def test_stop_strings_length_limit_and_policy_hook(tiny_llama):
    engine = _engine(tiny_llama)
    prompt = engine.chat_prompt(QUESTIONS[0])
    free = engine.generate([prompt], GenParams(max_new_tokens=16))[0][0]
    assert free.finish_reason == "length" and free.n_tokens == 16
    word = free.text.split()[3] if len(free.text.split()) > 3 else free.text[-3:]
    stopped = engine.generate([prompt], GenParams(max_new_tokens=16, stop=[word]))[0][0]
    assert stopped.finish_reason == "stop" and word not in stopped.text
    assert free.text.startswith(stopped.text)

    class Counting(KVPolicy):
        def __init__(self):
            self.begun, self.steps, self.cache_lens = 0, [], []

        def begin(self, cache, mask, prompt_lengths):
            self.begun += 1
            return mask

        def after_step(self, cache, mask, step):
            self.steps.append(step)
            self.cache_lens.append(cache.layers[0].keys.shape[2])
            assert mask.shape[1] == cache.layers[0].keys.shape[2]
            return mask

    pol = Counting()
    engine.generate([prompt], GenParams(max_new_tokens=5), kv_policy=pol)
    assert pol.begun == 1 and pol.steps == [1, 2, 3, 4]
    assert pol.cache_lens == sorted(pol.cache_lens) and engine.stats.peak_kv_bytes > 0


class _DropHalfAtBegin(KVPolicy):
    """Test double: physically drops the older half of the prefill cache in begin, then keeps everything."""

    def begin(self, cache, mask, prompt_lengths):
        cut = mask.shape[1] // 2
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]
        return mask[:, cut:]


def test_peak_kv_counts_the_prefill_cache_before_a_policy_prunes_it(tiny_llama):
    engine = _engine(tiny_llama)
    prompts = [engine.chat_prompt(q) for q in QUESTIONS[:2]]
    lens = [len(engine._encode(p)) for p in prompts]
    assert lens[0] != lens[1]  # left padding: the prefill cache is max(lens) long
    cfg = engine.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = cfg.num_hidden_layers * 2 * 2 * cfg.num_key_value_heads * head_dim * 4  # layers x K,V x batch x fp32
    prefill = per_token * max(lens)
    engine.stats.reset()
    out = engine.generate(prompts, GenParams(max_new_tokens=3, ignore_eos=True), kv_policy=_DropHalfAtBegin(),
                          batch_size=2)
    assert [o[0].n_tokens for o in out] == [3, 3]
    # after begin the cache is never longer than half the prompt + 3 tokens: only the prefill reaches this size
    assert max(lens) - max(lens) // 2 + 3 < max(lens)
    assert engine.stats.peak_kv_bytes == prefill
    engine.stats.reset()
    engine.generate(prompts, GenParams(max_new_tokens=3, ignore_eos=True), batch_size=2)
    assert engine.stats.peak_kv_bytes == per_token * (max(lens) + 2)  # the full cache peaks at the last forward
