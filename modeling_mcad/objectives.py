"""Every loss of the package, and the modified teacher (DESIGN §3).

The distillation objective, one `nn.Module` per term:

    L = L_con + λ_dist · L_dist + λ_feat · L_feat + λ_rank · L_rank

with the student's logits S_ij = exp(logit_scale) · <s^v_i, s^t_j> and the modified teacher

    v̂_i = normalize(v_i + α · normalize(P_v f_i))        t̂_i = normalize(t_i + α · normalize(P_t f_i))
    Ŝ_ij = <v̂_i, t̂_j> / τ_T,  and for the top-k candidates:  Ŝ_ij ← (1 − β) Ŝ_ij + β · m_ij / τ_F

and, with hard-negative captions (each caption's rule-made distractors, e.g. its colours swapped or its relation
flipped, or another image's caption the dual teacher ranks high for the image, `teacher_cache.mine_captions`),
L_rank ranks each image's caption against that caption's negatives as the fusion teacher does: KL(softmax(m_i· /
τ_F) ‖ softmax(S_i·)) over the candidates (the caption and its negatives), a listwise ranking distillation over hard
candidates scored by the cross-encoder (as CPRD, arXiv 2407.07479, distils a ranking).
With a match threshold, pairs whose caption the fusion teacher scores below it (m_ii < threshold: it judges them not
matching, as BLIP's CapFilt filters web captions with its ITM head) leave L_con and L_rank. With a correction margin,
a pair whose caption the fusion teacher scores below one of its hard negatives by at least the margin trades places
with that negative in L_con (a wrong caption corrected: the colour swap of a swapped caption is the true one), and
the match threshold reads the corrected caption's score; L_rank, a KL over the same candidates, is unchanged. With
`rank_where_teacher_agrees`, L_rank leaves out the pairs whose caption the fusion teacher does not score above every
one of its negatives: on clean labels those are the teacher's errors, and L_con's hard target alone stands there.

Every baseline of the ablation is a named preset of the same `MCADLoss` (`OBJECTIVE_PRESETS`), so every comparison
runs one code path, and `ObjectiveSettings` is the one home of the knobs: the adapter fit, the teacher cache and the
loss read the same α and τ_T. The teachers are trained with the same InfoNCE (`ContrastiveLoss`) and, for a
cross-encoder, the balanced image-text matching loss (`MatchingLoss`).
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

# --- The modified teacher: pure functions ----------------------------------------------------------------------------


def modified_features(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    adapted_image: torch.Tensor,
    adapted_text: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The modified teacher features v̂ = normalize(v + α·normalize(P_v f)), t̂ = normalize(t + α·normalize(P_t f)).

    Args:
        image_embeds, text_embeds (`torch.Tensor` of shape `(B, d_T)`): v, t, the dual teacher's L2-normalised
            embeddings.
        adapted_image, adapted_text (`torch.Tensor` of shape `(B, d_T)`): P_v f, P_t f, the adapter's outputs for
            each positive pair (any norm: only their direction counts).
        alpha (`float`): α ≥ 0. `0` returns v, t themselves (the dual teacher, exactly). `float("inf")` is the
            `fusion_only` baseline: the limit of the formula, v̂ = normalize(P_v f), t̂ = normalize(P_t f).
    """
    if alpha == 0:
        return image_embeds, text_embeds
    if math.isinf(alpha):
        return F.normalize(adapted_image, dim=-1), F.normalize(adapted_text, dim=-1)
    image = F.normalize(image_embeds + alpha * F.normalize(adapted_image, dim=-1), dim=-1)
    text = F.normalize(text_embeds + alpha * F.normalize(adapted_text, dim=-1), dim=-1)
    return image, text


