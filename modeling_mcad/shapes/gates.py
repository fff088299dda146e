"""The gates of the mcad-shapes teachers (DESIGN §6): a teacher that fails its gate teaches nothing.

`teacher_gates(teachers, split)` is `evaluation.teacher_gates` on an mcad-shapes split (select on validation, report
on test) with the bag-of-words matchers as the dual teacher's floors: the dual teacher against them, the fusion
teacher against the dual teacher on binding accuracy, and the fusion teacher as a re-ranker of the dual teacher's
top k.
"""

from collections.abc import Sequence

import datasets

from .. import evaluation
from .generator import matcher_embeddings

GATE_MATCHERS = ("colour_shape", "colour_shape_orientation")


def teacher_gates(
    teachers,
    split: datasets.Dataset,
    top_k: int = 10,
    matchers: Sequence[str] = GATE_MATCHERS,
    batch_size: int = 256,
    seed: int = 0,
) -> dict:
    """
    The teachers' gates on an mcad-shapes split: `evaluation.teacher_gates` (see there for what is measured) with
    the bag-of-words matchers (`shapes.matcher_embeddings`) as the floors, rows `bag of words (NAME)`.

    Args:
        teachers ([`MCADTeacher`] or [`TeacherModels`]): anything with `processors` (`"dual"`, `"fusion"`),
            `encode_images`, `encode_texts` and `fuse`.
        split (`datasets.Dataset`): an mcad-shapes split (`image`, `captions`, `swapped_captions`,
            `flipped_captions`, `scene`).
        top_k (`int`): candidates the fusion teacher re-ranks per query.
        matchers (sequence of `str`): the bag-of-words matchers the dual teacher must beat.
        batch_size (`int`): images or texts per dual-teacher call.
        seed (`int`): the matchers' tie-breaking seed.
    """
    floors = {f"bag of words ({name})": matcher_embeddings(split, name, seed=seed) for name in matchers}
    return evaluation.teacher_gates(teachers, split, top_k=top_k, floors=floors, batch_size=batch_size)


__all__ = ["GATE_MATCHERS", "teacher_gates"]
