"""The mcad-shapes teachers (modeling_mcad/shapes/teachers.py, gates.py): building, training and gating them."""

import numpy as np
import pytest
import torch
from transformers import CLIPModel

from modeling_mcad import MCADModel
from modeling_mcad.shapes import (
    ORIENTATION_WORDS,
    SHAPES,
    FusionStackTargets,
    MCADFusionModel,
    caption_grounding,
    caption_is_true,
    shapes_teachers,
    sincos_positions,
    teacher_gates,
    train_fusion_stack,
)
from modeling_mcad.teacher_training import train_dual_teacher


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