def modified_similarity(
    mod_image: torch.Tensor,
    mod_text: torch.Tensor,
    teacher_temperature: float,
    fusion_logits: torch.Tensor | None = None,
    fusion_mask: torch.Tensor | None = None,
    beta: float = 0.0,
    fusion_temperature: float = 1.0,
) -> torch.Tensor:
    """
    The modified teacher similarity Ŝ (images × texts): Ŝ_ij = <v̂_i, t̂_j> / τ_T, and where `fusion_mask` is set,
    Ŝ_ij ← (1 − β)·Ŝ_ij + β·m_ij / τ_F.

    Args:
        mod_image, mod_text (`torch.Tensor` of shape `(B, d_T)`): v̂, t̂.
        teacher_temperature (`float`): τ_T.
        fusion_logits (`torch.Tensor` of shape `(B, B)`, *optional*): m_ij, the fusion teacher's match logits
            (read only where `fusion_mask` is set). Required when β > 0.
        fusion_mask (`torch.BoolTensor` of shape `(B, B)`, *optional*): the pairs the fusion teacher scored
            (`top_k_candidates`). `None`: every entry of `fusion_logits` is a score.
        beta (`float`): β ∈ [0, 1]; 0 ignores the fusion logits.
        fusion_temperature (`float`): τ_F.
    """
    similarity = mod_image @ mod_text.t() / teacher_temperature
    if beta == 0:
        return similarity
    if fusion_logits is None:
        raise ValueError("beta > 0 blends the fusion teacher's match logits into the similarity: pass fusion_logits "
                         "(and fusion_mask), e.g. from MCADTeacher.targets(...) with beta > 0, or set beta=0.")
    if fusion_logits.shape != similarity.shape:
        raise ValueError(f"fusion_logits has shape {tuple(fusion_logits.shape)}, the similarity "
                         f"{tuple(similarity.shape)}: they must cover the same images × texts.")
    blended = (1 - beta) * similarity + beta * fusion_logits.to(similarity.dtype) / fusion_temperature
    return blended if fusion_mask is None else torch.where(fusion_mask.bool(), blended, similarity)


def top_k_candidates(image_embeds: torch.Tensor, text_embeds: torch.Tensor, k: int) -> torch.Tensor:
    """
    The pairs the fusion teacher scores when β > 0: each image's k most similar texts and each text's k most similar
    images under the dual teacher, plus the diagonal (the positive pairs). The positives are always included: the
    fusion teacher runs on them anyway for their fused feature f_i, so they cost nothing extra, and a row's positive
    then sits on the same (fusion-blended) scale as the hard negatives it is ranked against.

    At most B·(2k + 1) pairs, usually about 2·B·k (the positive is normally among the top k), never B² for k ≪ B.

    Args:
        image_embeds, text_embeds (`torch.Tensor` of shape `(B, d_T)`): the dual teacher's v, t.
        k (`int`): candidates per image and per text (capped at B).

    Returns:
        `torch.BoolTensor` of shape `(B, B)`, images × texts.
    """
    similarity = image_embeds @ text_embeds.t()
    batch = similarity.shape[0]
    mask = torch.eye(batch, dtype=torch.bool, device=similarity.device)
    k = min(k, batch)
    if k > 0:
        mask.scatter_(1, similarity.topk(k, dim=1).indices, True)
        mask.scatter_(0, similarity.topk(k, dim=0).indices, True)
    return mask


