"""The mcad-shapes teachers (modeling_mcad/shapes/teachers.py, gates.py): building, training and gating them."""

import json
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel

from modeling_mcad import MCADModel, evaluation
from modeling_mcad.fusion_model import MCADFusionModel, sincos_positions
from modeling_mcad.shapes import (
    ORIENTATION_WORDS,
    SHAPES,
    FusionStackTargets,
    caption_grounding,
    caption_is_true,
    matcher_embeddings,
    shapes_teachers,
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
    # Two epochs make the dual teacher the stack's frozen encoders; test_teacher_training checks that it learns.
    history = train_dual_teacher(small_teachers.dual, small_teachers.dual_processor, shapes["train"], epochs=2,
                                 batch_size=16, pairs=pairs)
    assert len(history.epoch_losses) == 2 and all(np.isfinite(history.losses))
    assert not small_teachers.dual.training
    assert any(not torch.equal(a, b) for a, b in zip(dual_before, small_teachers.dual.parameters()))

    stack_before = {name: p.detach().clone() for name, p in small_teachers.fusion.named_parameters()
                    if not name.startswith("unimodal.")}
    history = train_fusion_stack(small_teachers.fusion, small_teachers.fusion_processor, shapes["train"],
                                 dual_teacher=small_teachers.dual, steps=33, canonical_steps=30, batch_size=16,
                                 lr=1e-3, warmup_steps=1, pairs=pairs)
    assert len(history.losses) == 33 and all(np.isfinite(history.losses)) and not small_teachers.fusion.training
    # The stack learns: over the canonical phase (one loss throughout; after it the flips join the candidates and
    # the loss jumps) the loss falls by more than a fifth.
    canonical = history.losses[:30]
    assert np.mean(canonical[-10:]) < 0.8 * np.mean(canonical[:5]), canonical
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


# --- The gates on teachers whose every score is set by hand --------------------------------------------------------
#
# Eight images of a red circle and a blue square, side by side (images 0-3) or one above the other (4-7), one caption
# each, with a colour-swap and a relation-flip distractor. Every caption holds the same colour and shape words and
# the orientation words of its axis, so the bag-of-words matchers cannot tell the images apart (colour_shape) or only
# the two axes apart (colour_shape_orientation): within that, they rank by their random tie-breaker. The teachers
# below are scripted, so every metric of the teachers in `teacher_gates` is known by construction.

GATE_RELATIONS = [("horizontal", "left of"), ("horizontal", "right of"), ("vertical", "above"), ("vertical", "below")]
GATE_SIZES = ["", "small "]
GATE_SCENES = [(axis, relation) for axis, relation in GATE_RELATIONS for _ in GATE_SIZES]
GATE_CAPTIONS = [f"a {size}red circle {relation} a blue square"
                 for _, relation in GATE_RELATIONS for size in GATE_SIZES]
GATE_SWAPS = [caption.replace("red circle", "blue circle").replace("blue square", "red square")
              for caption in GATE_CAPTIONS]
GATE_FLIPS = [f"a blue square {relation} a {size}red circle" for _, relation in GATE_RELATIONS for size in GATE_SIZES]
GATE_TEXTS = GATE_CAPTIONS + GATE_SWAPS + GATE_FLIPS
GATE_IMAGES = len(GATE_CAPTIONS)


def gate_split() -> datasets.Dataset:
    """Image i is a 2×2 picture whose red channel is 10·i (how the scripted processor knows it)."""
    images = [Image.new("RGB", (2, 2), (10 * i, 0, 0)) for i in range(GATE_IMAGES)]
    # The circle's and the square's centres, as the caption says.
    centres = {"left of": [(0.25, 0.5), (0.75, 0.5)], "right of": [(0.75, 0.5), (0.25, 0.5)],
               "above": [(0.5, 0.25), (0.5, 0.75)], "below": [(0.5, 0.75), (0.5, 0.25)]}
    scenes = [json.dumps({"axis": axis, "relations": True, "objects": [
        {"shape": shape, "colour": colour, "size": None, "x": x, "y": y}
        for (shape, colour), (x, y) in zip([("circle", "red"), ("square", "blue")], centres[relation])]})
        for axis, relation in GATE_SCENES]
    return datasets.Dataset.from_dict({
        "image": images, "captions": [[caption] for caption in GATE_CAPTIONS],
        "swapped_captions": [[swap] for swap in GATE_SWAPS], "flipped_captions": [[flip] for flip in GATE_FLIPS],
        "scene": scenes,
    })


class IndexProcessor:
    """Stands for both teachers' processors: an image becomes its index, a text its position in `GATE_TEXTS`."""

    def __call__(self, images=None, text=None, **kwargs):
        if images is not None:
            return {"pixel_values": torch.tensor([[image.getpixel((0, 0))[0] // 10] for image in images])}
        ids = torch.tensor([[GATE_TEXTS.index(t)] for t in text])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@dataclass
class ScriptedTeachers:
    """
    The teachers' interface of `teacher_gates` with hand-set scores.

    Args:
        image_embeds (`torch.Tensor` of shape `(images, d)`): the dual teacher's v of each image.
        text_embeds (`torch.Tensor` of shape `(len(GATE_TEXTS), d)`): its t of each text.
        match (`Callable[[int, int], float]`): the fusion teacher's match logit of (image, row of GATE_TEXTS).
    """

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    match: Callable[[int, int], float]

    @property
    def processors(self) -> dict:
        return {"dual": IndexProcessor(), "fusion": IndexProcessor()}

    def encode_images(self, pixel_values):
        return self.image_embeds[pixel_values[:, 0]]

    def encode_texts(self, input_ids, attention_mask=None):
        return self.text_embeds[input_ids[:, 0]]

    def fuse(self, pixel_values, input_ids, attention_mask=None, pairs=None):
        images, texts = pixel_values[pairs[:, 0], 0], input_ids[pairs[:, 1], 0]
        return SimpleNamespace(match_logits=torch.tensor([self.match(int(i), int(t)) for i, t in zip(images, texts)]))


def blind_to_binding(caption_embeds: torch.Tensor) -> torch.Tensor:
    """t of every text in GATE_TEXTS: a distractor gets its caption's t (a dual teacher blind to binding)."""
    return torch.cat([caption_embeds, caption_embeds, caption_embeds])


def near_perfect_dual() -> tuple[torch.Tensor, torch.Tensor]:
    """v_i = e_i and t of caption i = e_i, except t_0 ∝ e_0 + 2·e_1: caption 0 finds image 1 first (0.89 against
    0.45), every other query its own answer. R@1 = 100% image→text and 7/8 = 87.5% text→image, R@5 = R@10 = 100%,
    RSUM 587.5; binding accuracy 50% (every distractor ties with its caption)."""
    captions = torch.eye(GATE_IMAGES)
    captions[0, 1] = 2.0
    return torch.eye(GATE_IMAGES), blind_to_binding(F.normalize(captions, dim=-1))


def oracle_match(image: int, text: int) -> float:
    """A perfect fusion teacher: 1 for an image's own caption, 0 for every other text (other captions, distractors)."""
    return float(text == image)


def test_gates_pass_a_near_perfect_dual_teacher_and_an_oracle_fusion_teacher():
    split = gate_split()
    image_embeds, text_embeds = near_perfect_dual()
    gates = teacher_gates(ScriptedTeachers(image_embeds, text_embeds, oracle_match), split, top_k=2)
    dual, fusion, reranked = gates["dual"], gates["fusion"], gates["reranked"]
    assert (dual["i2t_r1"], dual["i2t_r5"], dual["i2t_r10"]) == (100.0, 100.0, 100.0)
    assert (dual["t2i_r1"], dual["t2i_r5"], dual["t2i_r10"], dual["rsum"]) == (87.5, 100.0, 100.0, 587.5)
    assert (dual["swap_accuracy"], dual["flip_accuracy"], dual["binding_accuracy"]) == (50.0, 50.0, 50.0)
    assert (fusion["swap_accuracy"], fusion["flip_accuracy"], fusion["binding_accuracy"]) == (100.0, 100.0, 100.0)
    # Image 0 is among caption 0's top 2: the oracle puts it first.
    assert (reranked["i2t_r1"], reranked["t2i_r1"], reranked["rsum"]) == (100.0, 100.0, 600.0)
    # Within a bag of words the matchers rank at random: far below the dual teacher at R@1.
    assert all(metrics["rsum"] < 500 for metrics in gates["floors"].values())
    assert gates["gates"] == {"dual_beats_matchers": True, "fusion_beats_dual_binding": True,
                              "reranking_beats_dual": True, "passed": True, "fusion_binding_above_90": True}
    assert gates["rows"]["fusion teacher (re-ranks dual top-2)"]["binding_accuracy"] == 100.0


def test_gates_fail_a_bag_of_words_dual_teacher():
    """A dual teacher that is the colour-shape-orientation matcher itself beats the colour-shape matcher, but not
    itself: equal is not better, and it must beat every matcher."""
    split = gate_split()
    image_embeds, caption_embeds, _ = matcher_embeddings(split, "colour_shape_orientation")
    flips_of_images_6_and_7 = {GATE_TEXTS.index(GATE_FLIPS[6]): 6, GATE_TEXTS.index(GATE_FLIPS[7]): 7}

    def match(image: int, text: int) -> float:  # the oracle, but it prefers 2 of the 8 flips to their captions
        return 2.0 if flips_of_images_6_and_7.get(text) == image else oracle_match(image, text)

    teachers = ScriptedTeachers(torch.from_numpy(image_embeds), blind_to_binding(torch.from_numpy(caption_embeds)),
                                match)
    gates = teacher_gates(teachers, split, top_k=2)
    matchers = gates["floors"]
    assert (gates["dual"]["rsum"] == matchers["bag of words (colour_shape_orientation)"]["rsum"]
            > matchers["bag of words (colour_shape)"]["rsum"])
    assert (gates["fusion"]["swap_accuracy"], gates["fusion"]["flip_accuracy"]) == (100.0, 75.0)
    assert gates["fusion"]["binding_accuracy"] == 87.5 and gates["dual"]["binding_accuracy"] == 50.0
    assert not gates["gates"]["dual_beats_matchers"] and gates["gates"]["fusion_beats_dual_binding"]
    assert not gates["gates"]["passed"] and not gates["gates"]["fusion_binding_above_90"]


def test_gates_on_a_split_that_is_not_mcad_shapes_have_a_chance_floor_and_no_binding():
    """Any split grouped by image (no scene, no distractors): the dual teacher against random embeddings, the fusion
    teacher as a re-ranker; a re-ranker that reverses the oracle fails."""
    split = gate_split().remove_columns(["swapped_captions", "flipped_captions", "scene"])
    image_embeds, text_embeds = near_perfect_dual()
    gates = evaluation.teacher_gates(ScriptedTeachers(image_embeds, text_embeds, oracle_match), split, top_k=2)
    assert gates["fusion"] == {} and "binding_accuracy" not in gates["dual"]
    assert gates["reranked"]["rsum"] == 600.0 and gates["floors"]["chance (random embeddings)"]["rsum"] < 500
    assert gates["gates"] == {"dual_beats_matchers": True, "reranking_beats_dual": True, "passed": True}
    assert list(gates["rows"]) == ["dual teacher", "fusion teacher (re-ranks dual top-2)", "chance (random embeddings)"]

    reversed_oracle = evaluation.teacher_gates(
        ScriptedTeachers(image_embeds, text_embeds, lambda image, text: -oracle_match(image, text)), split, top_k=2)
    assert reversed_oracle["reranked"]["rsum"] < 587.5
    assert reversed_oracle["gates"] == {"dual_beats_matchers": True, "reranking_beats_dual": False, "passed": False}


def test_gates_fail_a_fusion_teacher_no_better_than_the_dual_teacher():
    """A fusion teacher that ranks captions as the dual teacher does re-ranks nothing; right on every colour swap but
    wrong on every relation flip, it ties the dual teacher's 50% binding accuracy."""
    split = gate_split()
    image_embeds, text_embeds = near_perfect_dual()
    swaps, flips = (set(range(start, start + GATE_IMAGES)) for start in (GATE_IMAGES, 2 * GATE_IMAGES))

    def match(image: int, text: int) -> float:
        return float(image_embeds[image] @ text_embeds[text]) - (text in swaps) + (text in flips)

    gates = teacher_gates(ScriptedTeachers(image_embeds, text_embeds, match), split, top_k=2)
    assert (gates["fusion"]["swap_accuracy"], gates["fusion"]["flip_accuracy"]) == (100.0, 0.0)
    assert gates["fusion"]["binding_accuracy"] == gates["dual"]["binding_accuracy"] == 50.0
    assert gates["reranked"]["rsum"] == gates["dual"]["rsum"] == 587.5
    assert gates["gates"] == {"dual_beats_matchers": True, "fusion_beats_dual_binding": False,
                              "reranking_beats_dual": False, "passed": False, "fusion_binding_above_90": False}
