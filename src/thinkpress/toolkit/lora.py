"""LoRA training for methods: SFT on completion tokens only (prompt tokens masked), and a loop any loss can use.

:func:`train_lora` runs the loop for a task (SFT here; TokenSqueeze's DPO-L supplies its own),
:func:`train_lora_sft` is the whole SFT stage for a list of examples.

A plain training loop rather than ``transformers.Trainer``: it runs on CPU with bf16 autocast,
checkpoints the adapter (``adapter_last_good/``) so that a non-finite loss stops training with a
clear error while keeping the last good weights, and reports progress through the run's UI.
Before the model is loaded (only its tokenizer), :func:`check_truncation` counts the examples (or pairs)
that ``max_length`` would cut, records the count in the stage's stats and refuses to train when
more than 5% would be cut.
Several processes (GPUs, or CPU processes over gloo): ``core run --launcher accelerate --num-processes N``
runs the trainer stage under ``accelerate launch`` (:mod:`thinkpress.core.launch`); :func:`train_lora` splits
each micro-batch across the processes and only the main process writes. See docs/training.md.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from pydantic import Field

from thinkpress.core.context import StageContext
from thinkpress.core.data import Example, PreferencePair, TrainResult
from thinkpress.core.errors import ConfigError, TrainingError
from thinkpress.core.files import atomic_dir
from thinkpress.core.stages import ComponentConfig

ALL_LINEAR = "all-linear"


class SFTConfig(ComponentConfig):
    rank: int = Field(default=8, ge=1, description="LoRA rank r")
    alpha: int = Field(default=16, ge=1, description="LoRA alpha")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="LoRA dropout")
    target_modules: list[str] | Literal["all-linear"] = Field(default=ALL_LINEAR,
                                                              description="Modules to adapt ('all-linear' or names)")
    lr: float = Field(default=1e-4, gt=0.0, description="Peak learning rate")
    epochs: float = Field(default=1.0, gt=0.0, description="Passes over the training set (fractions allowed)")
    batch_size: int = Field(default=4, ge=1, description="Examples per micro-batch")
    grad_accum: int = Field(default=2, ge=1, description="Micro-batches per optimizer step")
    max_length: int = Field(default=512, ge=8, description="Cut prompt+completion(+EOS) to this many tokens; the "
                            "cut examples are counted (stats truncated_examples) and training refuses to start "
                            "when more than 5% would be cut")
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0, description="Linear warmup fraction of the steps")
    scheduler: Literal["cosine", "linear", "constant"] = Field(default="cosine", description="LR schedule after warmup")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay")
    max_grad_norm: float = Field(default=1.0, gt=0.0, description="Gradient clipping norm")
    autocast_bf16: bool | None = Field(default=None, description="bf16 autocast (weights stay fp32); None: when the "
                                       "run's dtype is bfloat16 (not on CPUs without native bf16)")
    save_every: int = Field(default=10, ge=1, description="Checkpoint the adapter every N optimizer steps")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations in backward "
                                         "(less memory, more time; see docs/baseline.md)")


def encode_example(tok, prompt: str, completion: str, max_length: int) -> tuple[list[int], list[int]] | None:
    """Token ids and labels (prompt masked with -100), cut to ``max_length``; None when the prompt leaves no room.

    The cut is silent here: trainers count it first with :func:`check_truncation`.
    """
    p = tok(prompt, add_special_tokens=False).input_ids
    c = tok(completion, add_special_tokens=False).input_ids + [tok.eos_token_id]
    ids = (p + c)[:max_length]
    labels = ([-100] * len(p) + c)[:max_length]
    if all(x == -100 for x in labels):
        return None
    return ids, labels


MAX_CUT_PERCENT = 5
"""Training refuses to start when more than this share of the examples (or pairs) ``max_length`` would cut."""


@dataclass(frozen=True)
class TruncationCount:
    """How many of ``total`` examples (or pairs) ``max_length`` cuts, and the longest sequence in tokens."""

    unit: str
    total: int
    cut: int
    longest: int
    max_length: int

    @property
    def percent(self) -> float:
        return 100 * self.cut / self.total if self.total else 0.0

    @property
    def too_many(self) -> bool:
        return self.cut * 100 > MAX_CUT_PERCENT * self.total  # integers: exactly 5% is allowed


def count_truncated(tok, items: Sequence[Example] | Sequence[PreferencePair], max_length: int) -> TruncationCount:
    """Count the items :func:`encode_example` would cut: prompt + completion + EOS longer than ``max_length``.

    A preference pair counts once, when its chosen or its rejected answer is cut.
    """
    pairs = bool(items) and isinstance(items[0], PreferencePair)
    lengths = []
    if items:  # tokenized in two batched calls, the same way as encode_example (prompt and completion apart)
        per_item = 2 if pairs else 1
        texts = [t for x in items for t in ((x.chosen, x.rejected) if pairs else (x.completion,))]
        n_prompt = [len(ids) for ids in tok([x.prompt for x in items], add_special_tokens=False).input_ids]
        n_comp = [len(ids) + 1 for ids in tok(texts, add_special_tokens=False).input_ids]  # + EOS
        lengths = [n + max(n_comp[i * per_item:(i + 1) * per_item]) for i, n in enumerate(n_prompt)]
    return TruncationCount(unit="pairs" if pairs else "examples", total=len(items),
                           cut=sum(n > max_length for n in lengths), longest=max(lengths, default=0),
                           max_length=max_length)


def check_truncation(tok, items: Sequence[Example] | Sequence[PreferencePair], cfg: SFTConfig, *, component: str,
                     ctx: StageContext | None = None) -> TruncationCount:
    """Count what ``cfg.max_length`` cuts; record it in ``ctx.stats`` (``examples``/``truncated_examples``, or
    ``pairs``/``truncated_pairs``) and the log, and raise :class:`ConfigError` when more than 5% would be cut.

    Call it before training (and before loading the model): it needs only the tokenizer.
    """
    t = count_truncated(tok, items, cfg.max_length)
    key = f"components.{component}.max_length={t.max_length}"
    if ctx is not None:
        ctx.stats.update({t.unit: t.total, f"truncated_{t.unit}": t.cut})
    if t.too_many:
        raise ConfigError(
            f"{key} would cut {t.cut} of {t.total} {t.unit} ({t.percent:.3g}%; at most {MAX_CUT_PERCENT}% may be "
            f"cut); raise it (the longest prompt+completion is {t.longest} tokens) or train on shorter completions "
            "(e.g. a lower max_new_tokens for the sampler)"
        )
    if ctx is not None:
        what = (f"cuts {t.cut} of {t.total} {t.unit} ({t.percent:.3g}%, within the {MAX_CUT_PERCENT}% allowed)"
                if t.cut else f"cuts none of the {t.total} {t.unit}")
        ctx.log(f"max_length={t.max_length} {what}; the longest prompt+completion is {t.longest} tokens")
    return t


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
    T = max(len(x) for x, _ in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for r, (x, y) in enumerate(batch):
        ids[r, : len(x)] = torch.tensor(x)
        labels[r, : len(y)] = torch.tensor(y)
        mask[r, : len(x)] = 1
    return ids, labels, mask


def completion_logits(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor):
    """Logits at the completion positions only, and their targets (-100 where a row has none).

    ``logits_to_keep`` takes the positions whose next token is a target in some row, so the
    [batch, positions, vocab] logits (1.2 GB in fp32 for 4 x 512 tokens of a 152k vocabulary) are not
    built over prompt tokens. The call still goes through ``model(...)`` (DDP-safe).
    """
    tgt = labels[:, 1:]
    cols = (tgt != -100).any(dim=0).nonzero().squeeze(1)
    return model(input_ids=ids, attention_mask=mask, logits_to_keep=cols).logits, tgt[:, cols]


def _chunk_logp(h: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    logits = (h @ w.T.to(h.dtype)).float()
    return logits.gather(-1, t[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def chunked_completion_logps(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, *,
                             chunk_size: int = 128) -> torch.Tensor:
    """Sum of log p over each row's completion tokens (labels != -100), without the full logits.

    The model runs once (through ``model(...)``, so DDP's gradient hooks see it) for its last hidden
    states; the LM head and the log-softmax then run over ``chunk_size`` completion positions at a time
    under activation checkpointing, so neither the forward nor the backward ever holds more than a
    [chunk_size, vocab] fp32 block (a [batch, tokens, vocab] fp32 tensor is 1.2 GB for 4 x 512 tokens of
    a 152k vocabulary, and autograd keeps several). Equal to the full computation within float rounding
    (tested, values and gradients). The LM head must be frozen (LoRA never targets it here).
    """
    from torch.utils.checkpoint import checkpoint

    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1][:, :-1]
    tgt = labels[:, 1:]
    sel = tgt != -100
    h, t = hidden[sel], tgt[sel]
    rows = sel.nonzero()[:, 0]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = model.module.get_output_embeddings()  # DDP-wrapped
    w = head.weight
    parts = [checkpoint(_chunk_logp, h[s:s + chunk_size], t[s:s + chunk_size], w, use_reentrant=False)
             for s in range(0, len(t), chunk_size)]
    lp = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    return torch.zeros(ids.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)


def completion_loss(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the completion tokens."""
    logits, t = completion_logits(model, ids, mask, labels)
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), t.reshape(-1),
                                             ignore_index=-100)


