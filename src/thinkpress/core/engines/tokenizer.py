"""Prompts and token counts from a transformers tokenizer, shared by the engines that load one.

Every engine of a run must build the same prompt and count the same tokens for the same text, or
token savings and truncation would depend on the engine. Engines built on a Hugging Face model
directory (``hf``, ``vllm``) therefore format and tokenize here, with the model's own tokenizer:
the chat template with the generation prompt, no special tokens added to already-templated text.
"""

from __future__ import annotations

from typing import Any

from thinkpress.core.errors import ModelError


def eos_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """The ids that end an answer: the generation config's EOS ids and the tokenizer's EOS."""
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(i for i in ids if i is not None)


class ChatTokenizer:
    """``chat_prompt``, ``count_tokens``, ``token_offsets`` and ``encode`` over ``self.tokenizer``."""

    tokenizer: Any
    system_prompt: str | None

    def chat_prompt(self, question: str, system: str | None = None, suffix: str = "") -> str:
        system = self.system_prompt if system is None else system
        msgs = [{"role": "system", "content": system}] if system else []
        msgs.append({"role": "user", "content": question + suffix})
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in msgs) + "\n\n"

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def token_offsets(self, text: str) -> list[int]:
        if not getattr(self.tokenizer, "is_fast", False):
            raise ModelError(f"character offsets need a fast (Rust) tokenizer; {type(self.tokenizer).__name__} is not")
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [a for a, _ in enc["offset_mapping"]]

    def _encode(self, text: str) -> list[int]:
        # Chat-templated prompts already hold their special tokens.
        return self.tokenizer(text, add_special_tokens=False).input_ids
