"""The MCAD objective (DESIGN §3): contrastive, distribution-distillation and feature-distillation terms.

Every baseline of the ablation is a named preset of the same `MCADLoss`, so every comparison runs one code path:

    L = L_con + λ_dist · L_dist + λ_feat · L_feat

with the student's logits S_ij = exp(logit_scale) · <s^v_i, s^t_j> and the modified teacher of `teachers.py`:
v̂, t̂ = modified_features(v, t, P_v f, P_t f, α) and Ŝ = modified_similarity(v̂, t̂, τ_T, m, mask, β, τ_F).
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .teachers import modified_features, modified_similarity


class ContrastiveLoss(nn.Module):
    """
    L_con = ½ [CE(S, diag) + CE(Sᵀ, diag)], CLIP's InfoNCE over a batch of matching pairs.

    With `negative_text_embeds` (NegCLIP): each image's row of S gets extra columns, its scores against the hard
    negative captions (e.g. colour-swapped or relation-flipped captions); the text→image direction is unchanged.
    """

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        negative_text_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            image_embeds (`torch.Tensor` of shape `(B, d_S)`): L2-normalised student image embeddings.
            text_embeds (`torch.Tensor` of shape `(B, d_S)`): L2-normalised student text embeddings; row i
                describes image i.
            logit_scale (`torch.Tensor`): the student's log logit scale.
            negative_text_embeds (`torch.Tensor` of shape `(N, d_S)`, *optional*): hard negative captions.
        """
        logits = logit_scale.exp() * image_embeds @ text_embeds.t()
        negative_logits = None
        if negative_text_embeds is not None:
            negative_logits = logit_scale.exp() * image_embeds @ negative_text_embeds.t()
        return self.from_logits(logits, negative_logits)

    @staticmethod
    def from_logits(logits: torch.Tensor, negative_logits: torch.Tensor | None = None) -> torch.Tensor:
        """L_con from S (images × texts) and, for NegCLIP, each image's scores against the negatives."""
        targets = torch.arange(logits.shape[0], device=logits.device)
        image_to_text = logits if negative_logits is None else torch.cat([logits, negative_logits], dim=1)
        return (F.cross_entropy(image_to_text, targets) + F.cross_entropy(logits.t(), targets)) / 2


