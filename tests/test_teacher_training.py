"""Generic teacher training (modeling_mcad/teacher_training.py) and the one optimisation recipe (optimization.py)."""

import math

import numpy as np
import pytest
import torch
from transformers import BertTokenizer, ViltConfig, ViltForImageAndTextRetrieval, ViltProcessor
from transformers.models.vilt.image_processing_pil_vilt import ViltImageProcessorPil

from modeling_mcad import MCADModel
from modeling_mcad.configuration_mcad import PRESET_VOCABULARY
from modeling_mcad.optimization import LOGIT_SCALE_RANGE, TrainingStep, adamw_with_cosine, parameter_groups
from modeling_mcad.shapes import shapes_teachers
from modeling_mcad.teacher_training import (
    matching_step_pairs,
    mine_hard_negatives,
    train_dual_teacher,
    train_fusion_teacher,
)

from .conftest import SMALL_TEACHERS


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


def test_a_matching_step_scores_positives_then_each_images_and_each_captions_hardest_negative():
    similarity = torch.tensor([[0.9, 0.8, 0.1],
                               [0.7, 0.2, 0.3],
                               [0.6, 0.5, 0.4]])
    captions = torch.tensor([10, 11, 12])
    step_pairs, is_positive = matching_step_pairs(similarity, captions)
    assert step_pairs.tolist() == [[0, 10], [1, 11], [2, 12],  # positives
                                   [0, 11], [1, 10], [2, 10],  # each image with its hardest other caption
                                   [1, 10], [0, 11], [1, 12]]  # each caption with its hardest other image
    assert is_positive.tolist() == [True] * 3 + [False] * 6
    # Two pairs sharing one caption text: that text is never the other's negative.
    step_pairs, _ = matching_step_pairs(similarity, torch.tensor([10, 10, 12]))
    assert [0, 10] not in step_pairs[3:].tolist() and [1, 10] not in step_pairs[3:].tolist()


def test_epoch_batches_draw_canonical_captions_when_asked_and_whole_families(pairs):
    def drawn(canonical_only):
        batches = pairs.epoch_batches(0, 8, seed=0, canonical_only=canonical_only)
        drawn = torch.cat(batches)
        images = pairs.image_index[drawn]
        assert len(torch.unique(images)) == len(images)  # each image at most once
        return drawn

    assert pairs.canonical[drawn(True)].all()
    assert not pairs.canonical[drawn(False)].all()
    grouped = torch.cat(pairs.epoch_batches(1, 8, seed=0, group_families=True))
    families = pairs.family[pairs.image_index[grouped]].tolist()
    assert all(families[i] == families[i + 1] or families[i + 1] not in families[:i] for i in range(len(families) - 1))


def test_one_recipe_decays_matrices_only_and_clamps_the_logit_scale():
    student = MCADModel.from_preset("tiny")
    student.text_model.embeddings.token_embedding.requires_grad_(False)
    decay, no_decay = parameter_groups(student, weight_decay=0.1)
    names = {id(p): name for name, p in student.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert "logit_scale" in {names[id(p)] for p in no_decay["params"]}
    assert "text_model.final_layer_norm.weight" in {names[id(p)] for p in no_decay["params"]}
    assert "text_model.embeddings.token_embedding.weight" not in {names[id(p)] for p in decay["params"]}
    # A step that would push the logit scale past ln 100 leaves it at ln 100; the schedule warms up then decays.
    optimizer, scheduler = adamw_with_cosine(student, lr=1.0, total_steps=10, warmup_steps=2)
    step = TrainingStep(student, optimizer, scheduler, max_grad_norm=None)
    rates = []
    for _ in range(6):
        rates.append(step.lr)
        step(-student.logit_scale * 100)  # the gradient raises the scale (Adam: by about lr a step)
    assert student.logit_scale.item() == pytest.approx(LOGIT_SCALE_RANGE[1])
    assert rates[:3] == pytest.approx([0, 0.5, 1.0]) and rates[3] > rates[4] > rates[5] > 0
    with pytest.raises(ValueError, match="total_steps"):
        adamw_with_cosine(student, lr=1.0, total_steps=0)


def test_the_dual_teacher_learns(shapes, small_teachers, pairs):
    dual = small_teachers.dual
    history = train_dual_teacher(dual, small_teachers.dual_processor, shapes["train"], epochs=15, batch_size=16,
                                 lr=2e-3, group_families=False, pairs=pairs)
    assert len(history.epoch_losses) == 15 and not dual.training
    # CLIP's loss on batches of 16 starts near ln 16 and falls well below it on 64 training images.
    assert history.epoch_losses[0] > 0.9 * math.log(16)
    assert history.epoch_losses[-1] < 0.75 * history.epoch_losses[0]


def test_a_published_cross_encoder_is_trained_by_matching_against_mined_negatives(shapes):
    """`train_fusion_teacher`, the path for BLIP / ViLT checkpoints and any data: the balanced matching loss on the
    dual teacher's hardest in-batch negatives falls from ln 2 (an untrained dual teacher here, whose hardest
    negatives a tiny ViLT can learn to tell apart in seconds)."""
    dual = shapes_teachers(**SMALL_TEACHERS, seed=2)
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(PRESET_VOCABULARY)})
    torch.manual_seed(0)
    vilt = ViltForImageAndTextRetrieval(ViltConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, initializer_range=0.1,
        vocab_size=len(PRESET_VOCABULARY), max_position_embeddings=32, image_size=32, patch_size=8))
    processor = ViltProcessor(image_processor=ViltImageProcessorPil(size={"shortest_edge": 32}, size_divisor=8),
                              tokenizer=tokenizer)
    history = train_fusion_teacher(vilt, processor, shapes["train"], dual.dual, dual.dual_processor, epochs=30,
                                   batch_size=16, lr=1e-3)
    assert all(np.isfinite(history.losses)) and not vilt.training
    assert history.epoch_losses[0] == pytest.approx(math.log(2), abs=0.02)
    assert np.mean(history.epoch_losses[-5:]) < 0.9 * math.log(2)
