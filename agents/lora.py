"""LoRA through PEFT: train low-rank adapters only, and use the frozen base as the reference model.

With adapters the reference model needs no second copy of the weights: it is the
policy's own base with the adapters switched off (``AdaptersDisabled``), which
the env steps with its own KV cache like any other reference model. What trains
is the adapters, plus the value head (and a separate critic trunk, if chosen).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D


def add_lora(policy: nn.Module, rank: int, alpha: float, target_modules: list[str] | None = None) -> PeftModel:
    """Wrap ``policy`` with LoRA adapters of ``rank`` (PEFT's default target modules for its architecture)."""
    conv1d = any(isinstance(module, Conv1D) for module in policy.modules())  # GPT-2 stores weights transposed
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=target_modules,
        fan_in_fan_out=conv1d,
    )
    return get_peft_model(policy, config)


class AdaptersDisabled(nn.Module):
    """The base model under a PEFT policy, adapters off: the reference model, sharing the policy's weights.

    The PEFT model is held outside this module's parameters, so an env that freezes
    its reference model (``requires_grad_(False)``, ``eval()``) leaves the trainable
    adapters alone.
    """

    def __init__(self, peft_model: PeftModel):
        super().__init__()
        self._peft = [peft_model]  # a list: not registered as a submodule
        weight = peft_model.get_output_embeddings().weight
        self.anchor = nn.Parameter(torch.empty(0, device=weight.device, dtype=weight.dtype), requires_grad=False)

    @property
    def peft_model(self) -> PeftModel:
        return self._peft[0]

    @property
    def config(self):
        return self.peft_model.config

    def get_output_embeddings(self) -> nn.Module:
        return self.peft_model.get_output_embeddings()

    def get_input_embeddings(self) -> nn.Module:
        return self.peft_model.get_input_embeddings()

    def get_base_model(self) -> nn.Module:
        """The model under the adapters (whose forward's arguments the env's stepper reads)."""
        return self.peft_model.get_base_model()

    def forward(self, **inputs):
        with self.peft_model.disable_adapter():
            return self.peft_model(**inputs)
