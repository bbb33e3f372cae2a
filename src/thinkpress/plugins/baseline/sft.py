"""The ``lora-sft`` trainer: LoRA SFT on completion tokens (see :mod:`thinkpress.toolkit.lora`)."""

from __future__ import annotations

from thinkpress.api import StageContext, Trainer, TrainingSet, TrainResult
from thinkpress.toolkit.lora import SFTConfig, train_lora_sft


class LoraSFT(Trainer):
    name = "lora-sft"
    description = "LoRA SFT on completion tokens only (prompt masked), bf16 autocast on CPU"

    Config = SFTConfig

    def train(self, data: TrainingSet, ctx: StageContext) -> TrainResult:
        return train_lora_sft(data.examples, ctx, self.config, out_dir=ctx.workdir, component=self.name)
