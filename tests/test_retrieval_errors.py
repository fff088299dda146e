"""benchmarks/retrieval_errors.py: each first answer sorted by how its image relates to the right one."""

import sys

import pytest
import torch

from .conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import retrieval_errors  # noqa: E402

from modeling_mcad.shapes import reference_caption  # noqa: E402


def scene(*objects, axis: str = "horizontal") -> dict:
    """A scene with a relation, its objects (size, colour, shape) left to right (or top to bottom)."""
    return {"axis": axis, "relations": True,
            "objects": [{"shape": shape, "colour": colour, "size": size, "x": (1 + i) / (1 + len(objects)), "y": 0.5}
                        for i, (size, colour, shape) in enumerate(objects)]}


BASE = scene(("small", "red", "circle"), ("large", "blue", "square"))
SCENES = [
    BASE,
    scene(("large", "blue", "square"), ("small", "red", "circle")),  # places swapped
    scene(("small", "blue", "circle"), ("large", "red", "square")),  # colours swapped
    scene(("small", "red", "circle"), ("large", "blue", "triangle")),  # one attribute changed
    scene(("small", "green", "star"), ("large", "yellow", "heart")),  # another family
    scene(("small", "red", "circle"), ("large", "blue", "square"), axis="vertical"),  # BASE's objects in a column
    scene(("small", "red", "circle"), ("large", "blue", "square"), ("small", "green", "star")),  # BASE's is true
]
FAMILY = [0, 0, 0, 0, 1, 2, 3]
CAPTIONS = [reference_caption(s) for s in SCENES]  # one caption per image
TEXT_TO_IMAGE = list(range(len(SCENES)))


def test_every_image_answered_with_the_base_caption_is_sorted_by_its_relation_to_the_base():
    first_caption = torch.zeros(len(SCENES), dtype=torch.long)  # every image ranks BASE's caption first
    first_image = torch.arange(len(SCENES))  # every caption finds its own image
    kinds = retrieval_errors.first_answer_kinds(first_caption, first_image, CAPTIONS, TEXT_TO_IMAGE, FAMILY, SCENES)
    expected = {**{kind: 100 / 7 for kind in retrieval_errors.KINDS}, "two edits": 0.0, "other family, false": 200 / 7}
    assert kinds["i2t"] == pytest.approx(expected)
    assert kinds["t2i"] == {kind: 100.0 if kind == "right" else 0.0 for kind in retrieval_errors.KINDS}


def test_text_to_image_judges_the_query_caption_on_the_answered_image():
    first_caption = torch.arange(len(SCENES))
    # BASE's caption answered with the last image (of which it is true), the swapped-places caption with BASE, the
    # other family's caption with BASE (false of it), the last image's caption with BASE (its star is not there).
    first_image = torch.tensor([6, 0, 2, 3, 0, 5, 0])
    kinds = retrieval_errors.first_answer_kinds(first_caption, first_image, CAPTIONS, TEXT_TO_IMAGE, FAMILY, SCENES)
    assert kinds["i2t"]["right"] == 100.0
    assert kinds["t2i"] == pytest.approx({"right": 300 / 7, "places swapped": 100 / 7, "colours swapped": 0.0,
                                          "attribute changed": 0.0, "two edits": 0.0, "other family, true": 100 / 7,
                                          "other family, false": 200 / 7})


def test_two_variants_of_one_base_are_two_edits_apart_and_a_column_is_not_a_row():
    colours, places, attribute = SCENES[2], SCENES[1], SCENES[3]
    assert retrieval_errors.near_duplicate_kind(colours, places) == "two edits"
    assert retrieval_errors.near_duplicate_kind(places, attribute) == "two edits"
    # BASE's caption names the column's objects in its order, but says "left of".
    assert retrieval_errors.pair_kind(5, 0, CAPTIONS[0], FAMILY, SCENES) == "other family, false"


def test_a_setting_shows_every_command_that_wrote_a_row_it_shows():
    kinds = {direction: {kind: 0.0 for kind in retrieval_errors.KINDS} for direction in ("i2t", "t2i")}
    earlier = "python benchmarks/retrieval_errors.py --settings tiny --rows a b --seeds 5 6"
    later = "python benchmarks/retrieval_errors.py --settings tiny --rows c --seeds 5 6"
    report = {"settings": {"tiny": {"dual teacher": {"seeds": [], **kinds},  # a teacher row: written by every command
                                    "a": {"seeds": [5, 6], "command": earlier, **kinds},
                                    "b": {"seeds": [5, 6], "command": earlier, **kinds},
                                    "c": {"seeds": [5, 6], "command": later, **kinds}}}}
    text = retrieval_errors.markdown(report)
    assert f"```\n{earlier}\n{later}\n```" in text