def corrected_captions(
    text_embeds: torch.Tensor,
    negative_text_embeds: torch.Tensor | None,
    candidate_match_logits: torch.Tensor,
    margin: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.BoolTensor]:
    """
    Captions corrected by the fusion teacher: where it scores one of a pair's hard negatives at least `margin` above
    the pair's caption, that negative becomes the pair's caption and the caption takes its place among the negatives
    (the best-scored negative, where several are). Their scores trade places alike, so the caption's score stays first
    (the one a match threshold reads). A wrong caption whose distractor is the true one (web alt text with its
    colours swapped or its relation reversed; a rule-made distractor of a wrong caption undoes the error) is then
    learnt as the truth, not pushed away.

    Args:
        text_embeds (`torch.Tensor` of shape `(B, d)`): the captions' embeddings.
        negative_text_embeds (`torch.Tensor` of shape `(B·K, d)`): K hard negatives per pair, pair by pair; None
            when K = 0 (nothing is corrected).
        candidate_match_logits (`torch.Tensor` of shape `(B, 1 + K)`): the fusion teacher's match logits of image i
            with its caption and its K negatives, in that order.
        margin (`float`): how far (in match logits) a negative must score above the caption to replace it.

    Returns:
        `(text_embeds, negative_text_embeds, candidate_match_logits, corrected)`, the first three with the corrected
        pairs' caption and negative exchanged, and `corrected` (`torch.BoolTensor` of shape `(B,)`) the pairs that were.
    """
    batch, candidates = candidate_match_logits.shape
    if candidates == 1:  # no negatives (e.g. a canonical epoch without the flips): nothing to correct to
        return text_embeds, negative_text_embeds, candidate_match_logits, torch.zeros(batch, dtype=torch.bool,
                                                                                      device=text_embeds.device)
    if negative_text_embeds is None or len(negative_text_embeds) != batch * (candidates - 1):
        raise ValueError(f"candidate_match_logits has {candidates - 1} negative(s) per pair for {batch} pairs, so "
                         f"the correction needs {batch * (candidates - 1)} negative texts, pair by pair; got "
                         f"{0 if negative_text_embeds is None else len(negative_text_embeds)}.")
    negatives = negative_text_embeds.view(batch, candidates - 1, -1)
    best_score, best = candidate_match_logits[:, 1:].max(dim=1)
    corrected = best_score - candidate_match_logits[:, 0] >= margin
    # exchanged[i, c]: pair i's caption and its negative c trade places
    exchanged = F.one_hot(best, candidates - 1).bool() & corrected[:, None]
    new_text = torch.where(corrected[:, None], negatives[torch.arange(batch, device=best.device), best], text_embeds)
    new_negatives = torch.where(exchanged[..., None], text_embeds[:, None, :], negatives)
    caption_score = candidate_match_logits[:, :1]
    scores = torch.cat([torch.where(corrected[:, None], best_score[:, None], caption_score),
                        torch.where(exchanged, caption_score, candidate_match_logits[:, 1:])], dim=1)
    return new_text, new_negatives.reshape(batch * (candidates - 1), -1), scores, corrected


def teacher_agrees(candidate_match_logits: torch.Tensor) -> torch.BoolTensor:
    """
    The pairs whose caption the fusion teacher scores strictly above every one of its hard negatives (the pairs
    `rank_where_teacher_agrees` ranks; read after any correction).

    Args:
        candidate_match_logits (`torch.Tensor` of shape `(B, 1 + K)`): the fusion teacher's match logits of image i
            with its caption and its K negatives, in that order.

    Returns:
        `torch.BoolTensor` of shape `(B,)`.
    """
    return (candidate_match_logits[:, :1] > candidate_match_logits[:, 1:]).all(dim=1)


# --- Losses ----------------------------------------------------------------------------------------------------------


