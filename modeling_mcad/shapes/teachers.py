"""The mcad-shapes teachers (DESIGN §6): a CLIP dual teacher and the `MCADFusionModel` fusion teacher, built from
transformers configs with random weights and trained here, with the supervision mcad-shapes' scene graphs allow.

- `shapes_teachers(...)`: a `CLIPModel` (the dual teacher, ≥ 10× the `shapes` student) with its offline processor,
  and an `MCADFusionModel` (the fusion teacher: a single-stream stack over the dual teacher's token states).
- `train_fusion_stack(...)`: the fusion teacher's recipe — a listwise matching loss over swap / flip distractors,
  mined captions and false family siblings, a canonical-wording phase first, grounding and relation supervision.

The dual teacher trains with the library's generic `teacher_training.train_dual_teacher`.

    teachers = shapes_teachers(image_size=32, seed=0)
    train_dual_teacher(teachers.dual, teachers.dual_processor, splits["train"], epochs=5)
    train_fusion_stack(teachers.fusion, teachers.fusion_processor, splits["train"], dual_teacher=teachers.dual)
    teacher = teachers.to_mcad_teacher()                     # frozen, ready for the adapter fit and the cache
"""

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from transformers import BertTokenizer, CLIPConfig, CLIPModel, CLIPProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from ..configuration_mcad import PRESET_SPECIAL_TOKEN_IDS, PRESET_VOCABULARY
from ..data import TextTable, TrainingPairs
from ..errors import UserError
from ..fusion_model import MCADFusionModel, MCADFusionOutput, sincos_positions
from ..optimization import TrainingStep, adamw_with_cosine, autocast
from ..teacher_training import TeacherModels, TrainingHistory, mine_hard_negatives, prepare_cpu
from ..utils import progress
from .generator import ORIENTATION_WORDS, SHAPES, caption_grounding, caption_is_true

logger = logging.getLogger(__name__)

MAX_CAPTION_TOKENS = 32
# Family siblings a caption is false of, ranked below its own image in each fusion step (the rest are left out).
SIBLINGS_PER_CAPTION = 2


def shapes_tokenizer(max_length: int = MAX_CAPTION_TOKENS) -> BertTokenizer:
    """
    A lower-casing WordPiece tokenizer over `PRESET_VOCABULARY` (the student's), built offline: ids 0-4 are [PAD],
    [UNK], [CLS], [SEP], [MASK]. It returns `input_ids` and `attention_mask` only (CLIP's text model takes no
    token type ids).
    """
    return BertTokenizer(vocab={token: index for index, token in enumerate(PRESET_VOCABULARY)},
                         model_max_length=max_length, model_input_names=["input_ids", "attention_mask"])


