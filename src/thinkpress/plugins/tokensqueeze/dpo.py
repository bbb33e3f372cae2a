"""The ``dpo-l`` trainer (TokenSqueeze step 4): eta * DPO-L + (1 - eta) * SFT(chosen), LoRA policy.

For a pair (x, y_c, y_r), with log-probabilities summed over the completion tokens (prompt masked)
and the reference = the base model (the LoRA adapter disabled), computed once before training:

    z      = beta * ((log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)))
             + length_sign * length_lambda * log(len(y_r) / len(y_c))
    L_DPO-L = -log sigmoid(z)
    L_SFT   = -log pi(y_c) / len(y_c)            (per-token NLL of the chosen answer)
    L       = eta * L_DPO-L + (1 - eta) * L_SFT   (mean over the pairs of a micro-batch)

Lengths are completion tokens including EOS. The paper states the length term's place (inside the
sigmoid, lambda = 1) but not its sign. ``length_sign = -1`` (default) makes it a margin: the policy
must prefer the chosen answer by more when the rejected one is much longer, and those pairs get the
larger gradient (SimPO-style). ``+1`` makes it an offset that saturates exactly those pairs.

Ablations by config: DPO alone (``eta=1, length_lambda=0``), SFT alone (``eta=0``), DPO+SFT
(``length_lambda=0``), DPO-L+SFT (default).

Why not TRL's ``DPOTrainer`` (checked against TRL 1.16, docs/training.md): its ``loss_type`` list can
mix the sigmoid DPO loss with an SFT term (``["sigmoid", "sft"]`` with ``loss_weights``, what
``rpo_alpha`` was), but no loss takes a per-pair term inside the sigmoid, so the length term would mean
overriding its private loss method. The shared LoRA loop here (:func:`~thinkpress.toolkit.lora.train_lora`)
already shards batches across processes, checkpoints and resumes, and stops on a non-finite loss.
The loss is tested against a hand computation.
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from thinkpress.api import (
    PreferencePair,
    StageContext,
    Trainer,
    TrainingError,
    TrainingSet,
    TrainResult,
    atomic_file,
    model_identity,
    stable_hash,
)
from thinkpress.toolkit.lora import (
    SFTConfig,
    check_truncation,
    chunked_completion_logps,
    collate,
    completion_logits,
    encode_example,
    load_tokenizer,
    train_lora,
)

REFERENCE_FILE = "reference_logps.pt"
"""The reference log-probs ([pairs, 2]: chosen, rejected), kept in the stage's work directory for a resume."""


def atomic_torch_save(t: torch.Tensor, path) -> None:
    with atomic_file(path, "wb") as f:
        torch.save(t, f)


@contextlib.contextmanager
def shared_reference(ctx: StageContext, task: DPOTask, acc):
    """The file of these pairs' base-model reference log-probs in the run store's shared cache, held locked.

    The reference depends only on the encoded pairs, the base model and the numerics (dtype, autocast,
    device, micro-batch, logit chunking), not on the learning rate, beta, lambda or eta, so the variants
    of a study that train on the same pairs compute it once (about 150 s for 14 pairs of Qwen 0.5B on 2
    CPU cores). Single process only: several processes would have to agree on who computes.
    """
    items = [(c[0], r[0]) for c, r, _, _ in task.items]
    key = stable_hash("dpo-reference-v1", model_identity(ctx.config.model), str(ctx.config.dtype), items,
                      str(acc.mixed_precision), acc.device.type, task.cfg.batch_size, task.cfg.logit_chunk)
    store = ctx.run.store
    with store.lock(key):
        yield store.stage_cache(key) / REFERENCE_FILE