class DistributionDistillationLoss(nn.Module):
    """
    L_dist = ½ [KL(softmax_row(Ŝ) ‖ softmax_row(S)) + KL(softmax_col(Ŝ) ‖ softmax_col(S))]: the student's
    image→text and text→image similarity distributions follow the (modified) teacher's.

    Args:
        identity_mix (`float`, defaults to 0): γ; the teacher's distributions become (1 − γ)·softmax(Ŝ) + γ·I.
            A control (DESIGN §7): it sharpens the target without any teacher knowledge.
    """

    def __init__(self, identity_mix: float = 0.0):
        super().__init__()
        self.identity_mix = identity_mix

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student_logits (`torch.Tensor` of shape `(B, B)`): S, images × texts.
            teacher_logits (`torch.Tensor` of shape `(B, B)`): Ŝ, images × texts, already divided by τ_T.
        """
        rows = self._kl(teacher_logits, student_logits)
        columns = self._kl(teacher_logits.t(), student_logits.t())
        return (rows + columns) / 2

    def _kl(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        """KL(softmax(teacher) ‖ softmax(student)) per row, averaged over rows."""
        teacher_probs = teacher_logits.softmax(dim=-1)
        if self.identity_mix:
            identity = torch.eye(*teacher_probs.shape, device=teacher_probs.device, dtype=teacher_probs.dtype)
            teacher_probs = (1 - self.identity_mix) * teacher_probs + self.identity_mix * identity
        return F.kl_div(student_logits.log_softmax(dim=-1), teacher_probs, reduction="batchmean")


class FeatureDistillationLoss(nn.Module):
    """
    L_feat = ½ [‖W_v s^v_i − v̂_i‖² + ‖W_t s^t_i − t̂_i‖²], averaged over the batch: the student's embeddings,
    mapped by the training-only projections W (d_S → d_T), regress the modified teacher features. W is part of the
    objective, not of the student: it is never exported.

    Args:
        student_dim (`int`): d_S, the student's projection_dim.
        teacher_dim (`int`): d_T, the dual teacher's embedding dimension.
    """

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.image_projection = nn.Linear(student_dim, teacher_dim, bias=False)
        self.text_projection = nn.Linear(student_dim, teacher_dim, bias=False)

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        target_image_embeds: torch.Tensor,
        target_text_embeds: torch.Tensor,
    ) -> torch.Tensor:
        image_error = (self.image_projection(image_embeds) - target_image_embeds).pow(2).sum(dim=-1).mean()
        text_error = (self.text_projection(text_embeds) - target_text_embeds).pow(2).sum(dim=-1).mean()
        return (image_error + text_error) / 2


@dataclass
class ObjectiveSettings:
    """
    Every knob of the MCAD objective (DESIGN §3), in one place.

    Args:
        alpha (`float`): α, weight of the fusion teacher's adapted feature in v̂ = normalize(v + α·normalize(P_v f)).
            0 keeps the dual teacher's features.
        fusion_only (`bool`): targets from the adapted fused features alone (v̂ = normalize(P_v f)); `alpha` is
            then ignored.
        beta (`float`): β ∈ [0, 1], weight of the fusion teacher's match logits blended into Ŝ for each row's
            (and column's) top-k candidates. β > 0 needs the fusion teacher online during distillation.
        top_k (`int`): k, the candidates per row/column scored by the fusion teacher when β > 0 (B·k passes).
        teacher_temperature (`float`): τ_T, Ŝ_ij = <v̂_i, t̂_j> / τ_T.
        fusion_temperature (`float`): τ_F, the fusion logits enter Ŝ as m_ij / τ_F.
        lambda_dist (`float`): λ_dist, weight of L_dist.
        lambda_feat (`float`): λ_feat, weight of L_feat.
        identity_mix (`float`): γ, the sharpening control: teacher distributions mixed with the identity.
    """

    alpha: float = 1.0
    fusion_only: bool = False
    beta: float = 0.0
    top_k: int = 8
    teacher_temperature: float = 0.05
    fusion_temperature: float = 1.0
    lambda_dist: float = 1.0
    lambda_feat: float = 1.0
    identity_mix: float = 0.0

    @property
    def uses_teacher(self) -> bool:
        return bool(self.lambda_dist or self.lambda_feat)

    @property
    def uses_fusion_teacher(self) -> bool:
        return self.uses_teacher and (self.fusion_only or self.alpha != 0 or self.beta > 0)


# The ablation's settings (DESIGN §3, §7). Each is ObjectiveSettings with these fields changed.
#
# `mcad` distils the modified teacher *features* (α = 2, λ_dist = 0), chosen on mcad-shapes' validation split
# (BENCHMARKS.md, issue 8): a dual teacher is blind to relation flips, and the in-batch distributions of a batch of
# near-duplicates then tell the student that a caption and its place-swapped sibling's caption fit an image equally
# well. The distribution term (λ_dist = 1, also with β > 0: the fusion teacher ranks place swaps right 62-77% of
# the time) held the student at 52-55% on flips where the labels alone teach 99%; even λ_dist = 0.1 cost 16 points.
# `fusion_only` and `clip_kd_feature` are `mcad` without the dual teacher's and without the fusion teacher's part.
OBJECTIVE_PRESETS = {
    "contrastive": {"lambda_dist": 0.0, "lambda_feat": 0.0},
    "clip_kd": {"alpha": 0.0, "beta": 0.0},
    "clip_kd_feature": {"alpha": 0.0, "beta": 0.0, "lambda_dist": 0.0},
    "clip_kd_sharp": {"alpha": 0.0, "beta": 0.0, "teacher_temperature": 0.01},
    "clip_kd_identity": {"alpha": 0.0, "beta": 0.0, "identity_mix": 0.5},
    "affinity": {"alpha": 0.0, "lambda_feat": 0.0},
    "fusion_only": {"fusion_only": True, "lambda_dist": 0.0},
    "mcad": {"alpha": 2.0, "lambda_dist": 0.0},
}


def objective_settings(name: str, **overrides) -> ObjectiveSettings:
    """The settings of a named preset (`OBJECTIVE_PRESETS`), with knobs overridden by keyword."""
    if name not in OBJECTIVE_PRESETS:
        raise ValueError(f"Unknown objective {name!r}; choose one of {sorted(OBJECTIVE_PRESETS)}.")
    unknown = set(overrides) - set(asdict(ObjectiveSettings()))
    if unknown:
        raise ValueError(f"Unknown objective knob(s) {sorted(unknown)}; the knobs are {sorted(asdict(ObjectiveSettings()))}.")
    return ObjectiveSettings(**{**OBJECTIVE_PRESETS[name], **overrides})


@dataclass
class MCADLossOutput:
    loss: torch.Tensor
    contrastive: torch.Tensor
    distribution: torch.Tensor | None = None
    feature: torch.Tensor | None = None


class MCADLoss(ContrastiveLoss):
    """
    L = L_con + λ_dist · L_dist + λ_feat · L_feat, against the modified teacher of DESIGN §3.

    Args:
        settings ([`ObjectiveSettings`]): the knobs (see `objective_settings` for the named presets).
        student_dim (`int`): the student's projection_dim (for the training-only projections W of L_feat).
        teacher_dim (`int`): the dual teacher's embedding dimension.
    """

    def __init__(self, settings: ObjectiveSettings, student_dim: int, teacher_dim: int):
        super().__init__()
        self.settings = settings
        self.distribution_loss = DistributionDistillationLoss(settings.identity_mix)
        self.feature_loss = FeatureDistillationLoss(student_dim, teacher_dim) if settings.lambda_feat else None

    @classmethod
    def from_preset(cls, name: str, student_dim: int, teacher_dim: int, **overrides) -> "MCADLoss":
        return cls(objective_settings(name, **overrides), student_dim, teacher_dim)

    def teacher_targets(
        self,
        teacher_image_embeds: torch.Tensor,
        teacher_text_embeds: torch.Tensor,
        adapted_image_embeds: torch.Tensor | None = None,
        adapted_text_embeds: torch.Tensor | None = None,
        fusion_logits: torch.Tensor | None = None,
        fusion_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The modified teacher (v̂, t̂, Ŝ) from the teacher's pieces, with this objective's knobs."""
        s = self.settings
        if s.uses_fusion_teacher and adapted_image_embeds is None:
            raise ValueError("This objective uses the fusion teacher: pass adapted_image_embeds / adapted_text_embeds.")
        if adapted_image_embeds is None:
            image, text = teacher_image_embeds, teacher_text_embeds
        else:
            alpha = float("inf") if s.fusion_only else s.alpha
            image, text = modified_features(
                teacher_image_embeds, teacher_text_embeds, adapted_image_embeds, adapted_text_embeds, alpha
            )
        similarity = modified_similarity(
            image, text, s.teacher_temperature, fusion_logits, fusion_mask, s.beta, s.fusion_temperature
        )
        return image, text, similarity

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        teacher_image_embeds: torch.Tensor | None = None,
        teacher_text_embeds: torch.Tensor | None = None,
        adapted_image_embeds: torch.Tensor | None = None,
        adapted_text_embeds: torch.Tensor | None = None,
        fusion_logits: torch.Tensor | None = None,
        fusion_mask: torch.Tensor | None = None,
        negative_text_embeds: torch.Tensor | None = None,
    ) -> MCADLossOutput:
        """
        Args:
            image_embeds, text_embeds (`torch.Tensor` of shape `(B, d_S)`): the student's L2-normalised
                embeddings, gathered over processes; row i of each is pair i.
            logit_scale (`torch.Tensor`): the student's log logit scale.
            teacher_image_embeds, teacher_text_embeds (`torch.Tensor` of shape `(B, d_T)`, *optional*): v, t.
            adapted_image_embeds, adapted_text_embeds (`torch.Tensor` of shape `(B, d_T)`, *optional*): P_v f,
                P_t f, the fusion adapter's outputs for each positive pair.
            fusion_logits, fusion_mask (`torch.Tensor` of shape `(B, B)`, *optional*): the fusion teacher's match
                logits m_ij where the mask is set (β > 0).
            negative_text_embeds (`torch.Tensor` of shape `(N, d_S)`, *optional*): hard negatives for L_con.
        """
        s = self.settings
        scale = logit_scale.exp()
        student_logits = scale * image_embeds @ text_embeds.t()
        negative_logits = None if negative_text_embeds is None else scale * image_embeds @ negative_text_embeds.t()
        contrastive = self.from_logits(student_logits, negative_logits)
        if not s.uses_teacher:
            return MCADLossOutput(loss=contrastive, contrastive=contrastive)
        if teacher_image_embeds is None or teacher_text_embeds is None:
            raise ValueError("This objective distils a teacher: pass teacher_image_embeds and teacher_text_embeds.")

        with torch.no_grad():
            target_image, target_text, target_similarity = self.teacher_targets(
                teacher_image_embeds.float(),
                teacher_text_embeds.float(),
                None if adapted_image_embeds is None else adapted_image_embeds.float(),
                None if adapted_text_embeds is None else adapted_text_embeds.float(),
                fusion_logits,
                fusion_mask,
            )
        loss = contrastive
        distribution = feature = None
        if s.lambda_dist:
            distribution = self.distribution_loss(student_logits, target_similarity)
            loss = loss + s.lambda_dist * distribution
        if s.lambda_feat:
            feature = self.feature_loss(image_embeds, text_embeds, target_image, target_text)
            loss = loss + s.lambda_feat * feature
        return MCADLossOutput(loss=loss, contrastive=contrastive, distribution=distribution, feature=feature)
