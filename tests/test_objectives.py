"""MCADLoss, term by term, against values computed by hand on a 3×3 example."""

import math

import pytest
import torch

from modeling_mcad.objectives import (
    OBJECTIVE_PRESETS,
    ContrastiveLoss,
    DistributionDistillationLoss,
    FeatureDistillationLoss,
    MCADLoss,
    modified_features,
    objective_settings,
)

# Three pairs in 2-D, easy to follow on paper. Student embeddings (unit vectors):
S_IMAGE = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
S_TEXT = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]
SCALE = 2.0  # exp(logit_scale)
# Teacher embeddings v, t and the fusion adapter's outputs P_v f, P_t f (unit vectors, 2-D):
V = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
T = [[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]]
AV = [[0.0, 1.0], [1.0, 0.0], [0.8, 0.6]]
AT = [[0.0, 1.0], [0.6, 0.8], [0.8, -0.6]]
# P_v f, P_t f as an adapter returns them: any length (only their direction may count), none a multiple of AV / AT.
AV_ANY_NORM = [[0.3, 2.0], [4.0, -1.0], [0.1, 0.05]]
AT_ANY_NORM = [[-0.5, 3.0], [0.2, 0.1], [6.0, 1.5]]
ADAPTED = {"unit": (AV, AT), "any_norm": (AV_ANY_NORM, AT_ANY_NORM)}
TAU = 0.5


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def normalize(a):
    n = math.sqrt(sum(x * x for x in a))
    return [x / n for x in a]


def log_softmax(row):
    m = max(row)
    z = math.log(sum(math.exp(x - m) for x in row)) + m
    return [x - z for x in row]


def matrix(images, texts, scale):
    return [[scale * dot(i, t) for t in texts] for i in images]


def transpose(m):
    return [list(r) for r in zip(*m)]


def cross_entropy_diagonal(m):
    return -sum(log_softmax(row)[i] for i, row in enumerate(m)) / len(m)


def kl_rows(teacher, student):
    total = 0.0
    for t_row, s_row in zip(teacher, student):
        lt, ls = log_softmax(t_row), log_softmax(s_row)
        total += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
    return total / len(teacher)


def tensors(*rows):
    return [torch.tensor(r, dtype=torch.float32) for r in rows]


def test_contrastive_term_by_hand():
    s = matrix(S_IMAGE, S_TEXT, SCALE)
    expected = (cross_entropy_diagonal(s) + cross_entropy_diagonal(transpose(s))) / 2
    image, text = tensors(S_IMAGE, S_TEXT)
    loss = ContrastiveLoss()(image, text, torch.tensor(math.log(SCALE)))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_negclip_adds_negative_columns_to_image_rows_only():
    negatives = [[0.0, -1.0], [-1.0, 0.0]]
    s = matrix(S_IMAGE, S_TEXT, SCALE)
    rows = [row + [SCALE * dot(image, n) for n in negatives] for row, image in zip(s, S_IMAGE)]
    expected = (cross_entropy_diagonal(rows) + cross_entropy_diagonal(transpose(s))) / 2
    image, text, negative = tensors(S_IMAGE, S_TEXT, negatives)
    loss = ContrastiveLoss()(image, text, torch.tensor(math.log(SCALE)), negative_text_embeds=negative)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_distribution_term_by_hand_both_directions():
    s = matrix(S_IMAGE, S_TEXT, SCALE)
    teacher = matrix(V, T, 1 / TAU)
    expected = (kl_rows(teacher, s) + kl_rows(transpose(teacher), transpose(s))) / 2
    loss = DistributionDistillationLoss()(torch.tensor(s), torch.tensor(teacher))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Identical distributions: nothing to learn.
    assert DistributionDistillationLoss()(torch.tensor(s), torch.tensor(s)).item() == pytest.approx(0, abs=1e-6)


