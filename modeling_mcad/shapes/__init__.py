"""mcad-shapes, the package's built-in benchmark world (DESIGN §6): the generator, its teachers and their gates.

The library (`modeling_mcad.*` outside this subpackage) never imports it. Its fusion teacher is the library's
`modeling_mcad.fusion_model.MCADFusionModel` (a saved teacher carries that file, so it loads anywhere); what is
mcad-shapes' own is how that teacher is trained.

- `generator`: `make_shapes` (the splits), `to_imagefolder`, the bag-of-words matchers, `caption_is_true`.
- `teachers`: `shapes_teachers`, `train_fusion_stack` (the fusion teacher's recipe).
- `gates`: `teacher_gates`.
"""

from .gates import GATE_MATCHERS, teacher_gates
from .generator import (
    COLOURS,
    MATCHERS,
    ORIENTATION_WORDS,
    SHAPES,
    caption_grounding,
    caption_is_true,
    make_shapes,
    matcher_embeddings,
    reference_caption,
    shapes_splits,
    to_imagefolder,
)
from .teachers import (
    MAX_CAPTION_TOKENS,
    EncodedTexts,
    FusionStackTargets,
    false_siblings,
    first_relation_token,
    fuse_cached,
    fusion_image_states,
    shapes_teachers,
    shapes_tokenizer,
    train_fusion_stack,
)

__all__ = [
    "COLOURS",
    "GATE_MATCHERS",
    "MATCHERS",
    "MAX_CAPTION_TOKENS",
    "ORIENTATION_WORDS",
    "SHAPES",
    "EncodedTexts",
    "FusionStackTargets",
    "caption_grounding",
    "caption_is_true",
    "false_siblings",
    "first_relation_token",
    "fuse_cached",
    "fusion_image_states",
    "make_shapes",
    "matcher_embeddings",
    "reference_caption",
    "shapes_splits",
    "shapes_teachers",
    "shapes_tokenizer",
    "teacher_gates",
    "to_imagefolder",
    "train_fusion_stack",
]