class DPOLConfig(SFTConfig):
    lr: float = Field(default=5e-5, gt=0.0, description="Peak learning rate")
    batch_size: int = Field(default=2, ge=1, description="Pairs per micro-batch (2 sequences each)")
    max_length: int = Field(default=512, ge=8, description="Cut prompt+chosen and prompt+rejected (+EOS) to this "
                            "many tokens; the cut pairs are counted (stats truncated_pairs) and training refuses to "
                            "start when more than 5% of the pairs would be cut")
    grad_accum: int = Field(default=4, ge=1, description="Micro-batches per optimizer step")
    beta: float = Field(default=0.1, gt=0.0, description="DPO inverse temperature")
    eta: float = Field(default=0.5, ge=0.0, le=1.0, description="Weight of DPO-L; 1 - eta weights SFT on chosen")
    length_lambda: float = Field(default=1.0, ge=0.0, description="lambda of the length term (0: plain DPO)")
    length_sign: Literal[-1, 1] = Field(default=-1, description="Sign of the length term inside the sigmoid "
                                        "(-1: margin, +1: offset; see docs/tokensqueeze.md)")
    logit_chunk: int = Field(default=128, ge=0, description="Completion positions per LM-head chunk: log-probs "
                             "without ever holding [batch, tokens, vocab] logits (0: the full logits at once)")
    gradient_checkpointing: bool = Field(default=True, description="Recompute activations in backward: with "
                                         "logit_chunk, 0.16 of the full-logits peak memory at 1.2x the step time "
                                         "(docs/training.md); the adapter is bit-identical either way")
    reference: Literal["policy", "base"] = Field(default="policy", description="Reference model: the policy as "
                                                 "this round starts (iterative DPO; the base model in round 1) or "
                                                 "always the base model")


