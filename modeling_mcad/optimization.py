"""The one optimisation recipe of every training loop in the package (teachers, fusion adapter, student).

- `adamw_with_cosine(module, ...)`: AdamW over two parameter groups — weight decay on matrices, none on
  one-dimensional tensors (biases, norms, position vectors) and on CLIP's `logit_scale` (nanoGPT's and open_clip's
  rule) — and a cosine schedule with linear warm-up.
- `autocast(device, dtype)`: mixed precision for a forward pass; `mixed_precision_dtype("auto" | "bf16" | "no")`
  resolves a run's setting, "auto" taking bf16 where the device computes it natively (a CUDA GPU with bf16, a CPU
  with AMX) — about twice the speed of float32 for the teachers' training there, and slower than float32 elsewhere.
- `TrainingStep`: one optimiser step from a loss — backward, gradient clipping, step, schedule, zeroed gradients,
  and every trained `logit_scale` clamped to CLIP's [0, ln 100] (a larger scale saturates the softmax). It runs the same
  with or without Accelerate (with an `Accelerator`, backward and clipping go through it and a step only happens
  when gradients are synchronised).

    optimizer, scheduler = adamw_with_cosine(model, lr=5e-4, total_steps=1000, weight_decay=0.05, warmup_steps=50)
    step = TrainingStep(model, optimizer, scheduler, max_grad_norm=1.0)
    for batch in batches:
        step(loss_of(batch))
"""

import contextlib
import math

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from .errors import UserError

LOGIT_SCALE_RANGE = (0.0, math.log(100))


def _is_logit_scale(name: str) -> bool:
    return name.split(".")[-1] == "logit_scale"


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """
    The trainable parameters of `module` in two AdamW groups: matrices (and higher) with `weight_decay`; vectors,
    scalars and `logit_scale` without. Frozen parameters are left out.
    """
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 or _is_logit_scale(name) else decay).append(parameter)
    if not decay and not no_decay:
        raise ValueError(f"{type(module).__name__} has no trainable parameter to optimise.")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw_with_cosine(
    module: nn.Module,
    lr: float,
    total_steps: int,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """
    AdamW over `parameter_groups(module, weight_decay)` and a cosine schedule from `lr` to 0 over `total_steps`,
    after `warmup_steps` of linear warm-up.
    """
    if total_steps < 1:
        raise UserError(f"total_steps must be >= 1, got {total_steps}: the data gives no full batch. Lower batch_size "
                        "or train on more data.")
    optimizer = torch.optim.AdamW(parameter_groups(module, weight_decay), lr=lr)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, min(warmup_steps, total_steps), total_steps)


MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


def native_bf16(device: torch.device | str) -> bool:
    """
    Whether `device` computes bfloat16 matrix products faster than float32: a GPU that supports bf16, or a CPU with
    AMX tiles. AVX-512 BF16 alone is not enough: on a 2-core machine with AVX-512 BF16 and no AMX the teachers'
    bf16 autocast steps took 1.5-1.6× their float32 time (benchmarks/teacher_step.py); where the demo's recipe was
    measured, 0.5×.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch's own check, private but present since 2.3
    return device.type == "cpu" and amx is not None and amx()


def mixed_precision_dtype(mixed_precision: str, device: torch.device | str) -> torch.dtype | None:
    """
    The autocast dtype of a mixed-precision setting: `"no"` → None (float32), `"bf16"`, `"fp16"`, and `"auto"` →
    bf16 where `device` computes it natively (`native_bf16`), else None.
    """
    if mixed_precision not in MIXED_PRECISION:
        raise UserError(f"mixed precision {mixed_precision!r} is not one of {MIXED_PRECISION}.")
    if mixed_precision == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """`torch.autocast` on `device` with `dtype` for a forward pass (weights and optimiser stay float32); a no-op
    context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class TrainingStep:
    """
    One optimiser step from a loss: backward, clip the gradient norm to `max_grad_norm` (None: no clipping),
    optimizer and scheduler step, zero the gradients, clamp every `logit_scale` parameter to `LOGIT_SCALE_RANGE`.

    Args:
        module (`nn.Module`): the trained module (as prepared by Accelerate, when it is used).
        optimizer, scheduler: from `adamw_with_cosine` (prepared by Accelerate, when it is used).
        max_grad_norm (`float`, *optional*): the clipping threshold.
        accelerator (`accelerate.Accelerator`, *optional*): backward and clipping go through it; with gradient
            accumulation, clipping waits for the synchronising step (Accelerate's optimizer and scheduler skip
            the others themselves).
    """

    def __init__(self, module: nn.Module, optimizer, scheduler, max_grad_norm: float | None = 1.0, accelerator=None):
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.max_grad_norm, self.accelerator = max_grad_norm, accelerator
        self.logit_scales = [parameter for name, parameter in module.named_parameters()
                             if _is_logit_scale(name) and parameter.requires_grad]

    def __call__(self, loss: torch.Tensor) -> None:
        accelerator = self.accelerator
        if accelerator is None:
            loss.backward()
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
        else:
            accelerator.backward(loss)
            if self.max_grad_norm is not None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for logit_scale in self.logit_scales:
                logit_scale.clamp_(*LOGIT_SCALE_RANGE)

    def skip(self) -> None:
        """Drop this step's gradients without stepping (a non-finite loss)."""
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


__all__ = ["LOGIT_SCALE_RANGE", "MIXED_PRECISION", "TrainingStep", "adamw_with_cosine", "autocast",
           "mixed_precision_dtype", "native_bf16", "parameter_groups"]