def lr_lambda(total: int, warmup: int, kind: str):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        prog = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1.0 - prog) if kind == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))

    return f


def load_tokenizer(ctx: StageContext):
    """The run model's tokenizer; cheap, so checks can run before the model loads."""
    from thinkpress.core.models import load_tokenizer as load
    from thinkpress.core.models import resolve_model_path

    return load(resolve_model_path(ctx.config.model), trust_remote_code=ctx.config.trust_remote_code)


def load_trainable(ctx: StageContext, cfg: SFTConfig):
    """The base model in fp32 with a fresh LoRA adapter (or, in a later self-improvement round, the
    policy's adapter ``ctx.adapter`` to continue, trainable), and its tokenizer."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from thinkpress.core.models import load_causal_lm, resolve_model_path

    model, tok = load_causal_lm(resolve_model_path(ctx.config.model), dtype="float32", device="cpu",
                                trust_remote_code=ctx.config.trust_remote_code)
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                      task_type="CAUSAL_LM")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.config.use_cache = False  # training never reads the KV cache (and transformers warns otherwise)
    if ctx.adapter:
        return PeftModel.from_pretrained(model, ctx.adapter, is_trainable=True), tok
    return get_peft_model(model, lcfg), tok


class LoraTask(Protocol):
    """What :func:`train_lora` trains on: a list of encoded items and the loss of a micro-batch of them."""

    def __len__(self) -> int: ...

    def loss(self, model, idx: list[int], device) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of the items ``idx`` (a scalar with grad: the mean over :meth:`weight` units) and numbers to log
        (averaged per epoch)."""
        ...

    def weight(self, idx: list[int]) -> float:
        """How many units :meth:`loss` averages over for ``idx`` (tokens for SFT, pairs for DPO): when a micro-batch
        is split across processes, each process's share is weighted by it, so the gradient is the whole batch's."""
        ...


