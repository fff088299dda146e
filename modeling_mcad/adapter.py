"""Fitting the fusion adapter P_v, P_t (DESIGN §4) with both teachers frozen.

`compute_adapter_features` runs both frozen teachers once over the training pairs (v, t and f per pair);
`fit_adapter` then fits the adapter on those features alone, with the objective's own α and τ_T
(`ObjectiveSettings`), so the adapter is fitted for the modified teacher the student will distil.

    features = compute_adapter_features(teacher, loader)          # loader: batches of the ImageTextCollator
    fit = fit_adapter(teacher, features, objective_settings("mcad"))
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .cross_encoders import FusedParts
from .errors import UserError
from .objectives import ObjectiveSettings, info_nce
from .optimization import TrainingStep, adamw_with_cosine
from .teachers import PROCESSOR_NAMES, FusionAdapter, MCADTeacher, check_adapter_objective
from .utils import progress


@dataclass
class AdapterFeatures(FusedParts):
    """
    Per-pair features for fitting the adapter, computed once with the frozen teachers (`compute_adapter_features`).
    Row i of every tensor is pair i. Fit on pairs held out from distillation by passing `features.select(held_out)`.

    Args:
        image_embeds, text_embeds (`torch.Tensor` of shape `(N, d_T)`): v, t.
        fused (`torch.Tensor` of shape `(N, d_F)`): f of each positive pair.
        fused_image, fused_text (`torch.Tensor`, *optional*): the image / text parts of f, for models that give them.
        image_ids (`torch.LongTensor` of shape `(N,)`, *optional*): pairs with the same id share an image (several
            captions per image) and are never treated as each other's negatives.
    """

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    fused: torch.Tensor
    fused_image: torch.Tensor | None = None
    fused_text: torch.Tensor | None = None
    image_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.image_embeds)

    def select(self, index) -> "AdapterFeatures":
        """The pairs at `index` (indices, a boolean mask or a slice)."""
        return AdapterFeatures(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                                  for f in fields(self)})

    def to(self, device) -> "AdapterFeatures":
        return AdapterFeatures(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                                  for f in fields(self)})


@torch.no_grad()
def compute_adapter_features(teacher: MCADTeacher, batches: Iterable[Mapping]) -> AdapterFeatures:
    """
    One pass of both frozen teachers over collated batches: v, t and f for every positive pair, on the CPU.

    Args:
        teacher ([`MCADTeacher`]).
        batches (iterable of `Mapping`): each with `"dual"` and `"fusion"` entries, the inputs built with
            `teacher.processors["dual"]` / `["fusion"]` from the same images and captions (e.g. a DataLoader over
            the collator), and optionally `"image_index"` (pairs of one image are not each other's negatives).
    """
    collected: dict[str, list[torch.Tensor]] = {}
    for batch in progress(batches, total=len(batches) if hasattr(batches, "__len__") else None,
                          desc="adapter features"):
        for name in PROCESSOR_NAMES:
            if name not in batch:
                raise ValueError(f"Each batch needs a {name!r} entry: the inputs made with "
                                 f"teacher.processors[{name!r}].")
        dual, fusion_inputs = batch["dual"], batch["fusion"]
        fusion = teacher.fuse(fusion_inputs["pixel_values"], fusion_inputs["input_ids"],
                              fusion_inputs.get("attention_mask"))
        row = {
            "image_embeds": teacher.encode_images(dual["pixel_values"]),
            "text_embeds": teacher.encode_texts(dual["input_ids"], dual.get("attention_mask")),
            "fused": fusion.fused, "fused_image": fusion.fused_image, "fused_text": fusion.fused_text,
            "image_ids": batch.get("image_index"),
        }
        for key, value in row.items():
            if value is not None:
                collected.setdefault(key, []).append(value.cpu() if key == "image_ids" else value.float().cpu())
    if not collected:
        raise ValueError("compute_adapter_features got no batches.")
    return AdapterFeatures(**{key: torch.cat(values) for key, values in collected.items()})


def adapter_contrastive_logits(
    objective: str,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    adapted_image: torch.Tensor,
    adapted_text: torch.Tensor,
    settings: ObjectiveSettings,
) -> list[torch.Tensor]:
    """
    The score matrices (images × texts, divided by τ_T) that a contrastive adapter objective puts InfoNCE on, with
    the objective's α. Row i, column j of each is one score.

    - `one_sided`: [<v̂_i, t_j>, <v_i, t̂_j>] — the fused feature enters each score on one side only, so the positive
      score <v̂_i, t_i> cannot be raised by making P_v f_i and P_t f_i agree with each other (no pair fingerprint).
    - `two_sided`: [<v̂_i, t̂_j>] — f_i on both sides of the positive score.
    """
    modified_image, modified_text = settings.modified_features(image_embeds, text_embeds, adapted_image, adapted_text)
    temperature = settings.teacher_temperature
    if objective == "one_sided":
        return [modified_image @ text_embeds.t() / temperature, image_embeds @ modified_text.t() / temperature]
    if objective == "two_sided":
        return [modified_image @ modified_text.t() / temperature]
    raise UserError(f"{objective!r} is not a contrastive adapter objective; use 'one_sided' or 'two_sided'.")


def adapter_loss(adapter: FusionAdapter, features: AdapterFeatures, objective: str,
                 settings: ObjectiveSettings) -> torch.Tensor:
    """
    The adapter-fit loss on a batch of features (DESIGN §4):

    - `regression`: ½ [(1 − cos(P_v f, v)) + (1 − cos(P_t f, t))], averaged over pairs. Cosine, not MSE: the modified
      features use only the direction of P f.
    - `one_sided`: the mean of InfoNCE(v̂, t) and InfoNCE(v, t̂).
    - `two_sided`: InfoNCE(v̂, t̂).
    """
    check_adapter_objective(objective)
    adapted_image, adapted_text = adapter(features.image_part(), features.text_part())
    if objective == "regression":
        image_error = 1 - F.cosine_similarity(adapted_image, features.image_embeds, dim=-1).mean()
        text_error = 1 - F.cosine_similarity(adapted_text, features.text_embeds, dim=-1).mean()
        return (image_error + text_error) / 2
    if settings.feature_alpha == 0:
        raise UserError(f"The {objective} adapter objective trains the adapter through v̂, t̂, which ignore it at "
                        "alpha=0; fit with the settings of an objective that reads the fusion teacher (alpha > 0 or "
                        "fusion_only) or use adapter_objective='regression'.")
    logits = adapter_contrastive_logits(objective, features.image_embeds, features.text_embeds, adapted_image,
                                        adapted_text, settings)
    return torch.stack([info_nce(scores, image_ids=features.image_ids) for scores in logits]).mean()


@dataclass
class AdapterFit:
    """
    Result of `fit_adapter`.

    Args:
        objective (`str`): the adapter objective fitted.
        losses (`list[float]`): the loss at every step.
        dual_recall_at_1 (`float`): in-batch R@1 (mean of image→text and text→image) of the dual teacher, v·t, on
            the fitted features.
        modified_recall_at_1 (`float`): the same for the modified teacher, v̂·t̂, after the fit. Far above
            `dual_recall_at_1` on the fitted pairs is a sign of sharpening (DESIGN §4): compare on held-out pairs
            with `in_batch_recall_at_1`.
    """

    objective: str
    losses: list[float]
    dual_recall_at_1: float
    modified_recall_at_1: float


def fit_adapter(
    teacher: MCADTeacher,
    features: AdapterFeatures,
    settings: ObjectiveSettings,
    objective: str | None = None,
    steps: int = 500,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
) -> AdapterFit:
    """
    Fit the fusion adapter P_v, P_t with both teachers frozen, on precomputed per-pair features (running the
    teachers once, not once per step). Each step draws `batch_size` random pairs; AdamW without weight decay, cosine
    schedule (`optimization.py`). Records the settings it fitted with in `teacher.config.adapter_fit`.

    Args:
        teacher ([`MCADTeacher`]): its adapter is trained in place; everything else stays frozen.
        features ([`AdapterFeatures`]): from `compute_adapter_features`; pass held-out pairs to fit on pairs the
            distillation will not see.
        settings ([`ObjectiveSettings`]): the objective the student will distil: its α and τ_T shape v̂, t̂ here.
        objective (`str`, *optional*): `regression`, `one_sided` or `two_sided` (see `adapter_loss`); default the
            config's `adapter_objective`.
        steps, lr, batch_size, seed: the optimisation.
    """
    objective = teacher.config.adapter_objective if objective is None else objective
    check_adapter_objective(objective)
    if len(features) < 2:
        raise ValueError(f"fit_adapter needs at least 2 pairs of features, got {len(features)}.")
    generator = torch.Generator().manual_seed(seed)
    losses = []
    adapter = teacher.adapter
    adapter.requires_grad_(True)
    try:
        step = TrainingStep(adapter, *adamw_with_cosine(adapter, lr, steps), max_grad_norm=None)
        for _ in progress(range(steps), desc="adapter fit"):
            batch = features.select(torch.randperm(len(features), generator=generator)[:batch_size]).to(teacher.device)
            loss = adapter_loss(adapter, batch, objective, settings)
            step(loss)
            losses.append(loss.item())
    finally:
        adapter.requires_grad_(False)
    teacher.config.adapter_fit = {"objective": objective, **adapter_fit_record(settings)}
    dual_recall, modified_recall = in_batch_recall_at_1(teacher, features, settings, batch_size=batch_size)
    return AdapterFit(objective, losses, dual_recall, modified_recall)


def adapter_fit_record(settings: ObjectiveSettings) -> dict:
    """The settings that shape a fitted adapter (what `teacher.config.adapter_fit` records besides the objective)."""
    return {"alpha": settings.alpha, "fusion_only": settings.fusion_only,
            "teacher_temperature": settings.teacher_temperature}


@torch.no_grad()
def in_batch_recall_at_1(teacher: MCADTeacher, features: AdapterFeatures, settings: ObjectiveSettings,
                         batch_size: int = 256) -> tuple[float, float]:
    """
    In-batch R@1 (mean of image→text and text→image, over consecutive batches of `batch_size` pairs) of the dual
    teacher (v·t) and of the modified teacher (v̂·t̂, with the settings' α) on `features`. A retrieved pair that
    shares the query's image (`image_ids`) counts as a hit.
    """
    hits = {"dual": 0.0, "modified": 0.0}
    for start in range(0, len(features), batch_size):
        batch = features.select(slice(start, start + batch_size)).to(teacher.device)
        ids = batch.image_ids if batch.image_ids is not None else torch.arange(len(batch), device=teacher.device)
        adapted_image, adapted_text = teacher.adapter(batch.image_part(), batch.text_part())
        modified = settings.modified_features(batch.image_embeds, batch.text_embeds, adapted_image, adapted_text)
        for name, (image, text) in (("dual", (batch.image_embeds, batch.text_embeds)), ("modified", modified)):
            scores = image @ text.t()
            image_to_text = (ids[scores.argmax(dim=1)] == ids).sum().item()
            text_to_image = (ids[scores.argmax(dim=0)] == ids).sum().item()
            hits[name] += (image_to_text + text_to_image) / 2
    return hits["dual"] / len(features), hits["modified"] / len(features)


__all__ = [
    "AdapterFeatures",
    "AdapterFit",
    "adapter_contrastive_logits",
    "adapter_fit_record",
    "adapter_loss",
    "compute_adapter_features",
    "fit_adapter",
    "in_batch_recall_at_1",
]