def info_nce(
    logits: torch.Tensor,
    negative_logits: torch.Tensor | None = None,
    image_ids: torch.Tensor | None = None,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    CLIP's symmetric InfoNCE on B positive pairs: ½ [CE(S, diag) + CE(Sᵀ, diag)].

    Args:
        logits (`torch.Tensor` of shape `(B, B)`): S, images × texts, pair i on the diagonal.
        negative_logits (`torch.Tensor` of shape `(B, N)`, *optional*): each image's scores against N extra negative
            texts (NegCLIP): extra columns of the image→text rows only.
        image_ids (`torch.LongTensor` of shape `(B,)`, *optional*): pairs sharing an image id are not each other's
            negatives (several captions of one image in a batch).
        positives (`torch.BoolTensor` of shape `(B,)`, *optional*): the pairs taken as positives (their rows and
            columns are averaged; the others are only negatives). None: all. No positive gives 0.
    """
    if image_ids is not None:
        same_image = image_ids[:, None] == image_ids[None, :]
        same_image.fill_diagonal_(False)
        logits = logits.masked_fill(same_image, float("-inf"))
    targets = torch.arange(len(logits), device=logits.device)
    image_to_text = logits if negative_logits is None else torch.cat([logits, negative_logits], dim=1)
    rows = F.cross_entropy(image_to_text, targets, reduction="none")
    columns = F.cross_entropy(logits.t(), targets, reduction="none")
    return mean_over(rows + columns, positives) / 2


def mean_over(values: torch.Tensor, positives: torch.Tensor | None) -> torch.Tensor:
    """The mean of per-pair `values` over the pairs where `positives` is set (all when None; 0 when none is)."""
    if positives is None:
        return values.mean()
    return (values * positives).sum() / positives.sum().clamp(min=1)


class ContrastiveLoss(nn.Module):
    """
    L_con = `info_nce`(S) with S_ij = exp(logit_scale) · <s^v_i, s^t_j>: CLIP's loss on a batch of matching pairs.

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
            image_embeds (`torch.Tensor` of shape `(B, d)`): L2-normalised image embeddings.
            text_embeds (`torch.Tensor` of shape `(B, d)`): L2-normalised text embeddings; row i describes image i.
            logit_scale (`torch.Tensor`): the log logit scale.
            negative_text_embeds (`torch.Tensor` of shape `(N, d)`, *optional*): hard negative captions.
        """
        return info_nce(*self.logits(image_embeds, text_embeds, logit_scale, negative_text_embeds))

    @staticmethod
    def logits(image_embeds, text_embeds, logit_scale, negative_text_embeds=None):
        """(S, the images' scores against the negatives or None)."""
        scale = logit_scale.exp()
        negative_logits = None if negative_text_embeds is None else scale * image_embeds @ negative_text_embeds.t()
        return scale * image_embeds @ text_embeds.t(), negative_logits


class MatchingLoss(nn.Module):
    """
    Image-text matching (a cross-encoder's ITM loss), balanced: ½ [mean over positives of softplus(−m) + mean over
    negatives of softplus(m)], with m the match logit (for a 2-way ITM head, logit(match) − logit(no match), so each
    term is that head's cross-entropy). However many negatives a positive gets, both classes weigh the same.
    """

    def forward(self, match_logits: torch.Tensor, is_positive: torch.Tensor) -> torch.Tensor:
        """
        Args:
            match_logits (`torch.Tensor` of shape `(pairs,)`): m for every scored pair.
            is_positive (`torch.BoolTensor` of shape `(pairs,)`): which pairs match.
        """
        positive = F.softplus(-match_logits[is_positive]).mean()
        negative = F.softplus(match_logits[~is_positive]).mean()
        return (positive + negative) / 2


class DistributionDistillationLoss(nn.Module):
    """
    L_dist = ½ [KL(softmax_row(Ŝ) ‖ softmax_row(S)) + KL(softmax_col(Ŝ) ‖ softmax_col(S))]: the student's
    image→text and text→image similarity distributions follow the (modified) teacher's.

    Args:
        identity_mix (`float`, defaults to 0): γ; the teacher's distributions become (1 − γ)·softmax(Ŝ) + γ·I.
            A control (DESIGN §9): it sharpens the target without any teacher knowledge.
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


class RankingDistillationLoss(nn.Module):
    """
    L_rank = mean over pairs i of KL(softmax(m_i / τ_F) ‖ softmax(S_i)), over each pair's candidates: its caption and
    its K hard-negative captions (rule-made distractors). m_i are the fusion teacher's match logits of image i with
    each candidate, S_i the student's logits of the same. Where the labels are right the teacher mostly agrees with
    NegCLIP's hard target; where a caption is wrong (one of its distractors is the true one), the teacher can say so.

    Args:
        fusion_temperature (`float`): τ_F.
    """

    def __init__(self, fusion_temperature: float = 1.0):
        super().__init__()
        self.fusion_temperature = fusion_temperature

    def forward(self, student_candidate_logits: torch.Tensor, teacher_candidate_logits: torch.Tensor,
                positives: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            student_candidate_logits (`torch.Tensor` of shape `(B, 1 + K)`): S_i over the candidates, the caption
                first.
            teacher_candidate_logits (`torch.Tensor` of shape `(B, 1 + K)`): m_i, the same candidates, same order.
            positives (`torch.BoolTensor` of shape `(B,)`, *optional*): the pairs averaged over (None: all; none: 0).
        """
        teacher_logits = teacher_candidate_logits.to(student_candidate_logits.dtype) / self.fusion_temperature
        teacher_probs = teacher_logits.softmax(dim=-1)
        per_pair = F.kl_div(student_candidate_logits.log_softmax(dim=-1), teacher_probs, reduction="none").sum(-1)
        return mean_over(per_pair, positives)


# How to turn off every knob of `ObjectiveSettings.match_score_knobs`, for the errors that refuse them.
MATCH_SCORES_OFF = "set lambda_rank to 0 and match_threshold and correction_margin to null"


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
        lambda_rank (`float`): λ_rank, weight of L_rank: needs hard-negative captions and the fusion teacher's match
            logits over them, which the teacher cache stores when the run names its negative captions.
        match_threshold (`float`, *optional*): pairs whose caption the fusion teacher scores below this match logit
            are no positives of L_con and L_rank (BLIP's CapFilt filter: a noisy caption out); None keeps every
            pair. The scores come from the teacher cache.
        correction_margin (`float`, *optional*): a pair whose caption the fusion teacher scores at least this far
            below one of its hard negatives takes that negative as its caption in L_con, the caption as a negative
            (`corrected_captions`; a match threshold then reads the corrected caption's score); None corrects none.
            Needs the negatives and their cached scores, and λ_dist = 0: L_dist's teacher distributions are those
            of the captions as given.
        rank_where_teacher_agrees (`bool`): L_rank averages only over the pairs whose caption the fusion teacher
            scores above every one of its hard negatives (after any correction): where the labels are clean and the
            teacher ranks a distractor first, it is the teacher that is wrong. Needs λ_rank > 0.
        ranking_only_steps (`int`): the first optimizer steps of a run train on L_rank alone, a ranking warm-up
            (the training loop passes `ranking_only` to `MCADLoss` while they last). 0: none. Needs λ_rank > 0. In
            canonical epochs L_rank ranks without the flipped and mined captions, as L_con contrasts without them.
            From a random student it only costs: L_rank alone does not move before the student tells the shapes and
            colours its candidates share apart (DESIGN §3.6).
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
    lambda_rank: float = 0.0
    match_threshold: float | None = None
    correction_margin: float | None = None
    rank_where_teacher_agrees: bool = False
    ranking_only_steps: int = 0
    identity_mix: float = 0.0

    def __post_init__(self):
        if not self.alpha >= 0:
            raise UserError(f"alpha must be >= 0 (0: the dual teacher only), got {self.alpha!r}.")
        if not 0 <= self.beta <= 1:
            raise UserError(f"beta must be in [0, 1], got {self.beta!r}.")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise UserError(f"top_k must be an integer >= 0, got {self.top_k!r}.")
        if not self.lambda_rank >= 0:
            raise UserError(f"lambda_rank must be >= 0 (0: no ranking distillation), got {self.lambda_rank!r}.")
        if self.match_threshold is not None and not math.isfinite(self.match_threshold):
            raise UserError(f"match_threshold must be a finite match logit or null (keep every pair), got "
                            f"{self.match_threshold!r}.")
        if self.correction_margin is not None and not (math.isfinite(self.correction_margin)
                                                        and self.correction_margin >= 0):
            raise UserError(f"correction_margin must be a finite match logit margin >= 0 or null (correct no caption), "
                            f"got {self.correction_margin!r}.")
        if self.correction_margin is not None and self.lambda_dist:
            raise UserError("correction_margin changes the captions L_con contrasts, while L_dist's teacher "
                            "distributions are those of the captions as given (the cached teacher features): set "
                            "lambda_dist to 0, or correction_margin to null.")
        if self.rank_where_teacher_agrees and not self.lambda_rank:
            raise UserError("rank_where_teacher_agrees chooses the pairs L_rank ranks: set lambda_rank > 0, or "
                            "rank_where_teacher_agrees to false.")
        if type(self.ranking_only_steps) is not int or self.ranking_only_steps < 0:  # a bool is no step count
            raise UserError(f"ranking_only_steps must be an integer >= 0 (0: no ranking warm-up), got "
                            f"{self.ranking_only_steps!r}.")
        if self.ranking_only_steps and not self.lambda_rank:
            raise UserError("ranking_only_steps trains on L_rank alone first: set lambda_rank > 0 (with "
                            "--negative_captions), or ranking_only_steps to 0.")
        if self.uses_match_scores and self.beta > 0:
            raise UserError(f"{', '.join(self.match_score_knobs)} read(s) the fusion teacher's scores from the "
                            f"teacher cache, which an objective with beta > 0 does not use: set beta to 0, or "
                            f"{MATCH_SCORES_OFF}.")
        for name in ("teacher_temperature", "fusion_temperature"):
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be > 0, got {getattr(self, name)!r}.")

    @property
    def feature_alpha(self) -> float:
        """The α that `modified_features` applies: `inf` for `fusion_only` (the adapted fused features alone)."""
        return float("inf") if self.fusion_only else self.alpha

    def modified_features(self, image_embeds, text_embeds, adapted_image, adapted_text):
        """v̂, t̂ with these settings' α (see `modified_features`)."""
        return modified_features(image_embeds, text_embeds, adapted_image, adapted_text, self.feature_alpha)

    def modified_similarity(self, mod_image, mod_text, fusion_logits=None, fusion_mask=None):
        """Ŝ with these settings' τ_T, β, τ_F (see `modified_similarity`)."""
        return modified_similarity(mod_image, mod_text, self.teacher_temperature, fusion_logits, fusion_mask,
                                   self.beta, self.fusion_temperature)

    @property
    def uses_teacher(self) -> bool:
        return bool(self.lambda_dist or self.lambda_feat or self.uses_match_scores)

    @property
    def uses_fusion_teacher(self) -> bool:
        """Whether the loss reads anything of the fusion teacher (its adapted features, its match logits), not only
        the dual teacher's v, t: what a result depends on when only one of the teachers changes."""
        return self.uses_teacher and (self.feature_alpha != 0 or self.beta > 0 or self.uses_match_scores)

    @property
    def match_score_knobs(self) -> list[str]:
        """The knobs set that read the fusion teacher's cached match logits (`candidate_match_logits`), as
        `name=value`: λ_rank > 0, a match threshold, a correction margin."""
        knobs = {"lambda_rank": self.lambda_rank or None, "match_threshold": self.match_threshold,
                 "correction_margin": self.correction_margin}
        return [f"{name}={value}" for name, value in knobs.items() if value is not None]

    @property
    def uses_match_scores(self) -> bool:
        """Whether the loss reads the fusion teacher's cached match logits (`candidate_match_logits`)."""
        return bool(self.match_score_knobs)


# The ablation's settings (DESIGN §3, §9). Each is ObjectiveSettings with these fields changed.
#
# `mcad` is the paper's objective: the modified teacher's features and similarity distributions (α = 2, λ_dist =
# λ_feat = 1). `mcad_feature` distils the modified features alone (λ_dist = 0); the demo uses it, chosen on
# mcad-shapes' validation split (DESIGN §3.5): a dual teacher is blind to relation flips, and the in-batch
# distributions of a batch of near-duplicates then tell the student that a caption and its place-swapped sibling's
# caption fit an image equally well, which held the student at 52-57% on flips where the labels alone teach 99%.
# `mcad_feature_rank` adds L_rank: the fusion teacher's ranking of each caption against its hard negatives (run it
# with the negative captions named); `mcad_feature_rank_filter` also leaves out of L_con and L_rank the pairs the
# fusion teacher's ITM head scores below a logit of 8 (on mcad-shapes its true pairs score 11.4-12.6, 1st-99th
# percentile, and most captions of another image below 8). `fusion_only` and `clip_kd_feature` are `mcad_feature`
# without the dual teacher's and without the fusion teacher's part.
OBJECTIVE_PRESETS = {
    "contrastive": {"lambda_dist": 0.0, "lambda_feat": 0.0},
    "clip_kd": {"alpha": 0.0, "beta": 0.0},
    "clip_kd_feature": {"alpha": 0.0, "beta": 0.0, "lambda_dist": 0.0},
    "clip_kd_sharp": {"alpha": 0.0, "beta": 0.0, "teacher_temperature": 0.01},
    "clip_kd_identity": {"alpha": 0.0, "beta": 0.0, "identity_mix": 0.5},
    "affinity": {"alpha": 0.0, "lambda_feat": 0.0},
    "fusion_only": {"fusion_only": True, "lambda_dist": 0.0},
    "mcad": {"alpha": 2.0},
    "mcad_feature": {"alpha": 2.0, "lambda_dist": 0.0},
    "mcad_feature_rank": {"alpha": 2.0, "lambda_dist": 0.0, "lambda_rank": 1.0},
    "mcad_feature_rank_filter": {"alpha": 2.0, "lambda_dist": 0.0, "lambda_rank": 1.0, "match_threshold": 8.0},
}


def objective_settings(name: str, **overrides) -> ObjectiveSettings:
    """The settings of a named preset (`OBJECTIVE_PRESETS`), with knobs overridden by keyword."""
    if name not in OBJECTIVE_PRESETS:
        raise UserError(f"Unknown objective {name!r}; choose one of {sorted(OBJECTIVE_PRESETS)}.")
    unknown = set(overrides) - set(asdict(ObjectiveSettings()))
    if unknown:
        raise UserError(f"Unknown objective knob(s) {sorted(unknown)}; the knobs are "
                        f"{sorted(asdict(ObjectiveSettings()))}.")
    return ObjectiveSettings(**{**OBJECTIVE_PRESETS[name], **overrides})


@dataclass
class MCADLossOutput:
    loss: torch.Tensor
    contrastive: torch.Tensor
    distribution: torch.Tensor | None = None
    feature: torch.Tensor | None = None
    ranking: torch.Tensor | None = None
    kept_fraction: torch.Tensor | None = None  # with a match threshold: the share of the batch kept as positives
    corrected_fraction: torch.Tensor | None = None  # with a correction margin: the share of captions corrected
    ranked_fraction: torch.Tensor | None = None  # with rank_where_teacher_agrees: the share of pairs L_rank ranks


class MCADLoss(ContrastiveLoss):
    """
    L = L_con + λ_dist · L_dist + λ_feat · L_feat + λ_rank · L_rank, against the modified teacher of DESIGN §3 (L =
    L_rank alone in a ranking warm-up: `ranking_only`); with a match threshold, L_con and L_rank average over the pairs
    the fusion teacher scores at or above it; with a correction margin, L_con contrasts the captions it corrects
    (`corrected_captions`); with `rank_where_teacher_agrees`, L_rank averages over the pairs whose caption the teacher
    scores above its negatives.

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
        self.ranking_loss = RankingDistillationLoss(settings.fusion_temperature) if settings.lambda_rank else None

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
        if s.feature_alpha != 0 and adapted_image_embeds is None:
            raise ValueError("This objective's targets read the fusion teacher's adapted features: pass "
                             "adapted_image_embeds / adapted_text_embeds.")
        if adapted_image_embeds is None:
            image, text = teacher_image_embeds, teacher_text_embeds
        else:
            image, text = s.modified_features(teacher_image_embeds, teacher_text_embeds, adapted_image_embeds,
                                              adapted_text_embeds)
        return image, text, s.modified_similarity(image, text, fusion_logits, fusion_mask)

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
        candidate_match_logits: torch.Tensor | None = None,
        ranking_only: bool = False,
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
            negative_text_embeds (`torch.Tensor` of shape `(B·K, d_S)`, *optional*): hard negatives for L_con (and
                L_rank): K per pair, pair by pair.
            candidate_match_logits (`torch.Tensor` of shape `(B, 1 + K)`, *optional*): the fusion teacher's match
                logits of image i with its caption and with its K hard negatives, in that order (for L_rank, the
                match threshold and the correction).
            ranking_only (`bool`): the loss is L_rank alone (the first `ranking_only_steps` of a run); the other
                terms are still computed and reported.
        """
        s = self.settings
        if ranking_only and not s.lambda_rank:
            raise ValueError("ranking_only trains on L_rank alone, and this objective has lambda_rank = 0: pass "
                             "ranking_only=False, or settings with lambda_rank > 0.")
        contrasted_text, corrected = text_embeds, None  # L_feat regresses each caption's own target, corrected or not
        if s.correction_margin is not None:
            if candidate_match_logits is None:
                raise ValueError("correction_margin corrects a caption by its hard negatives' match logits: pass "
                                 "negative_text_embeds and the fusion teacher's candidate_match_logits.")
            contrasted_text, negative_text_embeds, candidate_match_logits, corrected = corrected_captions(
                text_embeds, negative_text_embeds, candidate_match_logits, s.correction_margin)
        student_logits, negative_logits = self.logits(image_embeds, contrasted_text, logit_scale,
                                                      negative_text_embeds)
        positives = kept = None
        if s.match_threshold is not None:  # the pairs the fusion teacher judges matching stay positives
            if candidate_match_logits is None:
                raise ValueError("match_threshold filters pairs by the fusion teacher's match logits: pass "
                                 "candidate_match_logits (its score of each pair's caption first).")
            positives = candidate_match_logits[:, 0] >= s.match_threshold
            kept = positives.float().mean()
        contrastive = info_nce(student_logits, negative_logits, positives=positives)
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
        ranking = ranked = None
        if s.lambda_rank:
            batch, candidates = (0, 0) if candidate_match_logits is None else candidate_match_logits.shape
            if candidate_match_logits is None or (candidates > 1 and negative_logits is None):
                raise ValueError("lambda_rank > 0 ranks each caption against its hard negatives: pass "
                                 "negative_text_embeds and the fusion teacher's candidate_match_logits.")
            student_candidates = student_logits.diagonal()[:, None]
            if candidates > 1 and negative_logits.shape[1] != batch * (candidates - 1):
                raise ValueError(f"candidate_match_logits has {candidates - 1} negative(s) per pair, so the "
                                 f"{batch} pairs need {batch * (candidates - 1)} negative texts, pair by pair; "
                                 f"got {negative_logits.shape[1]}.")
            if candidates > 1:  # image i's own negatives: columns i·K … i·K + K − 1 of its row of negative_logits
                own = negative_logits.view(batch, batch, candidates - 1)[torch.arange(batch), torch.arange(batch)]
                student_candidates = torch.cat([student_candidates, own], dim=1)
            ranked = positives
            if s.rank_where_teacher_agrees:  # the caption strictly first; elsewhere L_con's hard target stands alone
                agrees = teacher_agrees(candidate_match_logits)
                ranked = agrees if positives is None else positives & agrees
            ranking = self.ranking_loss(student_candidates, candidate_match_logits, ranked)
            if ranking_only:  # the other terms are reported only; the loss's own parameters (L_feat's W) join at
                # weight 0, since DDP expects a gradient for every parameter at every step (a weight-0 term could
                # still make the loss non-finite, the parameters cannot)
                loss = ranking + 0.0 * sum(parameter.sum() for parameter in self.parameters())
            else:
                loss = loss + s.lambda_rank * ranking
        return MCADLossOutput(loss=loss, contrastive=contrastive, distribution=distribution, feature=feature,
                              ranking=ranking, kept_fraction=kept,
                              corrected_fraction=None if corrected is None else corrected.float().mean(),
                              ranked_fraction=ranked.float().mean() if s.rank_where_teacher_agrees else None)


__all__ = [
    "OBJECTIVE_PRESETS",
    "ContrastiveLoss",
    "DistributionDistillationLoss",
    "FeatureDistillationLoss",
    "MCADLoss",
    "MCADLossOutput",
    "MatchingLoss",
    "ObjectiveSettings",
    "RankingDistillationLoss",
    "corrected_captions",
    "info_nce",
    "modified_features",
    "modified_similarity",
    "objective_settings",
    "teacher_agrees",
    "top_k_candidates",
]