def shapes_teachers(
    image_size: int = 32,
    patch_size: int = 8,
    dual_width: int = 256,
    dual_layers: int = 4,
    dual_projection_dim: int = 256,
    fusion_width: int = 128,
    fusion_layers: int = 4,
    seed: int = 0,
) -> TeacherModels:
    """
    Randomly initialised teachers for mcad-shapes, with an offline processor (images resized to `image_size`,
    captions tokenized by `shapes_tokenizer`) that both use.

    - dual: a `CLIPModel`, vision and text towers of `dual_width` × `dual_layers` (the defaults: 6.5M parameters,
      10× the `shapes` student). CLIP pools the text at the end-of-text token: here [SEP] (`eos_token_id`), with
      [PAD] = 0. Its patch positions start from 2D sine-cosine values (trainable): the relations of mcad-shapes need
      to know where a patch is from the first step on.
    - fusion: an [`MCADFusionModel`] of `fusion_width` × `fusion_layers` over a copy of the dual teacher (its
      unimodal encoders: `train_fusion_stack` copies the trained dual teacher in). ViLT and BLIP trained from
      scratch here stayed at chance on binding (docs/experiments).

    Args:
        image_size (`int`): the models' input side in pixels (mcad-shapes images are resized to it).
        patch_size (`int`): the ViT patch side: (image_size / patch_size)² image tokens.
        dual_width, dual_layers, dual_projection_dim (`int`): the CLIP towers' width and depth, and d_T.
        fusion_width, fusion_layers (`int`): the fusion stack's width and depth.
        seed (`int`): the initialisation seed.
    """
    if image_size % patch_size:
        raise UserError(f"image_size={image_size} must be a multiple of patch_size={patch_size}.")
    tokenizer = shapes_tokenizer()
    torch.manual_seed(seed)
    dual = CLIPModel(CLIPConfig(
        vision_config={"image_size": image_size, "patch_size": patch_size, "hidden_size": dual_width,
                       "intermediate_size": 4 * dual_width, "num_hidden_layers": dual_layers,
                       "num_attention_heads": dual_width // 64},
        text_config={"vocab_size": len(PRESET_VOCABULARY), "max_position_embeddings": MAX_CAPTION_TOKENS,
                     "hidden_size": dual_width, "intermediate_size": 4 * dual_width,
                     "num_hidden_layers": dual_layers,
                     "num_attention_heads": dual_width // 64, **PRESET_SPECIAL_TOKEN_IDS},
        projection_dim=dual_projection_dim,
    ))
    with torch.no_grad():
        dual.vision_model.embeddings.position_embedding.weight.copy_(
            sincos_positions(image_size // patch_size, dual_width))
    fusion = MCADFusionModel.from_dual_teacher(dual, hidden_size=fusion_width, num_hidden_layers=fusion_layers,
                                               num_attention_heads=fusion_width // 32)
    images = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size,
                                                                                   "width": image_size})
    processor = CLIPProcessor(image_processor=images, tokenizer=tokenizer)
    return TeacherModels(dual=dual, dual_processor=processor, fusion=fusion, fusion_processor=processor)



# --- The fusion teacher's training ---------------------------------------------------------------------------------


def false_siblings(captions: Sequence[str], image_of: Sequence[int], families: Sequence[int],
                   scenes: Sequence[str]) -> list[list[int]]:
    """Per caption, the other images of its image's family that it is false of (`shapes.caption_is_true`)."""
    members: dict[int, list[int]] = {}
    for image, family in enumerate(families):
        members.setdefault(family, []).append(image)
    return [[other for other in members[families[image]]
             if other != image and not caption_is_true(caption, scenes[other])]
            for caption, image in zip(captions, image_of)]


def first_relation_token(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Per text, the position of its first relation word ("left", "above", ...; 0 where it has none)."""
    relation_ids = set(tokenizer.convert_tokens_to_ids(list(ORIENTATION_WORDS)))
    return torch.tensor([next((t for t, token in enumerate(ids) if token in relation_ids), 0)
                         for ids in input_ids.tolist()], dtype=torch.long)


@dataclass
class FusionStackTargets:
    """
    What `train_fusion_stack` supervises besides the match. Per training pair: the family siblings its caption is
    false of (up to `SIBLINGS_PER_CAPTION`, -1: none), each named object's shape-word position and centre (x, y).
    Per text row of `pairs.texts` (captions and distractors): the position of its relation word.
    """

    siblings: torch.Tensor
    shape_token: torch.Tensor
    centre: torch.Tensor
    grounded: torch.Tensor
    relation_token: torch.Tensor

    @classmethod
    def from_pairs(cls, pairs: TrainingPairs, split: datasets.Dataset, tokenizer,
                   processor_name: str = "fusion") -> "FusionStackTargets":
        scenes, table = split["scene"], pairs.tables[processor_name]
        captions = [pairs.texts[row] for row in pairs.caption_row.tolist()]
        siblings = torch.full((len(pairs), SIBLINGS_PER_CAPTION), -1, dtype=torch.long)
        for pair, false_of in enumerate(false_siblings(captions, pairs.image_index.tolist(), pairs.family.tolist(),
                                                       scenes)):
            kept = false_of[:SIBLINGS_PER_CAPTION]
            siblings[pair, : len(kept)] = torch.tensor(kept, dtype=torch.long)
        shape_ids = set(tokenizer.convert_tokens_to_ids(list(SHAPES)))
        shape_token, centre = torch.zeros(len(pairs), 3, dtype=torch.long), torch.zeros(len(pairs), 3, 2)
        grounded = torch.zeros(len(pairs), 3, dtype=torch.bool)
        for pair, (image, row) in enumerate(zip(pairs.image_index.tolist(), pairs.caption_row.tolist())):
            tokens = [t for t, token in enumerate(table.input_ids[row].tolist()) if token in shape_ids]
            for named, (xy, token) in enumerate(zip(caption_grounding(captions[pair], scenes[image]), tokens)):
                shape_token[pair, named], centre[pair, named], grounded[pair, named] = token, torch.tensor(xy), True
        return cls(siblings=siblings, shape_token=shape_token, centre=(centre - 0.5) * 4,  # about unit variance
                   grounded=grounded, relation_token=first_relation_token(table.input_ids, tokenizer))


@torch.no_grad()
def fusion_image_states(model: MCADFusionModel, pixel_values: torch.Tensor,
                        batch_size: int = 256) -> dict[str, torch.Tensor]:
    """
    The frozen unimodal vision encoder's token states of every image (`"images"`, float16, on the CPU: the whole
    split is held, a few bytes per pixel) and v (`"image_embeds"`); the encoder runs on the model's device.
    """
    model.unimodal.eval()
    vision = model.config.unimodal_config
    states = torch.empty(len(pixel_values), len(model.patch_positions), vision.vision_config.hidden_size,
                         dtype=torch.float16)
    embeds = torch.empty(len(pixel_values), vision.projection_dim)
    for start in range(0, len(pixel_values), batch_size):
        chunk = model.image_states(pixel_values[start : start + batch_size].to(model.device))
        states[start : start + len(chunk)] = chunk.half().cpu()
        embeds[start : start + len(chunk)] = model.image_embeds(chunk).float().cpu()
    return {"images": states, "image_embeds": embeds}


@dataclass
class EncodedTexts:
    """Distinct text rows of a `TextTable` through the frozen unimodal text encoder: states, mask and t."""

    rows: torch.Tensor
    states: torch.Tensor
    mask: torch.Tensor
    embeds: torch.Tensor

    @classmethod
    @torch.no_grad()
    def of(cls, model: MCADFusionModel, table: TextTable, rows: torch.Tensor) -> "EncodedTexts":
        rows = torch.unique(rows)
        input_ids, mask = table.rows(rows)
        states, embeds = model.text_states(input_ids.to(model.device), mask.to(model.device))
        return cls(rows, states, mask.to(model.device), embeds)

    def index(self, text_rows: torch.Tensor) -> torch.Tensor:
        """Positions of these text rows (all of them encoded here) in `states`."""
        return torch.searchsorted(self.rows, text_rows)


def fuse_cached(model: MCADFusionModel, images: dict[str, torch.Tensor], texts: EncodedTexts, image_rows: torch.Tensor,
                text_rows: torch.Tensor) -> MCADFusionOutput:
    """The fusion stack on pairs (image_rows[p], text_rows[p]): images from `fusion_image_states`, texts encoded."""
    device, position = model.device, texts.index(text_rows)
    return model.fuse(images["images"][image_rows].to(device), texts.states[position], texts.mask[position],
                      images["image_embeds"][image_rows].to(device), texts.embeds[position])


def train_fusion_stack(
    model: MCADFusionModel,
    processor,
    train_split: datasets.Dataset,
    dual_teacher: CLIPModel | None = None,
    steps: int = 350,
    canonical_steps: int = 150,
    lr: float = 5e-4,
    batch_size: int = 64,
    grounding: float = 1.0,
    relation: float = 1.0,
    weight_decay: float = 0.05,
    warmup_steps: int = 50,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    pairs: TrainingPairs | None = None,
    autocast_dtype: torch.dtype | None = None,
    on_step: Callable[[int, MCADFusionModel], None] | None = None,
) -> TrainingHistory:
    """
    Train the fusion stack of an [`MCADFusionModel`] on mcad-shapes. Its unimodal encoders (the trained dual teacher,
    copied in from `dual_teacher` when given) stay frozen: their states of every image are computed once, of each
    step's texts in the step.

    Each step takes `batch_size` pairs in batches of whole families (`TrainingPairs.epoch_batches`) and a listwise
    loss: per image, cross-entropy over {its caption, the caption's colour swap, its relation flip, the dual
    teacher's hardest in-batch caption}; per caption, over {its image, up to `SIBLINGS_PER_CAPTION` family siblings
    it is false of, the hardest in-batch image}. For the first `canonical_steps` captions are
    canonical only (left / top object named first) and flips are left out (the word alone would tell them): the
    stack learns which named object is left / above; then every wording. Auxiliary losses on the caption tokens'
    states after `config.relation_layer`: `grounding` · the squared error of each named object's centre regressed from
    its shape word, `relation` · the cross-entropy of the object order read at the relation word (of the caption and
    of its flip: the image decides, not the word). docs/experiments records every variant tried.

    Args:
        model ([`MCADFusionModel`]): trained in place (left in eval mode).
        processor: the model's processor (the dual teacher's); its tokenizer finds shape and relation words.
        train_split (`datasets.Dataset`): mcad-shapes rows (`scene`, `family`, `canonical`, distractor columns).
        dual_teacher ([`CLIPModel`], *optional*): the trained dual teacher, copied into `model.unimodal` first.
        steps, canonical_steps, lr, batch_size, weight_decay, warmup_steps, max_grad_norm: the schedule.
        grounding, relation (`float`): the auxiliary losses' weights (0: off).
        seed (`int`): caption draws and batch order.
        pairs ([`TrainingPairs`], *optional*): the split already encoded with `{"fusion": processor}`.
        autocast_dtype (`torch.dtype`, *optional*): mixed precision for the forward passes (e.g. `torch.bfloat16`);
            None: float32.
        on_step (`Callable[[int, MCADFusionModel], None]`, *optional*): called after every step with the step number
            (from 1) and the model (in train mode; switch it to eval to score).
    """
    start = time.perf_counter()
    prepare_cpu(model)
    if not {"scene", "family"} <= set(train_split.column_names):
        raise ValueError("train_fusion_stack needs mcad-shapes columns `scene` and `family` (the scene graph gives the "
                         "siblings, the grounding and the object order); build the split with make_shapes.")
    pairs = pairs if pairs is not None else TrainingPairs.from_split(train_split, {"fusion": processor})
    model.use_dual_teacher(dual_teacher)
    images = fusion_image_states(model, pairs.pixel_values["fusion"])
    targets = FusionStackTargets.from_pairs(pairs, train_split, processor.tokenizer)
    # Only the stack trains: the frozen encoders are left out of the optimiser and have no gradients.
    training_step = TrainingStep(model, *adamw_with_cosine(model, lr, steps, weight_decay, warmup_steps),
                                 max_grad_norm)
    history, step, epoch = TrainingHistory(), 0, 0
    bar = progress(total=steps, desc="fusion teacher")
    model.train()
    model.unimodal.eval()
    while step < steps:
        canonical_phase = step < canonical_steps
        batches = pairs.epoch_batches(epoch, batch_size, seed, canonical_only=canonical_phase, group_families=True)
        if not batches:
            raise UserError(f"batch_size={batch_size} is larger than the images drawn per epoch; lower it.")
        for index in batches:
            with autocast(model.device, autocast_dtype):
                loss = _fusion_stack_loss(model, images, pairs, targets, index, canonical_phase, grounding, relation)
            training_step(loss)
            history.losses.append(loss.item())
            step += 1
            bar.update(1)
            if step % 100 == 0:
                bar.set_postfix(loss=f"{np.mean(history.losses[-100:]):.3f}")
                logger.info("fusion teacher: step %d/%d, loss %.4f", step, steps, np.mean(history.losses[-100:]))
            if on_step is not None:
                on_step(step, model)
            if step >= steps or canonical_phase != (step < canonical_steps):
                break
        epoch += 1
    bar.close()
    model.eval()
    history.seconds = time.perf_counter() - start
    logger.info("fusion teacher: %d steps, loss %.4f -> %.4f, %.0f s", steps, np.mean(history.losses[:50]),
                np.mean(history.losses[-50:]), history.seconds)
    return history


def _fusion_stack_loss(model, images, pairs: TrainingPairs, targets: FusionStackTargets, index: torch.Tensor,
                       canonical_phase: bool, grounding: float, relation: float) -> torch.Tensor:
    image, caption = pairs.image_index[index], pairs.caption_row[index]
    swapped, flipped = pairs.swapped_row[index], pairs.flipped_row[index]
    # Every text this step reads, each through the frozen text encoder once: captions and their distractors.
    texts = EncodedTexts.of(model, pairs.tables["fusion"], torch.cat([caption, swapped[swapped >= 0],
                                                                      flipped[flipped >= 0]]))
    similarity = images["image_embeds"][image] @ texts.embeds[texts.index(caption)].cpu().t()
    text_of_image, image_of_text = mine_hard_negatives(similarity, caption[:, None] == caption[None, :])
    mined_text, mined_image = caption[text_of_image], image[image_of_text]
    # Per image: its caption, the swap, the flip, the mined caption (a missing distractor: the mined one, masked).
    candidates = torch.stack([caption, torch.where(swapped >= 0, swapped, mined_text),
                              torch.where(flipped >= 0, flipped, mined_text), mined_text], 1)
    text_valid = torch.ones_like(candidates, dtype=torch.bool)
    text_valid[:, 1], text_valid[:, 2] = swapped >= 0, (flipped >= 0) & (not canonical_phase)
    # Per caption: its image (scored above), the false siblings (a missing one: its own image, masked), the mined image.
    sibling = targets.siblings[index]
    other_images = torch.cat([torch.where(sibling >= 0, sibling, image[:, None]), mined_image[:, None]], 1)
    per_text, per_image_count = candidates.shape[1], other_images.shape[1]
    output = fuse_cached(model, images, texts,
                         torch.cat([image.repeat_interleave(per_text), other_images.flatten()]),
                         torch.cat([candidates.flatten(), caption.repeat_interleave(per_image_count)]))
    split = per_text * len(index)
    per_image = output.match_logits[:split].view(-1, per_text)
    per_caption = torch.cat([per_image[:, :1], output.match_logits[split:].view(-1, per_image_count)], 1)
    device = per_image.device
    image_valid = torch.cat([torch.ones(len(index), 1, dtype=torch.bool), sibling >= 0,
                             torch.ones(len(index), 1, dtype=torch.bool)], 1).to(device)
    target = torch.zeros(len(index), dtype=torch.long, device=device)
    loss = (F.cross_entropy(per_image.masked_fill(~text_valid.to(device), -1e4), target)
            + F.cross_entropy(per_caption.masked_fill(~image_valid, -1e4), target))
    rows = torch.arange(len(index))
    relation_states = output.relation_states[:split].view(len(index), per_text, *output.relation_states.shape[1:])
    if grounding and targets.grounded[index].any():
        predicted = model.grounding_head(relation_states[:, 0][rows[:, None], targets.shape_token[index]])
        error = ((predicted - targets.centre[index].to(device)) ** 2).sum(-1)
        loss = loss + grounding * error[targets.grounded[index].to(device)].mean()
    if relation and (flipped >= 0).any():
        related = flipped >= 0
        for column, rows_of in ((0, caption), (2, flipped.clamp(min=0))):
            order = model.relation_head(relation_states[:, column][rows, targets.relation_token[rows_of]]).squeeze(-1)
            loss = loss + relation * F.binary_cross_entropy_with_logits(
                order[related.to(device)], pairs.canonical[index][related].float().to(device)) / 2
    return loss


__all__ = [
    "MAX_CAPTION_TOKENS",
    "FusionStackTargets",
    "false_siblings",
    "first_relation_token",
    "EncodedTexts",
    "fuse_cached",
    "fusion_image_states",
    "shapes_teachers",
    "shapes_tokenizer",
    "train_fusion_stack",
]
