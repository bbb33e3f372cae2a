"""The ``hf`` engine: transformers with a manual decode loop over a ``DynamicCache``.

Why a manual loop: ``generate()`` cannot change the cache between steps, and KV pruners must
physically remove entries mid-generation. The loop

* left-pads the batch and passes explicit ``position_ids`` (a row's logical RoPE position is its
  count of real tokens so far, independent of padding and of the cache's physical length, so
  positions survive eviction);
* keeps a 2-D attention mask ``[batch, cache_len]`` that a KV policy prunes with the same indices
  as the cache;
* samples each row with its own ``torch.Generator`` seeded by the caller (a problem's samples do
  not depend on which other problems share its batch);
* drops finished rows from the batch (cache, mask, positions) so long stragglers do not make the
  whole batch pay;
* counts, per sequence, the cache entries it holds while decoding (its mask row, from the cache the
  policy leaves after the prefill) against those its full cache would hold (prompt + tokens fed so
  far): ``kv_kept_peak`` (most held at once / the full cache at the end) and ``kv_kept_mean``
  (step-averaged) on each completion. This is the share a policy keeps, the quantity KV-compression
  papers budget; ``peak_kv_bytes`` is the physical cache tensor, which also holds the whole prompt
  for the prefill, the batch's left padding and the holes a policy leaves in one row while another
  row is longer;
* stops a row at EOS (every id of the generation config), at a stop string (the text is cut before
  it), or at ``max_new_tokens`` (``finish_reason="length"``: truncated).

Greedy output equals ``model.generate()`` token for token (tested).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from thinkpress.core.engines.base import Capability, Completion, Engine, GenParams, GenStats, KVPolicy, ProgressFn
from thinkpress.core.engines.tokenizer import ChatTokenizer, eos_ids
from thinkpress.core.errors import ModelError
from thinkpress.core.models import load_causal_lm
from thinkpress.kernels import TokenScores, token_scores


def kv_cache_bytes(cache: Any) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _select_rows(cache: Any, idx: torch.Tensor) -> None:
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys.index_select(0, idx)
            layer.values = layer.values.index_select(0, idx)


class HFEngine(ChatTokenizer, Engine):
    name = "hf"
    capabilities = frozenset(Capability)

    def __init__(self, model, tokenizer, *, model_path: str | None = None, system_prompt: str | None = None,
                 dtype: str = "bfloat16", device: str = "auto", trust_remote_code: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.system_prompt = system_prompt
        self.dtype = dtype
        self.device_name = device
        self.trust_remote_code = trust_remote_code
        self.device = next(model.parameters()).device
        self.stats = GenStats()
        self.eos_ids = eos_ids(tokenizer, model.generation_config)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    @classmethod
    def from_pretrained(cls, path: str, **kw) -> HFEngine:
        model, tok = load_causal_lm(
            path, dtype=kw.get("dtype", "bfloat16"), device=kw.get("device", "auto"),
            trust_remote_code=kw.get("trust_remote_code", False),
        )
        return cls(model, tok, model_path=path, **kw)

    # -- generation ----------------------------------------------------------------------------
    def generate(self, prompts, params: GenParams, *, n=1, seeds=None, kv_policy=None, batch_size=8,
                 progress: ProgressFn | None = None, logprobs=False) -> list[list[Completion]]:
        rows = [(i, j) for i in range(len(prompts)) for j in range(n)]
        results: list[list[Completion | None]] = [[None] * n for _ in prompts]
        for s in range(0, len(rows), batch_size):
            batch = rows[s : s + batch_size]
            gens = None
            if not params.greedy:
                gens = []
                for i, j in batch:
                    g = torch.Generator(device="cpu")
                    g.manual_seed(((seeds[i] if seeds else 0) * 1_000_003 + j) % (2**63 - 1))
                    gens.append(g)
            outs = self._decode([prompts[i] for i, _ in batch], params, gens, kv_policy or KVPolicy(), logprobs)
            for (i, j), c in zip(batch, outs, strict=True):
                results[i][j] = c
            if progress:
                progress(len(batch))
        return results  # type: ignore[return-value]

    def forced_decode(self, prompts, token_ids, *, kv_policy=None, batch_size=8) -> list[list[float]]:
        out: list[list[float]] = [[] for _ in prompts]
        todo = [i for i, t in enumerate(token_ids) if t]
        for s in range(0, len(todo), batch_size):
            rows = todo[s : s + batch_size]
            force = [token_ids[i] for i in rows]
            params = GenParams(max_new_tokens=max(len(f) for f in force), ignore_eos=True)
            res = self._decode([prompts[i] for i in rows], params, None, kv_policy or KVPolicy(), True, force=force)
            for i, c in zip(rows, res, strict=True):
                out[i] = c.logprobs or []
        return out

    def _decode(self, prompts: list[str], params: GenParams, gens, policy: KVPolicy, want_logprobs: bool,
                force: list[list[int]] | None = None):
        # peft injects LoRA layers in place, so the unwrapped transformers model runs the adapter too
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        with torch.inference_mode(), policy.session(inner):
            return self._decode_loop(prompts, params, gens, policy, want_logprobs, force)

    def _decode_loop(self, prompts, params, gens, policy, want_logprobs, force):
        from transformers import DynamicCache

        enc = [self._encode(p) for p in prompts]
        self.stats.prompt_tokens += sum(len(e) for e in enc)
        B = len(enc)
        L = max(len(e) for e in enc)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for r, e in enumerate(enc):
            input_ids[r, L - len(e):] = torch.tensor(e)
            mask[r, L - len(e):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        t0 = time.perf_counter()
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        peak = kv_cache_bytes(cache)  # the prefill's full cache, before any policy prunes it
        kept = int(mask.sum())
        mask = policy.begin(cache, mask, [len(e) for e in enc])
        evicted = kept - int(mask.sum())
        # per original row, from the cache the policy left after the prefill: the most entries held at once while
        # decoding, and the sums over steps of entries held and of those the full cache would hold
        plen = [len(e) for e in enc]
        held_max = mask.sum(-1).tolist()
        held_sum, full_sum = list(held_max), list(plen)
        logits = out.logits[:, -1, :]
        next_pos = pos[:, -1] + 1
        t1 = time.perf_counter()
        self.stats.prefill_s += t1 - t0

        active = list(range(B))  # original row index of each live batch row
        tokens: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        finish: list[str | None] = [None] * B
        eos = torch.tensor(self.eos_ids, device=self.device)
        max_stop = max((len(s) for s in params.stop), default=0)
        step = 0
        while True:
            if force is not None:
                nxt = torch.tensor([force[r][len(tokens[r])] for r in active], device=self.device)
            else:
                nxt = self._pick(logits, params, [gens[r] for r in active] if gens else None)
            if want_logprobs:
                lp = -token_scores(logits, nxt).surprisal
            done_rows = []
            nxt_list = nxt.tolist()
            is_eos = [False] * len(active) if params.ignore_eos else torch.isin(nxt, eos).tolist()
            for k, r in enumerate(active):
                if is_eos[k]:
                    finish[r] = "eos"
                    done_rows.append(k)
                    continue
                tokens[r].append(nxt_list[k])
                if want_logprobs:
                    lps[r].append(float(lp[k]))
                if max_stop:
                    tail = self.tokenizer.decode(tokens[r][-(max_stop + 8):], skip_special_tokens=True)
                    if any(st in tail for st in params.stop):
                        finish[r] = "stop"
                        done_rows.append(k)
                        continue
                if len(tokens[r]) >= (len(force[r]) if force is not None else params.max_new_tokens):
                    finish[r] = "length"
                    done_rows.append(k)
            step += 1
            if len(done_rows) == len(active):
                break
            if done_rows:
                gone = set(done_rows)
                keep = [k for k in range(len(active)) if k not in gone]
                idx = torch.tensor(keep, device=self.device)
                _select_rows(cache, idx)
                policy.select_rows(idx)
                mask, next_pos, nxt = mask.index_select(0, idx), next_pos.index_select(0, idx), nxt.index_select(0, idx)
                active = [active[k] for k in keep]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                             past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1
            held = mask.sum(-1).tolist()
            for k, r in enumerate(active):  # counted before the policy prunes: the step's widest cache
                held_max[r] = max(held_max[r], held[k])
                held_sum[r] += held[k]
                full_sum[r] += plen[r] + len(tokens[r])
            kept = int(sum(held))
            mask = policy.after_step(cache, mask, step)
            evicted += kept - int(mask.sum())
            peak = max(peak, kv_cache_bytes(cache))
        t2 = time.perf_counter()
        self.stats.decode_s += t2 - t1
        self.stats.steps += step
        self.stats.kv_evicted += evicted
        self.stats.peak_kv_bytes = max(self.stats.peak_kv_bytes, peak)
        results = []
        for r in range(B):
            text = self.tokenizer.decode(tokens[r], skip_special_tokens=True)
            if finish[r] == "stop":
                first = min((text.find(s) for s in params.stop if s in text), default=-1)
                if first >= 0:
                    text = text[:first]
            self.stats.new_tokens += len(tokens[r])
            self.stats.sequences += 1
            # entries of its full cache at the end: the prompt and every token fed back (a token that ended the
            # row by length or a stop string was appended but never fed; an EOS was neither)
            full_max = plen[r] + len(tokens[r]) - (finish[r] in ("stop", "length", None))
            results.append(Completion(text=text, token_ids=tokens[r], finish_reason=finish[r] or "length",
                                      logprobs=lps[r] if want_logprobs else None,
                                      kv_kept_peak=held_max[r] / full_max, kv_kept_mean=held_sum[r] / full_sum[r]))
        return results

    @staticmethod
    def _pick(logits: torch.Tensor, params: GenParams, gens: list[torch.Generator] | None) -> torch.Tensor:
        if params.greedy or gens is None:
            return logits.argmax(dim=-1)
        x = logits.float() / params.temperature
        probs = torch.softmax(x, dim=-1)
        if params.top_p < 1.0:
            sp, si = probs.sort(dim=-1, descending=True)
            cum = sp.cumsum(-1)
            drop = cum - sp > params.top_p  # keep the smallest prefix whose mass reaches top_p
            sp = sp.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, si, sp)
        probs = probs.cpu()
        picks = [torch.multinomial(probs[k], 1, generator=g) for k, g in enumerate(gens)]
        return torch.cat(picks).to(logits.device)

    # -- teacher forcing -----------------------------------------------------------------------
    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        base = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state

    def _head_chunks(self, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        """LM-head logits over ``hidden`` [T, H], ``chunk_size`` positions at a time (never [T, V] at once)."""
        head = self.model.get_output_embeddings()
        for c0 in range(0, len(targets), chunk_size):
            yield head(hidden[c0 : c0 + chunk_size]), targets[c0 : c0 + chunk_size]

    @torch.inference_mode()
    def score(self, prompts, continuations, *, batch_size=4) -> list[list[float]]:
        return [(-ts.surprisal).tolist() for ts in self.token_scores(prompts, continuations, batch_size=batch_size)]

    @torch.inference_mode()
    def token_scores(self, prompts, continuations, *, batch_size=4) -> list[TokenScores]:
        """Batched (right-padded) teacher forcing; the LM head runs 128 positions at a time."""
        out: list[TokenScores] = []
        for s in range(0, len(prompts), batch_size):
            ps, cs = prompts[s : s + batch_size], continuations[s : s + batch_size]
            pe = [self._encode(p) for p in ps]
            ce = [self._encode(c) for c in cs]
            seqs = [a + b for a, b in zip(pe, ce, strict=True)]
            T = max(len(x) for x in seqs)
            ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, x in enumerate(seqs):
                ids[r, : len(x)] = torch.tensor(x)
                mask[r, : len(x)] = 1
            h = self._hidden(ids.to(self.device), mask.to(self.device))
            for r in range(len(seqs)):
                n_p, n_c = len(pe[r]), len(ce[r])
                if n_c == 0:
                    out.append(TokenScores(torch.zeros(0), torch.zeros(0), torch.zeros(0)))
                    continue
                if n_p == 0:
                    raise ValueError("token_scores needs a non-empty prompt (the first token has no context)")
                hs = h[r, n_p - 1 : n_p - 1 + n_c]
                tgt = torch.tensor(ce[r], device=self.device)
                parts = [token_scores(lg, t) for lg, t in self._head_chunks(hs, tgt, 128)]
                out.append(TokenScores(*(torch.cat([getattr(p, f) for p in parts]).cpu()
                                         for f in ("surprisal", "entropy", "lse"))))
        return out

    @torch.inference_mode()
    def iter_logits(self, prompt, continuation, *, chunk_size=128) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pe, ce = self._encode(prompt), self._encode(continuation)
        ids = torch.tensor([pe + ce], device=self.device)
        h = self._hidden(ids, torch.ones_like(ids))[0, len(pe) - 1 : len(pe) - 1 + len(ce)]
        yield from self._head_chunks(h, torch.tensor(ce, device=self.device), chunk_size)

    @torch.inference_mode()
    def context_logits(self, contexts, continuation, *, max_tokens=None, chunk_size=64):
        """Batched, with the contexts' shared token prefix run once.

        The common prefix (one row) fills a cache that is copied to every row; each row's own tokens
        plus the continuation follow, left-padded inside the row after the prefix, so the continuation
        occupies the same columns everywhere. Positions are explicit (padding does not shift RoPE).
        """
        from transformers import DynamicCache

        ce = self._encode(continuation)[:max_tokens]
        if not ce:
            return
        enc = [self._encode(c) for c in contexts]
        shared = 0
        limit = min(len(e) for e in enc) - 1  # every row keeps at least one own token
        while shared < limit and all(e[shared] == enc[0][shared] for e in enc):
            shared += 1
        tails = [e[shared:] + ce for e in enc]
        T = max(len(t) for t in tails)
        ids = torch.full((len(enc), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(enc), shared + T), dtype=torch.long)
        mask[:, :shared] = 1
        for r, t in enumerate(tails):
            ids[r, T - len(t):] = torch.tensor(t)
            mask[r, shared + T - len(t):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model
        cache = None
        if shared:
            cache = DynamicCache(config=self.model.config)
            decoder(input_ids=torch.tensor([enc[0][:shared]], device=self.device), position_ids=pos[:1, :shared],
                    past_key_values=cache, use_cache=True)
            _select_rows(cache, torch.zeros(len(enc), dtype=torch.long, device=self.device))
        h = decoder(input_ids=ids, attention_mask=mask, position_ids=pos[:, shared:], past_key_values=cache,
                    use_cache=cache is not None).last_hidden_state[:, T - len(ce) - 1 : T - 1]
        head = self.model.get_output_embeddings()
        tgt = torch.tensor(ce, device=self.device)
        for c0 in range(0, len(ce), chunk_size):
            yield head(h[:, c0 : c0 + chunk_size]), tgt[c0 : c0 + chunk_size]

    # -- adapters ------------------------------------------------------------------------------
    def with_adapter(self, adapter_path: str) -> HFEngine:
        """A new engine over a fresh copy of the base model with the LoRA adapter applied **unmerged**.

        Merging (``merge_and_unload()``) into bf16 weights rounds a small update away: with updates of
        typical LoRA size, a fifth of the changed weights keep their old bf16 value and most of the rest
        are off by ~15%, so the merged model is not the model that was trained. Unmerged, every
        generation and scoring path runs the adapter as peft trains it (the adapter weights are kept in
        fp32 by peft; tested against the peft model's own logits in bf16 and fp32).
        """
        from peft import PeftModel

        if self.model_path is None:
            raise ModelError("with_adapter needs an engine loaded from a path")
        model, tok = load_causal_lm(self.model_path, dtype=self.dtype, device=self.device_name,
                                    trust_remote_code=self.trust_remote_code)
        model = PeftModel.from_pretrained(model, adapter_path, is_trainable=False)
        model.eval()
        return HFEngine(model, tok, model_path=self.model_path, system_prompt=self.system_prompt, dtype=self.dtype,
                        device=self.device_name, trust_remote_code=self.trust_remote_code)


def build_hf_engine(config) -> HFEngine:
    from thinkpress.core.models import resolve_model_path

    path = resolve_model_path(config.model)
    return HFEngine.from_pretrained(path, system_prompt=config.system_prompt, dtype=config.dtype,
                                    device=config.device, trust_remote_code=config.trust_remote_code)


build_hf_engine.capabilities = HFEngine.capabilities
build_hf_engine.deterministic = True
