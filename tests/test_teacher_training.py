"""The teachers stage on mcad-shapes (modeling_mcad/teacher_training.py): building, training and gating the teachers."""

import numpy as np
import pytest
import torch
from transformers import BertTokenizer, CLIPModel, ViltConfig, ViltForImageAndTextRetrieval, ViltProcessor
from transformers.models.vilt.image_processing_pil_vilt import ViltImageProcessorPil

from modeling_mcad import MCADModel
from modeling_mcad.configuration_mcad import PRESET_VOCABULARY
from modeling_mcad.fusion_teacher import MCADFusionModel, sincos_positions
from modeling_mcad.shapes import ORIENTATION_WORDS, SHAPES, caption_grounding, caption_is_true, make_shapes
from modeling_mcad.teacher_training import (
    DISTRACTOR,
    MINED,
    POSITIVE,
    FusionCurriculum,
    FusionStackTargets,
    TrainingPairs,
    _fusion_step_pairs,
    mine_hard_negatives,
    rerank,
    shapes_teachers,
    teacher_gates,
    train_dual_teacher,
    train_fusion_stack,
    train_fusion_teacher,
)

SMALL = {"dual_width": 64, "dual_layers": 1, "dual_projection_dim": 32, "fusion_width": 64, "fusion_layers": 1}


@pytest.fixture(scope="module")
def shapes():
    return make_shapes(seed=3, train=64, validation=24, test=8, image_size=32)


@pytest.fixture(scope="module")
def small_teachers():
    return shapes_teachers(**SMALL, seed=1)


@pytest.fixture(scope="module")
def pairs(shapes, small_teachers):
    return TrainingPairs.from_split(shapes["train"], small_teachers.processors)


def test_default_teachers_are_real_classes_ten_times_the_student_with_an_offline_processor(shapes):
    teachers = shapes_teachers()
    assert isinstance(teachers.dual, CLIPModel) and isinstance(teachers.fusion, MCADFusionModel)
    assert teachers.fusion.unimodal is not teachers.dual  # a copy: the fusion teacher saves its own encoders
    student_size = MCADModel.from_preset("shapes").num_parameters()
    assert teachers.dual.num_parameters() >= 10 * student_size
    image, caption = shapes["train"][0]["image"], shapes["train"][0]["captions"][0]
    for processor in teachers.processors.values():
        inputs = processor(images=image, text=caption, return_tensors="pt")
        assert inputs["pixel_values"].shape == (1, 3, 32, 32)  # 64 px images resized to the teachers' 32 px
        assert inputs["input_ids"][0, 0] == processor.tokenizer.cls_token_id
    # The patch grids start from 2D sine-cosine positions: every patch has its own.
    torch.testing.assert_close(teachers.dual.vision_model.embeddings.position_embedding.weight,
                               sincos_positions(4, 256))
    positions = teachers.fusion.patch_positions
    torch.testing.assert_close(positions, sincos_positions(4, 128))
    assert len(torch.unique(positions[1:], dim=0)) == 16
    with pytest.raises(ValueError, match="multiple of patch_size"):
        shapes_teachers(image_size=30)


def test_fusion_stack_targets_read_each_caption_against_the_scene(shapes, small_teachers, pairs):
    """Siblings are family members the caption is false of; the shape tokens are the named objects' words, in
    naming order, with their centres; the relation token is the caption's relation word."""
    train = shapes["train"]
    tokenizer = small_teachers.fusion_processor.tokenizer
    targets = FusionStackTargets.from_pairs(pairs, train, tokenizer)
    scenes, families = train["scene"], pairs.family.tolist()
    checked_siblings = 0
    for pair in range(len(pairs)):
        image, caption = int(pairs.image_index[pair]), pairs.texts[int(pairs.caption_row[pair])]
        ids = pairs.tables["fusion"].input_ids[int(pairs.caption_row[pair])]
        words = tokenizer.convert_ids_to_tokens(ids.tolist())
        for sibling in targets.siblings[pair][targets.siblings[pair] >= 0].tolist():
            assert families[sibling] == families[image] and sibling != image
            assert not caption_is_true(caption, scenes[sibling])
            checked_siblings += 1
        grounded = targets.grounded[pair]
        named = [words[t] for t in targets.shape_token[pair][grounded].tolist()]
        assert named == [word for word in caption.split() if word in SHAPES][: len(named)]
        centres = targets.centre[pair][grounded] / 4 + 0.5
        torch.testing.assert_close(centres, torch.tensor(caption_grounding(caption, scenes[image]),
                                                         dtype=torch.float32))
        if pairs.flipped_row[pair] >= 0:  # a relation caption, and its flip: the relation word of each text row
            for row in (pairs.caption_row[pair], pairs.flipped_row[pair]):
                ids = pairs.tables["fusion"].input_ids[row]
                assert tokenizer.convert_ids_to_tokens(int(ids[targets.relation_token[row]])) in ORIENTATION_WORDS
    assert checked_siblings > 0