def test_identity_mix_control_by_hand():
    s = matrix(S_IMAGE, S_TEXT, SCALE)
    teacher = matrix(V, T, 1 / TAU)
    gamma = 0.5

    def mixed_kl(t_rows, s_rows):
        total = 0.0
        for i, (t_row, s_row) in enumerate(zip(t_rows, s_rows)):
            p = [(1 - gamma) * math.exp(x) + (gamma if j == i else 0) for j, x in enumerate(log_softmax(t_row))]
            total += sum(pj * (math.log(pj) - q) for pj, q in zip(p, log_softmax(s_row)))
        return total / len(t_rows)

    expected = (mixed_kl(teacher, s) + mixed_kl(transpose(teacher), transpose(s))) / 2
    loss = DistributionDistillationLoss(identity_mix=gamma)(torch.tensor(s), torch.tensor(teacher))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_feature_term_by_hand():
    w_image = [[1.0, 2.0], [0.0, 1.0]]  # W_v: rows are output dims
    w_text = [[0.5, 0.0], [1.0, -1.0]]
    targets_image, targets_text = V, T

    def mean_squared_error(weights, inputs, targets):
        errors = []
        for x, y in zip(inputs, targets):
            mapped = [dot(row, x) for row in weights]
            errors.append(sum((a - b) ** 2 for a, b in zip(mapped, y)))
        return sum(errors) / len(errors)

    expected = (mean_squared_error(w_image, S_IMAGE, targets_image)
                + mean_squared_error(w_text, S_TEXT, targets_text)) / 2
    term = FeatureDistillationLoss(student_dim=2, teacher_dim=2)
    with torch.no_grad():
        term.image_projection.weight.copy_(torch.tensor(w_image))
        term.text_projection.weight.copy_(torch.tensor(w_text))
    loss = term(*tensors(S_IMAGE, S_TEXT, targets_image, targets_text))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def modified_by_hand(alpha, adapted_image=AV, adapted_text=AT):
    """DESIGN §3: v̂ = normalize(v + α·normalize(P_v f)), t̂ likewise; α = ∞: v̂ = normalize(P_v f)."""
    if math.isinf(alpha):
        return [normalize(av) for av in adapted_image], [normalize(at) for at in adapted_text]
    v_hat = [normalize([a + alpha * b for a, b in zip(v, normalize(av))]) for v, av in zip(V, adapted_image)]
    t_hat = [normalize([a + alpha * b for a, b in zip(t, normalize(at))]) for t, at in zip(T, adapted_text)]
    return v_hat, t_hat


@pytest.mark.parametrize("alpha", [0.5, 2.0, math.inf])
def test_modified_features_read_only_the_direction_of_the_adapted_features(alpha):
    """P_v f of any length: v̂ = normalize(v + α·normalize(P_v f)), so scaling P_v f changes nothing."""
    v_hat, t_hat = modified_by_hand(alpha, AV_ANY_NORM, AT_ANY_NORM)
    image, text = modified_features(*tensors(V, T, AV_ANY_NORM, AT_ANY_NORM), alpha)
    torch.testing.assert_close(image, torch.tensor(v_hat))
    torch.testing.assert_close(text, torch.tensor(t_hat))


@pytest.mark.parametrize("adapted", sorted(ADAPTED))
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_full_mcad_loss_by_hand(alpha, adapted):
    """L = L_con + λ_dist·L_dist + λ_feat·L_feat with v̂ = normalize(v + α·normalize(P_v f)), Ŝ = <v̂, t̂>/τ_T."""
    adapted_image, adapted_text = ADAPTED[adapted]
    lambda_dist, lambda_feat = 0.7, 0.3
    loss_fn = MCADLoss.from_preset("mcad", student_dim=2, teacher_dim=2, alpha=alpha, teacher_temperature=TAU,
                                   lambda_dist=lambda_dist, lambda_feat=lambda_feat)
    with torch.no_grad():
        loss_fn.feature_loss.image_projection.weight.copy_(torch.eye(2))
        loss_fn.feature_loss.text_projection.weight.copy_(torch.eye(2))
    v_hat, t_hat = modified_by_hand(alpha, adapted_image, adapted_text)
    s = matrix(S_IMAGE, S_TEXT, SCALE)
    teacher = matrix(v_hat, t_hat, 1 / TAU)
    l_con = (cross_entropy_diagonal(s) + cross_entropy_diagonal(transpose(s))) / 2
    l_dist = (kl_rows(teacher, s) + kl_rows(transpose(teacher), transpose(s))) / 2
    l_feat = (sum(sum((a - b) ** 2 for a, b in zip(x, y)) for x, y in zip(S_IMAGE, v_hat)) / 3
              + sum(sum((a - b) ** 2 for a, b in zip(x, y)) for x, y in zip(S_TEXT, t_hat)) / 3) / 2

    image, text, v, t, av, at = tensors(S_IMAGE, S_TEXT, V, T, adapted_image, adapted_text)
    out = loss_fn(image, text, torch.tensor(math.log(SCALE)), teacher_image_embeds=v, teacher_text_embeds=t,
                  adapted_image_embeds=av, adapted_text_embeds=at)
    assert out.contrastive.item() == pytest.approx(l_con, rel=1e-5)
    assert out.distribution.item() == pytest.approx(l_dist, rel=1e-5)
    assert out.feature.item() == pytest.approx(l_feat, rel=1e-5)
    assert out.loss.item() == pytest.approx(l_con + lambda_dist * l_dist + lambda_feat * l_feat, rel=1e-5)