def dpo_l_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
               len_c: torch.Tensor, len_r: torch.Tensor, *, beta: float, eta: float, length_lambda: float,
               length_sign: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The combined loss over a batch of pairs (inputs [B]: summed log-probs and token lengths)."""
    len_c, len_r = len_c.to(pi_c.dtype), len_r.to(pi_c.dtype)
    margin = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    z = margin + length_sign * length_lambda * torch.log(len_r / len_c)
    l_dpo = -F.logsigmoid(z)
    l_sft = -pi_c / len_c
    loss = (eta * l_dpo + (1 - eta) * l_sft).mean()
    logs = {"dpo_loss": l_dpo.mean().item(), "sft_nll": l_sft.mean().item(),
            "reward_margin": margin.mean().item(), "reward_accuracy": (margin > 0).float().mean().item()}
    return loss, logs


def completion_logps(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                     chunk_size: int = 0) -> torch.Tensor:
    """Sum of log p over each row's completion tokens (labels != -100); chunked over positions when
    ``chunk_size`` > 0 (:func:`thinkpress.toolkit.lora.chunked_completion_logps`)."""
    if chunk_size:
        return chunked_completion_logps(model, ids, mask, labels, chunk_size=chunk_size)
    logits, t = completion_logits(model, ids, mask, labels)
    lp = -F.cross_entropy(logits.float().transpose(1, 2), t.clamp(min=0), reduction="none")
    return (lp * (t != -100)).sum(-1)


class DPOTask:
    """Encoded pairs (chosen rows, then rejected rows, in one forward) and their reference log-probs."""

    unit = "pairs"

    def __init__(self, pairs: list[PreferencePair], tok, cfg: DPOLConfig, *, continued: bool = False):
        self.cfg = cfg
        self.continued = continued
        """Training continues an adapter (a later round): the reference may then be that policy."""
        self.pad_id = tok.pad_token_id
        self.items = []
        for p in pairs:
            c = encode_example(tok, p.prompt, p.chosen, cfg.max_length)
            r = encode_example(tok, p.prompt, p.rejected, cfg.max_length)
            if c and r:
                n_c = sum(x != -100 for x in c[1])
                n_r = sum(x != -100 for x in r[1])
                self.items.append((c, r, n_c, n_r))
        if not self.items:
            raise TrainingError(f"every pair's prompt is longer than max_length={cfg.max_length}")
        self.ref: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def uses_policy(self) -> bool:
        """The reference is the adapter being continued (a later round with ``reference='policy'``)."""
        return self.continued and self.cfg.reference == "policy"

    def _batch(self, idx: list[int], device):
        seqs = [self.items[i][0] for i in idx] + [self.items[i][1] for i in idx]
        ids, labels, mask = (t.to(device) for t in collate(seqs, self.pad_id))
        lens = torch.tensor([[self.items[i][2] for i in idx], [self.items[i][3] for i in idx]], device=device)
        return ids, labels, mask, lens

    def weight(self, idx: list[int]) -> float:
        return float(len(idx))  # the loss is a mean over pairs

    @torch.no_grad()
    def compute_reference(self, model, acc) -> None:
        """Reference log-probs, in eval mode, once: the base model (LoRA adapter disabled), or, when training
        continues an adapter and ``reference='policy'``, that adapter before the first step. Several processes
        split the batches and sum their parts (each pair is computed by one process)."""
        import contextlib

        model = acc.unwrap_model(model)
        was_training = model.training
        model.eval()
        out = torch.zeros(len(self.items), 2, dtype=torch.float32)
        use_policy = self.uses_policy
        starts = list(range(0, len(self.items), self.cfg.batch_size))[acc.process_index::acc.num_processes]
        with (contextlib.nullcontext() if use_policy else model.disable_adapter()), acc.autocast():
            for s in starts:
                idx = list(range(s, min(s + self.cfg.batch_size, len(self.items))))
                ids, labels, mask, _ = self._batch(idx, acc.device)
                lp = completion_logps(model, ids, mask, labels, self.cfg.logit_chunk).float().cpu()
                out[idx, 0], out[idx, 1] = lp[: len(idx)], lp[len(idx):]
        if acc.num_processes > 1:
            out = acc.reduce(out.to(acc.device), reduction="sum").cpu()
        model.train(was_training)
        self.ref = out

    def loss(self, model, idx, device):
        ids, labels, mask, lens = self._batch(idx, device)
        lp = completion_logps(model, ids, mask, labels, self.cfg.logit_chunk)
        n = len(idx)
        ref = self.ref[idx].to(device)
        c = self.cfg
        return dpo_l_loss(lp[:n], lp[n:], ref[:, 0], ref[:, 1], lens[0], lens[1], beta=c.beta, eta=c.eta,
                          length_lambda=c.length_lambda, length_sign=c.length_sign)


class DPOLTrainer(Trainer):
    name = "dpo-l"
    description = "eta*DPO-L + (1-eta)*SFT(chosen) on a LoRA policy, reference = base model (TokenSqueeze)"
    Config = DPOLConfig

    def train(self, data: TrainingSet, ctx: StageContext) -> TrainResult:
        cfg = self.config
        if not data.pairs:
            raise TrainingError(
                "dpo-l needs preference pairs and the training set has none: every problem was all-correct or "
                "all-wrong (p = 1 or 0), or no incorrect answer was longer than a positive. Use more or harder "
                "problems (train_data.limit), more samples (components.self-sampler.n), or the lora-sft trainer "
                "on the positives (--set stages.trainer=lora-sft)."
            )
        check_truncation(load_tokenizer(ctx), data.pairs, cfg, component=self.name, ctx=ctx)

        def make_task(model, tok, acc):
            task = DPOTask(data.pairs, tok, cfg, continued=ctx.adapter is not None)
            ref = "the policy as this round starts" if task.continued and cfg.reference == "policy" else "base model"
            cached = ctx.workdir / REFERENCE_FILE
            saved = torch.load(cached) if cached.exists() else None
            if saved is not None and saved.shape == (len(task), 2):  # a resumed stage: computed before the kill
                task.ref = saved
                ctx.log(f"reference log-probs for {len(task)} pairs ({ref}) from {cached.name}")
            elif acc.num_processes == 1 and not task.uses_policy:
                with shared_reference(ctx, task, acc) as shared:  # another variant of a study may have them
                    if shared.exists():
                        task.ref = torch.load(shared)
                        ctx.log(f"reference log-probs for {len(task)} pairs ({ref}) from the shared cache")
                    else:
                        ctx.log(f"reference log-probs for {len(task)} pairs ({ref})")
                        task.compute_reference(model, acc)
                        atomic_torch_save(task.ref, shared)
                atomic_torch_save(task.ref, cached)
            else:
                ctx.log(f"reference log-probs for {len(task)} pairs ({ref})")
                task.compute_reference(model, acc)
                if acc.is_main_process:
                    atomic_torch_save(task.ref, cached)
            ratio = [math.log(r / c) for _, _, c, r in task.items]
            ctx.stats["mean_log_length_ratio"] = sum(ratio) / len(ratio)
            return task

        return train_lora(ctx, cfg, out_dir=ctx.workdir, make_task=make_task)