def test_curriculum_schedule():
    curriculum = FusionCurriculum(canonical_epochs=1, random_negative_epochs=2, hard_negative_share=0.8, ramp_epochs=2)
    assert [curriculum.canonical_only(e) for e in (0, 0.9, 1.0, 3)] == [True, True, False, False]
    assert [curriculum.mines_negatives(e) for e in (0, 1.99, 2)] == [False, False, True]
    assert [curriculum.distractor_share(e) for e in (1, 2, 3, 4, 9)] == pytest.approx([0, 0, 0.4, 0.8, 0.8])
    assert FusionCurriculum(random_negative_epochs=0, ramp_epochs=0).distractor_share(0) == 0.8
    wording = FusionCurriculum(canonical_epochs=1, wording_ramp_epochs=2)
    assert [wording.all_wordings_share(e) for e in (0, 1, 2, 3, 5)] == [0, 0, 0.5, 1, 1]
    assert [wording.canonical_only(e) for e in (0.5, 1, 2)] == [True, True, False]
    with pytest.raises(ValueError, match="hard_negative_share"):
        FusionCurriculum(hard_negative_share=1.5)
    with pytest.raises(ValueError, match="ramp_epochs"):
        FusionCurriculum(ramp_epochs=-1)


def test_hard_negatives_are_the_most_similar_non_matching_ones():
    similarity = torch.tensor([[0.9, 0.8, 0.1],
                               [0.7, 0.2, 0.3],
                               [0.6, 0.5, 0.4]])
    text_of_image, image_of_text = mine_hard_negatives(similarity)
    assert text_of_image.tolist() == [1, 0, 0] and image_of_text.tolist() == [1, 0, 1]
    # Text 1 also describes image 0: it is not image 0's negative, nor image 0 its.
    same = torch.zeros(3, 3, dtype=torch.bool)
    same[0, 1] = True
    text_of_image, image_of_text = mine_hard_negatives(similarity, same)
    assert text_of_image.tolist() == [2, 0, 0] and image_of_text.tolist() == [1, 2, 1]


def test_rerank_moves_the_first_right_answer_within_the_top_k_only():
    ranks = np.array([2, 7, 1])
    candidates = torch.tensor([[4, 5, 6], [1, 2, 3], [7, 8, 9]])
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1], [0.1, 0.2, 0.3]])
    is_right = torch.tensor([[False, True, False], [False, False, False], [True, False, False]])
    # Query 0: its right answer (2nd) scores best -> 1; query 1: none in its top k -> unchanged; query 2: -> 3rd.
    assert rerank(ranks, candidates, scores, is_right).tolist() == [1, 7, 3]
    with pytest.raises(ValueError, match="one shape"):
        rerank(ranks, candidates, scores[:, :2], is_right)


def test_epoch_batches_draw_canonical_captions_for_all_but_a_share_of_images(pairs):
    def canonical_fraction(share):
        batches = pairs.epoch_batches(0, 8, seed=0, all_wordings_share=share)
        drawn = torch.cat(batches)
        images = pairs.image_index[drawn]
        assert len(torch.unique(images)) == len(images)  # each image at most once
        return pairs.canonical[drawn].float().mean().item()

    assert canonical_fraction(0.0) == 1.0
    assert canonical_fraction(1.0) < canonical_fraction(0.5) < 1.0
    grouped = torch.cat(pairs.epoch_batches(1, 8, seed=0, group_families=True))
    families = pairs.family[pairs.image_index[grouped]].tolist()
    assert all(families[i] == families[i + 1] or families[i + 1] not in families[:i] for i in range(len(families) - 1))


def test_a_fusion_step_scores_positives_distractors_and_mined_negatives(pairs):
    index = pairs.epoch_batches(0, 16, seed=0)[0]
    similarity = torch.randn(16, 16)
    step_pairs, kinds = _fusion_step_pairs(similarity, index, pairs, share=0.5, negatives_per_positive=2,
                                           generator=torch.Generator().manual_seed(0))
    captions = pairs.caption_row[index]
    assert len(step_pairs) == 16 * 3 and (kinds == POSITIVE).sum() == 16
    assert (kinds == DISTRACTOR).sum() == 16 and (kinds == MINED).sum() == 16
    torch.testing.assert_close(step_pairs[:16], torch.stack([torch.arange(16), captions], dim=1))
    for position, text in step_pairs[kinds == DISTRACTOR].tolist():  # one of its own image's distractors
        assert text in (pairs.swapped_row[index[position]], pairs.flipped_row[index[position]])
    for position, text in step_pairs[kinds == MINED].tolist():  # never the pair's own caption
        assert text != captions[position]