def test_fusion_logits_are_blended_into_the_top_k_entries_by_hand():
    beta, tau_f = 0.4, 2.0
    loss_fn = MCADLoss.from_preset("mcad", student_dim=2, teacher_dim=2, alpha=0.0, beta=beta, lambda_dist=1.0,
                                   teacher_temperature=TAU, fusion_temperature=tau_f, lambda_feat=0.0)
    fusion = [[3.0, 0.0, -1.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]
    mask = [[True, False, True], [False, True, False], [False, False, True]]
    teacher = matrix(V, T, 1 / TAU)
    blended = [[(1 - beta) * teacher[i][j] + beta * fusion[i][j] / tau_f if mask[i][j] else teacher[i][j]
                for j in range(3)] for i in range(3)]
    s = matrix(S_IMAGE, S_TEXT, SCALE)
    expected = (kl_rows(blended, s) + kl_rows(transpose(blended), transpose(s))) / 2
    image, text, v, t, av, at = tensors(S_IMAGE, S_TEXT, V, T, AV, AT)
    out = loss_fn(image, text, torch.tensor(math.log(SCALE)), teacher_image_embeds=v, teacher_text_embeds=t,
                  adapted_image_embeds=av, adapted_text_embeds=at,
                  fusion_logits=torch.tensor(fusion), fusion_mask=torch.tensor(mask))
    assert out.distribution.item() == pytest.approx(expected, rel=1e-5)


def test_fusion_only_targets_come_from_the_adapter_alone():
    loss_fn = MCADLoss.from_preset("fusion_only", student_dim=2, teacher_dim=2, teacher_temperature=TAU,
                                   lambda_dist=1.0, lambda_feat=0.0)
    s = matrix(S_IMAGE, S_TEXT, SCALE)
    teacher = matrix([normalize(a) for a in AV], [normalize(a) for a in AT], 1 / TAU)
    expected = (kl_rows(teacher, s) + kl_rows(transpose(teacher), transpose(s))) / 2
    image, text, v, t, av, at = tensors(S_IMAGE, S_TEXT, V, T, AV, AT)
    out = loss_fn(image, text, torch.tensor(math.log(SCALE)), teacher_image_embeds=v, teacher_text_embeds=t,
                  adapted_image_embeds=av, adapted_text_embeds=at)
    assert out.distribution.item() == pytest.approx(expected, rel=1e-5)


RANKED_NEGATIVES = [[0.0, -1.0], [-1.0, 0.0], [0.6, -0.8], [1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]  # 2 per pair, in order


def negclip_loss(negatives) -> float:
    """L_con by hand with every negative an extra column of each image's row (NegCLIP)."""
    s = matrix(S_IMAGE, S_TEXT, SCALE)
    negclip_rows = [row + [SCALE * dot(image, n) for n in negatives] for row, image in zip(s, S_IMAGE)]
    return (cross_entropy_diagonal(negclip_rows) + cross_entropy_diagonal(transpose(s))) / 2


def own_candidate_scores(texts, negatives, pairs) -> list:
    """Per pair i, the student's scaled scores of its caption and of its own two negatives (rows 2i, 2i + 1)."""
    return [[SCALE * dot(S_IMAGE[i], texts[i])] + [SCALE * dot(S_IMAGE[i], n) for n in negatives[2 * i:2 * i + 2]]
            for i in pairs]


def test_ranking_term_by_hand_each_caption_against_its_own_negatives():
    """L_rank: per image, KL(softmax(m / τ_F) ‖ softmax(S)) over its caption and its own K = 2 negatives only."""
    tau_f, lambda_rank = 2.0, 0.5
    loss_fn = MCADLoss.from_preset("mcad_feature_rank", student_dim=2, teacher_dim=2, alpha=0.0, lambda_feat=0.0,
                                   lambda_rank=lambda_rank, fusion_temperature=tau_f)
    # Negatives pair by pair: image i's are rows 2i, 2i + 1 (the others are only extra NegCLIP columns).
    match = [[4.0, -2.0, 1.0], [0.0, 3.0, -1.0], [2.0, 2.0, -4.0]]  # (caption, negative 1, negative 2) per image
    student = own_candidate_scores(S_TEXT, RANKED_NEGATIVES, range(3))
    l_rank = kl_rows([[m / tau_f for m in row] for row in match], student)
    l_con = negclip_loss(RANKED_NEGATIVES)

    image, text, v, t, negative = tensors(S_IMAGE, S_TEXT, V, T, RANKED_NEGATIVES)
    out = loss_fn(image, text, torch.tensor(math.log(SCALE)), teacher_image_embeds=v, teacher_text_embeds=t,
                  negative_text_embeds=negative, candidate_match_logits=torch.tensor(match))
    assert out.ranking.item() == pytest.approx(l_rank, rel=1e-5)
    assert out.loss.item() == pytest.approx(l_con + lambda_rank * l_rank, rel=1e-5)
    # A teacher that ranks exactly as the student does leaves nothing to learn; one caption alone, nothing to rank.
    agreeing = torch.tensor(student) * tau_f
    out = loss_fn(image, text, torch.tensor(math.log(SCALE)), teacher_image_embeds=v, teacher_text_embeds=t,
                  negative_text_embeds=negative, candidate_match_logits=agreeing)
    assert out.ranking.item() == pytest.approx(0, abs=1e-6)
    out = loss_fn(image, text, torch.tensor(math.log(SCALE)), teacher_image_embeds=v, teacher_text_embeds=t,
                  candidate_match_logits=torch.tensor(match)[:, :1])
    assert out.ranking.item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="candidate_match_logits"):
        loss_fn(image, text, torch.tensor(math.log(SCALE)), teacher_image_embeds=v, teacher_text_embeds=t,
                negative_text_embeds=negative)
    with pytest.raises(ValueError, match="need 6 negative texts, pair by pair; got 4"):
        loss_fn(image, text, torch.tensor(math.log(SCALE)), teacher_image_embeds=v, teacher_text_embeds=t,
                negative_text_embeds=negative[:4], candidate_match_logits=torch.tensor(match))


def test_a_ranking_warm_up_step_trains_on_l_rank_alone():
    """With `ranking_only` the loss is L_rank, unweighted, and its gradients are L_rank's; the other terms are still
    reported, and L_feat's projections get zero gradients, not none (DDP expects one for every parameter)."""
    loss_fn = MCADLoss.from_preset("mcad_feature_rank", student_dim=2, teacher_dim=2, lambda_rank=0.5,
                                   ranking_only_steps=1)
    match = torch.tensor([[4.0, -2.0, 1.0], [0.0, 3.0, -1.0], [2.0, 2.0, -4.0]])
    image, text, v, t, negative, av, at = tensors(S_IMAGE, S_TEXT, V, T, RANKED_NEGATIVES, AV, AT)
    image.requires_grad_(), text.requires_grad_()
    targets = {"teacher_image_embeds": v, "teacher_text_embeds": t, "adapted_image_embeds": av,
               "adapted_text_embeds": at, "negative_text_embeds": negative, "candidate_match_logits": match}

    out = loss_fn(image, text, torch.tensor(math.log(SCALE)), ranking_only=True, **targets)
    assert out.loss.item() == pytest.approx(out.ranking.item()) and out.contrastive > 0 and out.feature > 0
    out.loss.backward()
    projections = list(loss_fn.feature_loss.parameters())
    assert projections and all(not weight.grad.any() for weight in projections)
    warm_up_gradients = image.grad.clone(), text.grad.clone()
    image.grad = text.grad = None
    loss_fn(image, text, torch.tensor(math.log(SCALE)), **targets).ranking.backward()
    torch.testing.assert_close((image.grad, text.grad), warm_up_gradients)

    with pytest.raises(ValueError, match="ranking_only trains on L_rank alone, and this objective has lambda_rank"):
        MCADLoss.from_preset("mcad_feature", 2, 2)(image, text, torch.tensor(math.log(SCALE)), ranking_only=True,
                                                   teacher_image_embeds=v, teacher_text_embeds=t,
                                                   adapted_image_embeds=av, adapted_text_embeds=at)
    with pytest.raises(ValueError, match="ranking_only_steps trains on L_rank alone first: set lambda_rank > 0"):
        objective_settings("mcad_feature", ranking_only_steps=100)
    for wrong in (-1, True, 2.5):
        with pytest.raises(ValueError, match="ranking_only_steps must be an integer >= 0"):
            objective_settings("mcad_feature_rank", ranking_only_steps=wrong)


def test_ranking_where_the_teacher_agrees_leaves_the_pairs_it_ranks_a_negative_above_its_caption_to_l_con():
    """With rank_where_teacher_agrees, L_rank averages over the pairs whose caption the fusion teacher scores above
    every one of its negatives (pair 0); pair 1 (a negative above) and pair 2 (a tie) keep L_con's hard target alone."""
    loss_fn = MCADLoss.from_preset("mcad_feature_rank", student_dim=2, teacher_dim=2, alpha=0.0, lambda_feat=0.0,
                                   rank_where_teacher_agrees=True)
    match = [[4.0, -2.0, 1.0], [0.0, 3.0, -1.0], [2.0, 2.0, -4.0]]
    [student] = own_candidate_scores(S_TEXT, RANKED_NEGATIVES, [0])

    image, text, v, t, negative = tensors(S_IMAGE, S_TEXT, V, T, RANKED_NEGATIVES)
    out = loss_fn(image, text, torch.tensor(math.log(SCALE)), teacher_image_embeds=v, teacher_text_embeds=t,
                  negative_text_embeds=negative, candidate_match_logits=torch.tensor(match))
    assert out.ranking.item() == pytest.approx(kl_rows([match[0]], [student]), rel=1e-5)
    assert out.contrastive.item() == pytest.approx(negclip_loss(RANKED_NEGATIVES), rel=1e-5)
    assert out.ranked_fraction.item() == pytest.approx(1 / 3)
    # With a match threshold too, a pair must pass both: pair 1 passes the threshold and not the agreement, pair 2
    # the agreement and not the threshold (2 < 3).
    filtered = MCADLoss.from_preset("mcad_feature_rank", student_dim=2, teacher_dim=2, alpha=0.0, lambda_feat=0.0,
                                    rank_where_teacher_agrees=True, match_threshold=3.0)
    match = [[4.0, -2.0, 1.0], [5.0, 6.0, -1.0], [2.0, 1.0, -4.0]]
    out = filtered(image, text, torch.tensor(math.log(SCALE)), teacher_image_embeds=v, teacher_text_embeds=t,
                   negative_text_embeds=negative, candidate_match_logits=torch.tensor(match))
    assert out.ranking.item() == pytest.approx(kl_rows([match[0]], [student]), rel=1e-5)
    with pytest.raises(ValueError, match="rank_where_teacher_agrees chooses the pairs L_rank ranks: set lambda_rank"):
        objective_settings("mcad_feature", rank_where_teacher_agrees=True)


def test_ranking_where_the_teacher_agrees_reads_the_corrected_caption():
    """With a correction margin, the agreement is judged after the correction: pair 1, whose first negative scores 3
    above its caption, is corrected to it and then ranked; pair 2, whose negative scores 0.2 above (below the
    margin), is neither. A corrected pair's KL is its uncorrected one: caption and negative trade places in the
    teacher's scores and the student's alike."""
    loss_fn = MCADLoss.from_preset("mcad_feature_rank", student_dim=2, teacher_dim=2, alpha=0.0, lambda_feat=0.0,
                                   rank_where_teacher_agrees=True, correction_margin=0.5)
    match = [[4.0, -2.0, 1.0], [0.0, 3.0, -1.0], [2.0, 2.2, -4.0]]
    students = own_candidate_scores(S_TEXT, RANKED_NEGATIVES, [0, 1])

    image, text, v, t, negative = tensors(S_IMAGE, S_TEXT, V, T, RANKED_NEGATIVES)
    out = loss_fn(image, text, torch.tensor(math.log(SCALE)), teacher_image_embeds=v, teacher_text_embeds=t,
                  negative_text_embeds=negative, candidate_match_logits=torch.tensor(match))
    assert out.corrected_fraction.item() == pytest.approx(1 / 3)
    assert out.ranked_fraction.item() == pytest.approx(2 / 3)
    assert out.ranking.item() == pytest.approx(kl_rows(match[:2], students), rel=1e-5)


def test_a_match_threshold_leaves_the_pairs_the_fusion_teacher_rejects_out_of_the_positives():
    """With match_threshold, L_con and L_rank average over the pairs whose own match logit reaches it; the others
    stay negatives of the kept ones."""
    loss_fn = MCADLoss.from_preset("mcad_feature_rank_filter", student_dim=2, teacher_dim=2, alpha=0.0,
                                   lambda_feat=0.0, match_threshold=8.0)
    match = [[12.0, -2.0, 1.0], [2.0, 3.0, -1.0], [11.0, 2.0, -4.0]]  # pair 1 scores 2 < 8: its caption is wrong
    s = matrix(S_IMAGE, S_TEXT, SCALE)
    negclip_rows = [row + [SCALE * dot(image, n) for n in RANKED_NEGATIVES] for row, image in zip(s, S_IMAGE)]
    kept = [0, 2]
    rows = [-log_softmax(negclip_rows[i])[i] for i in kept]
    columns = [-log_softmax(transpose(s)[i])[i] for i in kept]
    l_con = (sum(rows) + sum(columns)) / (2 * len(kept))
    student = own_candidate_scores(S_TEXT, RANKED_NEGATIVES, kept)
    l_rank = kl_rows([match[i] for i in kept], student)

    image, text, v, t, negative = tensors(S_IMAGE, S_TEXT, V, T, RANKED_NEGATIVES)
    out = loss_fn(image, text, torch.tensor(math.log(SCALE)), teacher_image_embeds=v, teacher_text_embeds=t,
                  negative_text_embeds=negative, candidate_match_logits=torch.tensor(match))
    assert out.contrastive.item() == pytest.approx(l_con, rel=1e-5)
    assert out.ranking.item() == pytest.approx(l_rank, rel=1e-5)
    assert out.kept_fraction.item() == pytest.approx(2 / 3)
    # Every pair below the threshold: nothing is a positive, nothing is learnt from this batch.
    rejected = MCADLoss.from_preset("mcad_feature_rank_filter", student_dim=2, teacher_dim=2, alpha=0.0,
                                    lambda_feat=0.0, match_threshold=20.0)
    out = rejected(image, text, torch.tensor(math.log(SCALE)), teacher_image_embeds=v, teacher_text_embeds=t,
                   negative_text_embeds=negative, candidate_match_logits=torch.tensor(match))
    assert out.loss.item() == 0 and out.kept_fraction.item() == 0
    with pytest.raises(ValueError, match="match_threshold filters pairs"):
        loss_fn(image, text, torch.tensor(math.log(SCALE)), teacher_image_embeds=v, teacher_text_embeds=t,
                negative_text_embeds=negative)
    with pytest.raises(ValueError, match="match_threshold must be a finite match logit"):
        objective_settings("mcad_feature", match_threshold=float("nan"))


def test_a_caption_the_fusion_teacher_ranks_below_its_negative_by_the_margin_trades_places_with_it():
    """With correction_margin, pair 1's second negative (scored 3.0 above its caption) becomes its caption in L_con and
    the caption its negative; pair 0's (0.5 above: under the margin) and pair 2's stay as they are. L_rank is the same
    KL over the same candidates, their scores reordered alike."""
    loss_fn = MCADLoss.from_preset("mcad_feature_rank", student_dim=2, teacher_dim=2, alpha=0.0, lambda_feat=0.0,
                                   correction_margin=1.0)
    match = [[10.0, 10.5, 2.0], [8.0, 6.0, 11.0], [11.0, 2.0, -4.0]]
    texts = [S_TEXT[0], RANKED_NEGATIVES[3], S_TEXT[2]]  # pair 1's caption is its second negative now ...
    corrected_negatives = [*RANKED_NEGATIVES[:3], S_TEXT[1], *RANKED_NEGATIVES[4:]]  # ... and its caption that negative
    corrected_match = [match[0], [11.0, 6.0, 8.0], match[2]]
    s = matrix(S_IMAGE, texts, SCALE)
    negclip_rows = [row + [SCALE * dot(image, n) for n in corrected_negatives] for row, image in zip(s, S_IMAGE)]
    l_con = (sum(-log_softmax(negclip_rows[i])[i] for i in range(3))
             + sum(-log_softmax(transpose(s)[i])[i] for i in range(3))) / 6
    student = own_candidate_scores(texts, corrected_negatives, range(3))

    image, text, v, t, negative = tensors(S_IMAGE, S_TEXT, V, T, RANKED_NEGATIVES)
    out = loss_fn(image, text, torch.tensor(math.log(SCALE)), teacher_image_embeds=v, teacher_text_embeds=t,
                  negative_text_embeds=negative, candidate_match_logits=torch.tensor(match))
    assert out.contrastive.item() == pytest.approx(l_con, rel=1e-5)
    assert out.ranking.item() == pytest.approx(kl_rows(corrected_match, student), rel=1e-5)
    assert out.corrected_fraction.item() == pytest.approx(1 / 3)
    # With the threshold too, the corrected caption's score (11) decides whether pair 1 stays a positive.
    filtered = MCADLoss.from_preset("mcad_feature_rank_filter", student_dim=2, teacher_dim=2, alpha=0.0,
                                    lambda_feat=0.0, correction_margin=1.0, match_threshold=9.0)
    out = filtered(image, text, torch.tensor(math.log(SCALE)), teacher_image_embeds=v, teacher_text_embeds=t,
                   negative_text_embeds=negative, candidate_match_logits=torch.tensor(match))
    assert out.kept_fraction.item() == 1 and out.contrastive.item() == pytest.approx(l_con, rel=1e-5)
    # Without negatives (a canonical epoch that leaves the flips out may leave none) there is nothing to correct to.
    alone = loss_fn(image, text, torch.tensor(math.log(SCALE)), teacher_image_embeds=v, teacher_text_embeds=t,
                    candidate_match_logits=torch.tensor(match)[:, :1])
    assert alone.corrected_fraction.item() == 0
    assert alone.contrastive.item() == pytest.approx(cross_entropy_diagonal(matrix(S_IMAGE, S_TEXT, SCALE)) / 2
                                                     + cross_entropy_diagonal(transpose(matrix(S_IMAGE, S_TEXT, SCALE)))
                                                     / 2, rel=1e-5)
    with pytest.raises(ValueError, match="the correction needs 6 negative texts, pair by pair; got 0"):
        loss_fn(image, text, torch.tensor(math.log(SCALE)), teacher_image_embeds=v, teacher_text_embeds=t,
                candidate_match_logits=torch.tensor(match))
    with pytest.raises(ValueError, match="correction_margin corrects a caption"):
        loss_fn(image, text, torch.tensor(math.log(SCALE)), teacher_image_embeds=v, teacher_text_embeds=t,
                negative_text_embeds=negative)
    # L_feat regresses each caption's own target, whichever text L_con contrasts.
    with_features = [MCADLoss.from_preset("mcad_feature_rank", student_dim=2, teacher_dim=2, alpha=0.0,
                                          correction_margin=margin) for margin in (1.0, None)]
    with_features[1].load_state_dict(with_features[0].state_dict())
    features = [loss(image, text, torch.tensor(math.log(SCALE)), teacher_image_embeds=v, teacher_text_embeds=t,
                     negative_text_embeds=negative, candidate_match_logits=torch.tensor(match)).feature.item()
                for loss in with_features]
    assert features[0] == pytest.approx(features[1])
    for margin in (-1.0, float("inf")):
        with pytest.raises(ValueError, match="correction_margin must be a finite match logit margin >= 0"):
            objective_settings("mcad_feature_rank", correction_margin=margin)
    with pytest.raises(ValueError, match="set lambda_dist to 0"):
        objective_settings("mcad", correction_margin=0.1)
    assert objective_settings("contrastive", correction_margin=0.5).uses_match_scores


def test_ranking_needs_the_cache_not_the_online_teacher():
    with pytest.raises(ValueError, match="set beta to 0"):
        objective_settings("mcad_feature_rank", beta=0.5)
    with pytest.raises(ValueError, match="set beta to 0"):
        objective_settings("mcad_feature", match_threshold=8.0, beta=0.5)
    with pytest.raises(ValueError, match="lambda_rank must be >= 0"):
        objective_settings("mcad_feature", lambda_rank=-1.0)
    assert objective_settings("contrastive", lambda_rank=1.0).uses_teacher  # the ranking alone distils a teacher


def test_which_teacher_an_objective_reads():
    # A result depends on the fusion teacher exactly when the loss reads its adapted features or its scores.
    assert not objective_settings("contrastive").uses_fusion_teacher  # α = 1 by default, but nothing distilled
    assert not objective_settings("clip_kd").uses_fusion_teacher
    assert not objective_settings("clip_kd_feature").uses_fusion_teacher
    assert objective_settings("fusion_only").uses_fusion_teacher
    assert objective_settings("mcad_feature").uses_fusion_teacher
    assert objective_settings("clip_kd", beta=0.5).uses_fusion_teacher  # its match logits blended into Ŝ
    assert objective_settings("contrastive", match_threshold=8.0).uses_fusion_teacher  # its scores filter the pairs


def test_presets_are_settings_of_one_module():
    contrastive = objective_settings("contrastive")
    assert not contrastive.uses_teacher
    assert objective_settings("clip_kd").alpha == 0 and objective_settings("clip_kd").feature_alpha == 0
    assert objective_settings("affinity").lambda_feat == 0
    assert objective_settings("fusion_only").feature_alpha == float("inf")
    # mcad is the paper's objective (features and distributions); mcad_feature distils the modified features only
    # (the demo's, chosen on validation), and its controls differ from it in one part each.
    mcad, mcad_feature = objective_settings("mcad"), objective_settings("mcad_feature")
    assert (mcad.alpha, mcad.lambda_dist, mcad.lambda_feat) == (2.0, 1.0, 1.0)
    assert (mcad_feature.alpha, mcad_feature.lambda_dist, mcad_feature.lambda_feat) == (2.0, 0.0, 1.0)
    assert objective_settings("clip_kd_feature").feature_alpha == 0
    assert objective_settings("clip_kd_feature").lambda_dist == objective_settings("fusion_only").lambda_dist == 0
    assert set(OBJECTIVE_PRESETS) >= {"contrastive", "clip_kd", "affinity", "fusion_only", "mcad", "mcad_feature"}
    with pytest.raises(ValueError, match="Unknown objective knob"):
        objective_settings("mcad", gamma=1)
    with pytest.raises(ValueError, match="choose one of"):
        objective_settings("distill_everything")


def test_contrastive_preset_ignores_the_teacher():
    image, text = tensors(S_IMAGE, S_TEXT)
    out = MCADLoss.from_preset("contrastive", 2, 2)(image, text, torch.tensor(math.log(SCALE)))
    assert out.loss.item() == pytest.approx(ContrastiveLoss()(image, text, torch.tensor(math.log(SCALE))).item())
    assert out.distribution is None and out.feature is None


def test_gradients_reach_only_the_student_and_w(tiny_student):
    from modeling_mcad import MCADModel
    from modeling_mcad.distillation import DistillationModule

    student = MCADModel.from_preset("tiny")
    # Stands for the teacher producing the targets, left trainable: its outputs carry a graph, as an online
    # teacher's would if it were not frozen. The targets must still be constants of the loss.
    teacher = torch.nn.Linear(4, 4)
    objective = MCADLoss.from_preset("mcad", student_dim=32, teacher_dim=4, lambda_dist=1.0)
    module = DistillationModule(student, objective)
    _, processor = tiny_student
    from .conftest import random_images

    inputs = processor(images=random_images(3), text=["a red circle", "a blue star", "two squares"],
                       return_tensors="pt", padding=True)
    features = torch.nn.functional.normalize(teacher(torch.randn(4, 4)), dim=-1)
    targets = {
        "teacher_image_embeds": features[:3], "teacher_text_embeds": features[1:],
        "adapted_image_embeds": features[:3].flip(0), "adapted_text_embeds": features[1:].flip(0),
    }
    assert all(target.requires_grad for target in targets.values())
    module(dict(inputs), targets).loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert objective.feature_loss.image_projection.weight.grad.abs().sum() > 0
    assert student.logit_scale.grad is not None
    assert student.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert student.text_model.embeddings.token_embedding.weight.grad.abs().sum() > 0


def test_the_targets_are_constants_of_the_loss_even_when_the_teacher_outputs_carry_a_graph():
    """No gradient flows into v, t, P f or the fusion logits (nor the teacher behind them): the student learns the
    teacher's targets, it does not move them. The loss and the student's gradients are those of detached targets."""
    torch.manual_seed(0)
    teacher = torch.nn.Linear(2, 2)  # trainable, so that every target below carries a graph back to it
    v, t, av, at = (teacher(x) for x in tensors(V, T, AV_ANY_NORM, AT_ANY_NORM))
    v, t = torch.nn.functional.normalize(v, dim=-1), torch.nn.functional.normalize(t, dim=-1)
    fusion_logits = teacher.weight.sum() * torch.tensor([[3.0, 0.0, -1.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    teacher_side = {"teacher_image_embeds": v, "teacher_text_embeds": t, "adapted_image_embeds": av,
                    "adapted_text_embeds": at, "fusion_logits": fusion_logits}
    for value in teacher_side.values():
        value.retain_grad()  # so that a gradient reaching an intermediate target would show in .grad
    loss_fn = MCADLoss.from_preset("mcad", student_dim=2, teacher_dim=2, alpha=1.0, beta=0.5, lambda_dist=1.0,
                                   lambda_feat=1.0, teacher_temperature=TAU)

    def student_loss(targets):
        image, text = (x.clone().requires_grad_(True) for x in tensors(S_IMAGE, S_TEXT))
        out = loss_fn(image, text, torch.tensor(math.log(SCALE)), fusion_mask=torch.ones(3, 3, dtype=torch.bool),
                      **targets)
        out.loss.backward()
        return out.loss, image.grad, text.grad

    loss, image_grad, text_grad = student_loss(teacher_side)
    assert all(value.grad is None for value in teacher_side.values())
    assert all(parameter.grad is None for parameter in teacher.parameters())
    assert image_grad.abs().sum() > 0 and text_grad.abs().sum() > 0
    detached_loss, detached_image_grad, detached_text_grad = student_loss(
        {name: value.detach() for name, value in teacher_side.items()})
    torch.testing.assert_close(loss, detached_loss)
    torch.testing.assert_close(image_grad, detached_image_grad)
    torch.testing.assert_close(text_grad, detached_text_grad)