class SFTTask:
    def __init__(self, examples: list[Example], tok, cfg: SFTConfig):
        self.items = [e for e in (encode_example(tok, x.prompt, x.completion, cfg.max_length) for x in examples) if e]
        self.pad_id = tok.pad_token_id
        if not self.items:
            raise TrainingError(f"every example's prompt is longer than max_length={cfg.max_length}")
        self.n_targets = [sum(y != -100 for y in labels[1:]) for _, labels in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def weight(self, idx: list[int]) -> float:
        return float(sum(self.n_targets[i] for i in idx))  # the loss is a mean over completion tokens

    def loss(self, model, idx, device):
        ids, labels, mask = (t.to(device) for t in collate([self.items[i] for i in idx], self.pad_id))
        return completion_loss(model, ids, mask, labels), {}


def global_micro_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """The global micro-batches: seeded reshuffled passes over ``range(n)``, ``batch_size`` items at a time (a
    pass's last batch may be shorter). Every process draws the same sequence; a resumed run replays it."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for s in range(0, n, batch_size):
            yield order[s:s + batch_size]


CHECKPOINT_STATE = "trainer_state.pt"


def train_lora(ctx: StageContext, cfg: SFTConfig, *, out_dir: Path,
               make_task: Callable[[Any, Any, Any], LoraTask]) -> TrainResult:
    """The LoRA training loop shared by the trainers; the adapter is saved in ``out_dir / "adapter"``.

    ``make_task(model, tokenizer, accelerator)`` encodes the data (and may run the model once, e.g.
    for DPO's reference log-probs) after the model is loaded and before the first step.

    Several processes (``accelerate launch``, see :mod:`thinkpress.core.launch`): ``batch_size`` and
    ``grad_accum`` keep their meaning for the whole job. Each global micro-batch is split across the
    processes (process r takes items r, r+N, ...), each share's loss is weighted by its part of the
    batch (:meth:`LoraTask.weight`) and DDP averages the gradients, so the update equals the
    one-process update on the same batch (within float rounding; tested with two CPU processes).
    Only the main process writes (adapter, checkpoints). Every ``save_every`` steps the adapter, the
    optimizer and scheduler state and the step are checkpointed in ``adapter_last_good/``; a rerun of
    the stage after a kill continues from there (the data order is replayed, the dropout generator
    restored; several processes seed dropout per micro-batch and process), and ends with the same
    adapter as an uninterrupted run (tested). One process trains exactly as before the launcher existed.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    from thinkpress.core.store import derive_seed

    torch.manual_seed(ctx.seed)
    model, tok = load_trainable(ctx, cfg)
    autocast = cfg.autocast_bf16 if cfg.autocast_bf16 is not None else ctx.config.dtype == "bfloat16"
    precision = "bf16" if autocast else "no"
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", precision) != precision:
        # A second training in the same process (ablation grids, tests) with another precision:
        # accelerate refuses to change its process-wide state, so reset it (not the distributed part).
        AcceleratorState._reset_state()
    acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum, cpu=not torch.cuda.is_available(),
                      mixed_precision=precision)
    world, rank = acc.num_processes, acc.process_index
    sharded = acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    model = model.to(acc.device)
    task = make_task(model, tok, acc)
    micro_per_epoch = math.ceil(len(task) / cfg.batch_size)
    # whole optimizer steps: a trailing partial accumulation would be computed and then dropped
    total_steps = max(1, math.ceil(math.ceil(micro_per_epoch * cfg.epochs) / cfg.grad_accum))
    total_micro = total_steps * cfg.grad_accum
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    # stepped by hand once per optimizer step: accelerate's wrapper would step it once per process
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, int(cfg.warmup_ratio * total_steps),
                                                             cfg.scheduler))
    if acc.state.deepspeed_plugin is not None:  # no dataloader to read the per-process batch from
        acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = math.ceil(cfg.batch_size
                                                                                                  / world)
    model, opt = acc.prepare(model, opt)
    model.train()
    good_dir, final_dir = out_dir / "adapter_last_good", out_dir / "adapter"
    losses: list[float] = []
    logs: list[dict[str, float]] = []

    def save(dest: Path, step: int, micro: int) -> None:
        weights = acc.get_state_dict(model)  # every process: gathers the shards under ZeRO-3 / FSDP
        if acc.is_main_process:
            with atomic_dir(dest) as tmp:
                acc.unwrap_model(model).save_pretrained(tmp, safe_serialization=True, state_dict=weights)
                if dest == good_dir:
                    torch.save({"step": step, "micro": micro, "total_steps": total_steps, "losses": losses,
                                "logs": logs, "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                                "optimizer": None if sharded else opt.state_dict()}, tmp / CHECKPOINT_STATE)
                (tmp / "step.json").write_text(json.dumps({"step": step}))
        acc.wait_for_everyone()

    step = micro = 0
    ck = good_dir / CHECKPOINT_STATE
    if ck.exists():
        saved = torch.load(ck, weights_only=False)
        if saved["total_steps"] == total_steps and 0 < saved["step"] < total_steps:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(acc.unwrap_model(model), load_file(good_dir / "adapter_model.safetensors"))
            if saved["optimizer"] is not None:
                opt.load_state_dict(saved["optimizer"])
            elif sharded:
                ctx.log("the optimizer state is sharded (DeepSpeed/FSDP) and not checkpointed: it restarts")
            sched.load_state_dict(saved["scheduler"])
            if world == 1:  # one process draws dropout from the global generator: restore it
                torch.set_rng_state(saved["torch_rng"])
            step, micro, losses, logs = saved["step"], saved["micro"], saved["losses"], saved["logs"]
            ctx.stats["resumed_from_step"] = step
            ctx.log(f"resuming from the checkpoint at step {step} of {total_steps}")
    if step == 0:
        save(good_dir, 0, 0)
    batches = global_micro_batches(len(task), cfg.batch_size, ctx.seed)
    for _ in range(micro):  # replay the data order up to the checkpoint
        next(batches)
    visits = torch.zeros(world, len(task), dtype=torch.long)
    t0 = time.perf_counter()
    with ctx.ui.progress(f"training ({total_steps} steps)", total_steps) as advance:
        advance(step)
        while micro < total_micro:
            idx = next(batches)
            mine = idx[rank::world]
            share = task.weight(mine) / task.weight(idx) if mine else 0.0
            mine = mine or idx[:1]  # a process with no share still runs (scaled to 0) so DDP's all-reduce matches
            visits[rank, mine] += int(share > 0)
            if world > 1:  # dropout masks: a seed per micro-batch and process, so every process can replay them
                torch.manual_seed(derive_seed(ctx.seed, "micro-batch", micro, rank))
            with acc.accumulate(model), acc.autocast():
                loss, extra = task.loss(model, mine, acc.device)
                # the batch's mean loss is the sum of the shares; DDP averages gradients over processes
                acc.backward(loss * (share * world))
                keys = sorted(extra)
                logged = torch.tensor([loss.item(), *[extra[k] for k in keys]], dtype=torch.float64) * share
                if world > 1:
                    logged = acc.reduce(logged.to(acc.device), reduction="sum").cpu()
                if not math.isfinite(logged[0].item()):
                    raise TrainingError(
                        f"non-finite training loss ({logged[0].item()}) at optimizer step {step}, micro-batch "
                        f"{micro}; stopped. The last good adapter is kept in {good_dir}. Lower the learning rate "
                        f"(components.<trainer>.lr, now {cfg.lr}) or check the data."
                    )
                if acc.sync_gradients:
                    acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                opt.step()
                opt.zero_grad()
            losses.append(logged[0].item())
            logs.append(dict(zip(keys, logged[1:].tolist(), strict=True)))
            micro += 1
            if acc.sync_gradients:
                sched.step()
                step += 1
                advance(1)
                if step % cfg.save_every == 0 and step < total_steps:
                    save(good_dir, step, micro)
    wall = time.perf_counter() - t0
    save(final_dir, step, micro)
    last = slice(-micro_per_epoch, None)
    metrics = {
        getattr(task, "unit", "examples"): len(task), "steps": step, "micro_batches": micro, "wall_s": wall,
        "s_per_step": wall / max(1, step - ctx.stats.get("resumed_from_step", 0)), "loss_first": losses[0],
        "loss_last": losses[-1], "loss_mean_last_epoch": sum(losses[last]) / len(losses[last]),
    }
    if world > 1:
        visits = acc.reduce(visits.to(acc.device), reduction="sum").cpu()
        metrics |= {"processes": world, "items_per_process": (visits > 0).sum(1).tolist(),
                    "item_visits_per_process": visits.sum(1).tolist(),
                    "items_seen_by_several_processes": int(((visits > 0).sum(0) > 1).sum())}
    for k in sorted({k for d in logs for k in d}):
        vals = [d[k] for d in logs[last] if k in d]
        if vals:
            metrics[f"{k}_mean_last_epoch"] = sum(vals) / len(vals)
    ctx.stats.update(metrics)
    ctx.log(f"trained {step} steps in {wall:.0f}s; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return TrainResult(adapter_path=str(final_dir), metrics=metrics)


def train_lora_sft(examples: list[Example], ctx: StageContext, cfg: SFTConfig, *, out_dir: Path,
                   component: str = "lora-sft") -> TrainResult:
    """LoRA SFT on ``examples`` (completion tokens only); ``component`` names the trainer in config errors."""
    if not examples:
        raise TrainingError("no training examples: every sample was filtered out (see the selector's counts)")
    check_truncation(load_tokenizer(ctx), examples, cfg, component=component, ctx=ctx)
    return train_lora(ctx, cfg, out_dir=out_dir, make_task=lambda model, tok, acc: SFTTask(examples, tok, cfg))


def save_random_adapter(model_path: str, out_dir: str | Path, *, rank: int = 8, scale: float = 0.3,
                        seed: int = 0) -> str:
    """Save a LoRA adapter with random, non-zero weights on every projection of ``model_path`` (fp32).

    For testing how an engine serves adapters (e.g. against hf + peft): a freshly initialised LoRA
    has B = 0 and changes nothing. ``scale`` shrinks the random A and B (0.3 changes SmolLM2's greedy
    outputs without wrecking them). Returns ``out_dir``.
    """
    from peft import LoraConfig, get_peft_model

    from thinkpress.core.models import load_causal_lm

    model, _ = load_causal_lm(model_path, dtype="float32", device="cpu")
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(scale)
    peft_model.save_pretrained(str(out_dir))
    return str(out_dir)
