"""``FakeEngine``: a deterministic toy language model with no weights, for fast tests of the core.

It is a real (if tiny) autoregressive model over a 24-word vocabulary: the logits of the next word
are a fixed pseudo-random function of the prompt and the last three words, and an end-of-text
logit that grows with the length, so every answer ends. Greedy decoding takes the argmax, sampling
draws from softmax(logits / T) (top-p applied) with the caller's per-row seed, and teacher forcing
(``iter_logits``, hence ``score`` and ``token_scores``) reads the same logits, so its log-probs equal
those ``generate`` reports. Text is words with a leading space; a "token" is whitespace + word.

It has the ``scoring`` and ``adapters`` capabilities (an adapter changes the logits through a salt
derived from its files, or its path) and no KV cache, so no ``kv_policy`` or ``forced_decode``. It is not registered
as an engine: tests register it (``register("fake", FakeEngine.factory)``) or build it directly.
Never report its numbers as a model's.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import torch

from thinkpress.core.engines.base import Capability, Completion, Engine, GenParams, GenStats, KVPolicy, ProgressFn
from thinkpress.core.errors import ModelError
from thinkpress.core.store import derive_seed

WORDS = ["So", "we", "add", "take", "step", "then", "the", "answer", "is", "total", "=", "+",
         "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "\\boxed{4}.", "<eot>"]
EOT = len(WORDS) - 1
_TOKEN = re.compile(r"\s*\S+")


class FakeEngine(Engine):
    name = "fake"
    capabilities = frozenset({Capability.SCORING, Capability.ADAPTERS})

    def __init__(self, *, system_prompt: str | None = None, salt: str = ""):
        self.system_prompt = system_prompt
        self.salt = salt
        self.stats = GenStats()

    @classmethod
    def factory(cls, config: Any) -> FakeEngine:
        """The engine factory to register (``config`` is the run config)."""
        return cls(system_prompt=config.system_prompt)

    # -- text ----------------------------------------------------------------------------------
    def chat_prompt(self, question: str, system: str | None = None, suffix: str = "") -> str:
        system = self.system_prompt if system is None else system
        return (f"{system}\n" if system else "") + f"Q: {question}{suffix}\nA:"

    def _tokens(self, text: str) -> list[str]:
        return _TOKEN.findall(text)

    def count_tokens(self, text: str) -> int:
        return len(self._tokens(text))

    def token_offsets(self, text: str) -> list[int]:
        return [m.start() for m in _TOKEN.finditer(text)]

    @staticmethod
    def _id(token: str) -> int:
        word = token.strip()
        return WORDS.index(word) if word in WORDS else derive_seed("word", word) % (len(WORDS) - 1)

    # -- the model -----------------------------------------------------------------------------
    def _logits(self, prompt: str, prefix: list[int]) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.salt, prompt, prefix[-3:]))
        logits = 2.0 * torch.randn(len(WORDS), generator=g)
        logits[EOT] += 0.25 * len(prefix) - 3.0
        return logits

    def generate(self, prompts: list[str], params: GenParams, *, n: int = 1, seeds: list[int] | None = None,
                 kv_policy: KVPolicy | None = None, batch_size: int = 8, progress: ProgressFn | None = None,
                 logprobs: bool = False) -> list[list[Completion]]:
        if kv_policy is not None and type(kv_policy) is not KVPolicy:
            raise ModelError(f"engine {self.name!r} has no KV cache: it cannot apply the KV policy {kv_policy.name!r}")
        t0 = time.perf_counter()
        out = []
        for i, prompt in enumerate(prompts):
            row = []
            for j in range(n):
                g = None
                if not params.greedy:
                    g = torch.Generator().manual_seed(((seeds[i] if seeds else 0) * 1_000_003 + j) % (2**63 - 1))
                row.append(self._decode(prompt, params, g, logprobs))
            out.append(row)
            if progress:
                progress(n)
        self.stats.decode_s += time.perf_counter() - t0
        return out

    def _decode(self, prompt: str, params: GenParams, g: torch.Generator | None, want_logprobs: bool) -> Completion:
        ids: list[int] = []
        lps: list[float] = []
        finish = "length"
        while len(ids) < params.max_new_tokens:
            logits = self._logits(prompt, ids)
            if g is None:
                nxt = int(logits.argmax())
            else:
                probs = torch.softmax(logits / params.temperature, -1)
                sp, si = probs.sort(descending=True)
                sp = sp.masked_fill(sp.cumsum(-1) - sp > params.top_p, 0.0)
                nxt = int(si[torch.multinomial(sp, 1, generator=g)])
            if nxt == EOT and not params.ignore_eos:
                finish = "eos"
                break
            ids.append(nxt)
            lps.append(float(torch.log_softmax(logits, -1)[nxt]))
            text = "".join(" " + WORDS[t] for t in ids)
            hit = min((text.find(s) for s in params.stop if s in text), default=-1)
            if hit >= 0:
                finish = "stop"
                break
        text = "".join(" " + WORDS[t] for t in ids)
        if finish == "stop":
            text = text[:min(text.find(s) for s in params.stop if s in text)]
        self.stats.new_tokens += len(ids)
        self.stats.sequences += 1
        self.stats.steps += len(ids)
        return Completion(text=text, token_ids=ids, finish_reason=finish, logprobs=lps if want_logprobs else None)

    def iter_logits(self, prompt: str, continuation: str, *, chunk_size: int = 128) -> Iterator[tuple[Any, Any]]:
        ids = [self._id(t) for t in self._tokens(continuation)]
        for c0 in range(0, len(ids), chunk_size):
            rows = [self._logits(prompt, ids[:t]) for t in range(c0, min(c0 + chunk_size, len(ids)))]
            yield torch.stack(rows), torch.tensor(ids[c0 : c0 + chunk_size])

    def with_adapter(self, adapter_path: str) -> FakeEngine:
        """The adapter salts the logits: by its files' content when it is a directory (like a real adapter,
        whose effect is its weights, not where it lies), else by the path."""
        import hashlib
        from pathlib import Path

        p = Path(adapter_path)
        ident = adapter_path
        if p.is_dir():
            h = hashlib.sha256()
            for f in sorted(x for x in p.rglob("*") if x.is_file()):
                h.update(str(f.relative_to(p)).encode() + b"\0" + f.read_bytes())
            ident = h.hexdigest()
        return FakeEngine(system_prompt=self.system_prompt, salt=f"{self.salt}+{ident}")


FakeEngine.factory.__func__.capabilities = FakeEngine.capabilities  # type: ignore[attr-defined]