def test_teachers_learn_and_gates_report_every_model(shapes, small_teachers, pairs):
    dual_before = [p.detach().clone() for p in small_teachers.dual.parameters()]
    history = train_dual_teacher(small_teachers.dual, small_teachers.dual_processor, shapes["train"], epochs=2,
                                 batch_size=16, pairs=pairs)
    assert len(history.epoch_losses) == 2 and all(np.isfinite(history.losses))
    assert not small_teachers.dual.training
    assert any(not torch.equal(a, b) for a, b in zip(dual_before, small_teachers.dual.parameters()))

    stack_before = {name: p.detach().clone() for name, p in small_teachers.fusion.named_parameters()
                    if not name.startswith("unimodal.")}
    history = train_fusion_stack(small_teachers.fusion, small_teachers.fusion_processor, shapes["train"],
                                 dual_teacher=small_teachers.dual, steps=6, canonical_steps=3, batch_size=16,
                                 warmup_steps=1, pairs=pairs)
    assert len(history.losses) == 6 and all(np.isfinite(history.losses)) and not small_teachers.fusion.training
    assert [step["canonical_only"] for step in history.steps] == [True] * 3 + [False] * 3
    # The unimodal encoders are the trained dual teacher's weights, frozen; the stack learned.
    for name, weight in small_teachers.dual.state_dict().items():
        assert torch.equal(small_teachers.fusion.unimodal.state_dict()[name], weight), name
    assert not any(p.requires_grad for p in small_teachers.fusion.unimodal.parameters())
    changed = [name for name, p in small_teachers.fusion.named_parameters() if name in stack_before
               and not torch.equal(p, stack_before[name])]
    assert {"match_head.weight", "readout_gate.weight", "relation_head.weight", "grounding_head.weight"} <= set(changed)

    gates = teacher_gates(small_teachers, shapes["validation"], top_k=5)
    assert set(gates["rows"]) == {"dual teacher", "fusion teacher (re-ranks dual top-5)",
                                  "bag of words (colour_shape)", "bag of words (colour_shape_orientation)"}
    dual, reranked = gates["dual"], gates["reranked"]
    # Re-ranking the top 5 cannot change Recall@5 or @10.
    for key in ("i2t_r5", "i2t_r10", "t2i_r5", "t2i_r10"):
        assert reranked[key] == dual[key]
    assert 0 <= gates["fusion"]["binding_accuracy"] <= 100
    assert gates["gates"]["passed"] == all(gates["gates"][name] for name in
                                           ("dual_beats_matchers", "fusion_beats_dual_binding", "reranking_beats_dual"))
    assert gates["gates"]["reranking_beats_dual"] == (reranked["rsum"] > dual["rsum"])


def test_a_published_cross_encoder_is_fine_tuned_with_the_matching_curriculum(shapes, small_teachers, pairs):
    """`train_fusion_teacher`, the path for BLIP / ViLT checkpoints: a balanced matching loss whose curriculum moves
    from canonical captions and random negatives to mined negatives and distractors."""
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(PRESET_VOCABULARY)})
    vilt = ViltForImageAndTextRetrieval(ViltConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        vocab_size=len(PRESET_VOCABULARY), max_position_embeddings=32, image_size=32, patch_size=8))
    processor = ViltProcessor(image_processor=ViltImageProcessorPil(size={"shortest_edge": 32}, size_divisor=8),
                              tokenizer=tokenizer)
    before = [p.detach().clone() for p in vilt.parameters()]
    curriculum = FusionCurriculum(canonical_epochs=1, random_negative_epochs=1, hard_negative_share=0.5,
                                  ramp_epochs=0)
    history = train_fusion_teacher(vilt, processor, shapes["train"], small_teachers.dual,
                                   small_teachers.dual_processor, epochs=2, batch_size=16, curriculum=curriculum)
    steps = history.steps
    assert all(np.isfinite(history.losses)) and not vilt.training
    assert any(not torch.equal(a, b) for a, b in zip(before, vilt.parameters()))
    assert steps[0]["canonical_only"] and not steps[0]["mined_negatives"] and steps[0]["distractor_share"] == 0
    assert not steps[-1]["canonical_only"] and steps[-1]["mined_negatives"]
    assert steps[-1]["distractor_share"] == pytest.approx(0.5)
