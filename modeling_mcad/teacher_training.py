"""The teachers stage on mcad-shapes: build, train and gate a dual teacher and a fusion teacher from scratch.

MCAD needs two teachers (DESIGN §1, §3). Real ones come from the Hub; on the built-in benchmark they are trained
here, from random weights, on the training split — as real transformers classes, so the rest of the package treats
them exactly like CLIP and BLIP checkpoints:

- `shapes_teachers(...)`: a `CLIPModel` (the dual teacher, ≥ 10× the `shapes` student) with its offline processor,
  and an `MCADFusionModel` (the fusion teacher: a single-stream stack over the dual teacher's token states).
- `train_dual_teacher(...)`: CLIP's contrastive loss, one caption per image per batch (DESIGN §3).
- `train_fusion_stack(...)`: the shapes fusion teacher — a listwise matching loss over swap / flip distractors,
  mined captions and false family siblings, a canonical-wording phase first, grounding and relation supervision.
- `train_fusion_teacher(...)`: fine-tuning a published cross-encoder (BLIP, ViLT): BLIP's image-text matching loss,
  balanced between positives and negatives, on hard negatives mined by the dual teacher and distractors, with a
  wording curriculum. From scratch on mcad-shapes it stays at chance on binding (BENCHMARKS.md, issue 8).
- `teacher_gates(...)`: the gates of DESIGN §7 — the dual teacher beats the bag-of-words matchers; the fusion teacher
  beats it on binding accuracy and as a re-ranker of its top-k.

Typical use (what the teachers stage of `train_mcad.py` does):

    teachers = shapes_teachers(image_size=32, seed=0)
    train_dual_teacher(teachers.dual, teachers.dual_processor, splits["train"], epochs=5)
    train_fusion_stack(teachers.fusion, teachers.fusion_processor, splits["train"], dual_teacher=teachers.dual)
    gates = teacher_gates(teachers, splits["validation"])   # select on validation, report on test
    teacher = teachers.to_mcad_teacher()                     # frozen, ready for the adapter fit and the cache

Training runs in one process (the teachers are small; on real data, fine-tune real teachers elsewhere and pass their
Hub names to `train_mcad.py`). On the CPU it flushes denormal floats to zero: Adam's second moments otherwise sink
into subnormal numbers late in training and every step becomes about 100× slower.
"""

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPProcessor,
    PreTrainedModel,
    get_cosine_schedule_with_warmup,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .configuration_mcad import PRESET_SPECIAL_TOKEN_IDS, PRESET_VOCABULARY
from .cross_encoders import CrossEncoder, FusionOutput, cross_encoder_class
from .data import OneCaptionPerImageSampler, flatten_pairs, to_rgb
from .evaluation import binding_probe, flatten_captions, metrics_from_ranks, retrieval_metrics, retrieval_ranks
from .fusion_teacher import MCADFusionModel, MCADFusionOutput, sincos_positions
from .shapes import ORIENTATION_WORDS, SHAPES, caption_grounding, caption_is_true, matcher_embeddings
from .teachers import MCADTeacher, _embedding

logger = logging.getLogger(__name__)

MAX_CAPTION_TOKENS = 32
GATE_MATCHERS = ("colour_shape", "colour_shape_orientation")
# The kinds of pairs a fusion training step scores.
POSITIVE, DISTRACTOR, MINED = 0, 1, 2


# --- The teachers ----------------------------------------------------------------------------------------------------


@dataclass
class TeacherModels:
    """
    The dual and the fusion teacher with their processors, trainable (an [`MCADTeacher`] freezes them). Offers the
    evaluation interface of `MCADTeacher` (`processors`, `encode_images`, `encode_texts`, `fuse`), so
    `teacher_gates` takes either.

    Args:
        dual ([`PreTrainedModel`]): a dual-stream model with `get_image_features` / `get_text_features`
            (CLIPModel, ...).
        dual_processor: its processor (images and text).
        fusion ([`PreTrainedModel`]): a single-stream ITM model with a registered cross-encoder adapter
            (MCADFusionModel, BlipForImageTextRetrieval, ViltForImageAndTextRetrieval, ...).
        fusion_processor: its processor.
    """

    dual: PreTrainedModel
    dual_processor: object
    fusion: PreTrainedModel
    fusion_processor: object

    @property
    def processors(self) -> dict:
        return {"dual": self.dual_processor, "fusion": self.fusion_processor}

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """v: the dual teacher's L2-normalised image embeddings (float32)."""
        features = self.dual.get_image_features(pixel_values=pixel_values.to(self.dual.device))
        return F.normalize(_embedding(features).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """t: the dual teacher's L2-normalised text embeddings (float32)."""
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.dual.device)
        features = self.dual.get_text_features(input_ids=input_ids.to(self.dual.device), attention_mask=attention_mask)
        return F.normalize(_embedding(features).float(), dim=-1)

    @torch.no_grad()
    def fuse(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             pairs: torch.Tensor | None = None) -> FusionOutput:
        """The fusion teacher on (image, text) pairs, each image encoded once (see `CrossEncoder.forward`)."""
        device = self.fusion.device
        mask = None if attention_mask is None else attention_mask.to(device)
        return _cross_encoder(self.fusion)(pixel_values.to(device), input_ids.to(device), mask,
                                           pairs=None if pairs is None else pairs.to(device))

    def to_mcad_teacher(self, **knobs) -> MCADTeacher:
        """The two teachers (frozen in place) with a fresh fusion adapter: `MCADTeacher.from_teachers`."""
        return MCADTeacher.from_teachers(self.dual, self.fusion, dual_processor=self.dual_processor,
                                         fusion_processor=self.fusion_processor, **knobs)


def _cross_encoder(model: PreTrainedModel) -> CrossEncoder:
    """The cross-encoder adapter around a fusion model: shares its parameters, freezes nothing."""
    return cross_encoder_class(model.config.model_type)(model)


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
      scratch here stayed at chance on binding (BENCHMARKS.md, issue 8).

    Args:
        image_size (`int`): the models' input side in pixels (mcad-shapes images are resized to it).
        patch_size (`int`): the ViT patch side: (image_size / patch_size)² image tokens.
        dual_width, dual_layers, dual_projection_dim (`int`): the CLIP towers' width and depth, and d_T.
        fusion_width, fusion_layers (`int`): the fusion stack's width and depth.
        seed (`int`): the initialisation seed.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}.")
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


# --- Data: every image and text preprocessed once ----------------------------------------------------------------------


@dataclass
class TextTable:
    """Texts tokenized once by one processor, padded to a common length; `rows(index)` gives a batch."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The texts at `index`, cut to the longest of them."""
        mask = self.attention_mask[index]
        length = max(int(mask.sum(dim=1).max()), 1)
        return self.input_ids[index, :length], mask[:, :length]


def encode_images(images: Sequence, processor, batch_size: int = 256) -> torch.Tensor:
    """`pixel_values` of every image (PIL images or `datasets.Image` values), made by `processor`."""
    chunks = [processor(images=[to_rgb(image) for image in images[start : start + batch_size]],
                        return_tensors="pt")["pixel_values"]
              for start in range(0, len(images), batch_size)]
    return torch.cat(chunks)


def encode_texts(texts: Sequence[str], processor) -> TextTable:
    """Every text tokenized by `processor` (cut to the tokenizer's limit)."""
    encoding = processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
    return TextTable(encoding["input_ids"], encoding["attention_mask"])


@dataclass
class TrainingPairs:
    """
    A training split as tensors: per pair its image, its caption's text row and its distractors' rows (-1: none);
    every image and text encoded once per processor.

    Args:
        image_index (`torch.LongTensor` of shape `(pairs,)`): each pair's image.
        canonical (`torch.BoolTensor` of shape `(pairs,)`): whether the caption names the left/top object first.
        caption_row, swapped_row, flipped_row (`torch.LongTensor` of shape `(pairs,)`): rows of `texts`.
        texts (`list[str]`): every distinct caption and distractor.
        family (`torch.LongTensor` of shape `(images,)`, *optional*): each image's family of near-duplicates.
        pixel_values (`dict[str, torch.Tensor]`): per processor name, `(images, channels, height, width)`.
        tables (`dict[str, TextTable]`): per processor name, the tokenized `texts`.
    """

    image_index: torch.Tensor
    canonical: torch.Tensor
    caption_row: torch.Tensor
    swapped_row: torch.Tensor
    flipped_row: torch.Tensor
    texts: list[str]
    family: torch.Tensor | None = None
    pixel_values: dict[str, torch.Tensor] = field(default_factory=dict)
    tables: dict[str, TextTable] = field(default_factory=dict)

    @classmethod
    def from_split(cls, split: datasets.Dataset, processors: Mapping[str, object]) -> "TrainingPairs":
        """
        Args:
            split (`datasets.Dataset`): one row per image: `image`, `captions` and, for distractors and the wording
                curriculum, the mcad-shapes columns `canonical`, `swapped_captions`, `flipped_captions`.
            processors (`Mapping[str, processor]`): name -> processor; each encodes every image and text once.
        """
        # Whole columns, read without the per-row transform that attaches images (1.5 s a column for 15k pairs).
        columns = flatten_pairs(split).with_format(None)[:]
        captions = columns["caption"]
        swapped = columns.get("swapped_caption", [None] * len(captions))
        flipped = columns.get("flipped_caption", [None] * len(captions))
        canonical = columns.get("canonical", [True] * len(captions))
        row = {text: index for index, text in enumerate(dict.fromkeys(
            text for text in (*captions, *swapped, *flipped) if text is not None))}

        def rows(texts) -> torch.Tensor:
            return torch.tensor([-1 if text is None else row[text] for text in texts], dtype=torch.long)

        images = split.cast_column("image", datasets.Image(decode=False))[:]["image"]
        # Teachers that share one processor (the shapes teachers) share its encodings: each is made once.
        encoded = {}
        for processor in processors.values():
            if id(processor) not in encoded:
                encoded[id(processor)] = encode_images(images, processor), encode_texts(list(row), processor)
        return cls(
            image_index=torch.tensor(columns["image_index"], dtype=torch.long),
            canonical=torch.tensor(canonical, dtype=torch.bool),
            caption_row=rows(captions), swapped_row=rows(swapped), flipped_row=rows(flipped),
            texts=list(row),
            family=torch.tensor(split["family"], dtype=torch.long) if "family" in split.column_names else None,
            pixel_values={name: encoded[id(processor)][0] for name, processor in processors.items()},
            tables={name: encoded[id(processor)][1] for name, processor in processors.items()},
        )

    def __len__(self) -> int:
        return len(self.image_index)

    def epoch_batches(self, epoch: int, batch_size: int, seed: int, all_wordings_share: float = 1.0,
                      group_families: bool = False) -> list[torch.Tensor]:
        """
        The pair indices of one epoch in batches of `batch_size` (the last, smaller one dropped): every image once
        with one of its captions drawn afresh (`OneCaptionPerImageSampler`). A random `all_wordings_share` of the
        images draw from all their captions, the others from their canonical captions only (images without one
        are then left out): 0 gives canonical captions only, 1 every wording.

        With `group_families` (and a `family` per image), the images of a family of near-duplicates come one after
        the other, families in a random order: a batch then holds each image's colour-swapped, place-swapped and
        re-coloured siblings, the hard negatives a random batch of a large split almost never holds.
        """
        if all_wordings_share >= 1:
            allowed = torch.arange(len(self.image_index))
        else:
            generator = torch.Generator().manual_seed(seed * 100_003 + epoch + 1)
            images = int(self.image_index.max()) + 1
            any_wording = torch.rand(images, generator=generator) < all_wordings_share
            allowed = torch.nonzero(self.canonical | any_wording[self.image_index]).flatten()
        if group_families and self.family is None:
            raise ValueError("group_families needs a `family` column in the split (mcad-shapes has one).")
        sampler = OneCaptionPerImageSampler(self.image_index[allowed].tolist(), seed=seed,
                                            image_groups=self.family if group_families else None)
        sampler.set_epoch(epoch)
        order = allowed[torch.tensor(list(sampler), dtype=torch.long)]
        return list(order[: len(order) // batch_size * batch_size].split(batch_size))


# --- Losses --------------------------------------------------------------------------------------------------------


class ContrastiveLoss(nn.Module):
    """
    CLIP's loss on B positive pairs: ½ [CE(S, diag) + CE(Sᵀ, diag)] with S = scale · <v_i, t_j>. Optional extra
    negative texts (NegCLIP) become extra columns of the image→text scores only: each image must prefer its caption
    to them as well.
    """

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                negative_text_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            image_embeds, text_embeds (`torch.Tensor` of shape `(B, d)`): L2-normalised, row i a positive pair.
            logit_scale (`torch.Tensor`): the log of the scale (CLIP's `logit_scale` parameter).
            negative_text_embeds (`torch.Tensor` of shape `(N, d)`, *optional*): L2-normalised extra negatives.
        """
        scale = logit_scale.exp()
        texts = text_embeds if negative_text_embeds is None else torch.cat([text_embeds, negative_text_embeds])
        return symmetric_cross_entropy(scale * image_embeds @ texts.t())


def symmetric_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """½ [CE(S, diag) + CE(S[:, :B]ᵀ, diag)] for scores S of B images × (B texts, then any extra negative texts)."""
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits[:, : len(logits)].t(), targets)) / 2


class BalancedMatchingLoss(nn.Module):
    """
    Image-text matching loss, balanced: ½ [mean over positives of softplus(−m) + mean over negatives of softplus(m)],
    with m the match logit (for a 2-way ITM head, logit(match) − logit(no match), so each term is that head's
    cross-entropy). However many negatives a positive gets, both classes weigh the same.
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


# --- Training ------------------------------------------------------------------------------------------------------


@dataclass
class TrainingHistory:
    """
    What a teacher's training did.

    Args:
        losses (`list[float]`): the loss of every step.
        epoch_losses (`list[float]`): the mean loss of every epoch.
        seconds (`float`): wall time, preprocessing included.
        steps (`list[dict]`): per step, the schedule's state (`lr`; for the fusion teacher `canonical_only` and
            `distractor_share`, the share of swap/flip distractors among the step's negatives).
    """

    losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: list[dict] = field(default_factory=list)


def _optimizer(model: nn.Module, lr: float, weight_decay: float, total_steps: int, warmup_fraction: float):
    # No decay on biases, norms, embeddings' positions and CLIP's logit scale (one-dimensional or scalar tensors).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(warmup_fraction * total_steps), total_steps)
    return optimizer, scheduler


def _step(loss: torch.Tensor, model: nn.Module, optimizer, scheduler, max_grad_norm: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()


def _end_epoch(model: nn.Module, epoch: int, history: TrainingHistory, on_epoch_end) -> None:
    if on_epoch_end is not None:
        model.eval()
        on_epoch_end(epoch + 1, history)
        model.train()


def _prepare_cpu(model: nn.Module) -> None:
    if model.device.type == "cpu":
        torch.set_flush_denormal(True)  # see the module docstring: subnormal Adam states make steps ~100× slower


def _distractor_rows(pairs: TrainingPairs, index: torch.Tensor, kinds: Sequence[str]) -> torch.Tensor:
    """(pair position in `index`, distractor text row) for every available distractor of the given kinds."""
    found = []
    for kind in kinds:
        rows = {"swap": pairs.swapped_row, "flip": pairs.flipped_row}[kind][index]
        position = torch.nonzero(rows >= 0).flatten()
        found.append(torch.stack([position, rows[position]], dim=1))
    return torch.cat(found) if found else torch.empty(0, 2, dtype=torch.long)


def train_dual_teacher(
    model: PreTrainedModel,
    processor,
    train_split: datasets.Dataset,
    epochs: int = 8,
    lr: float = 5e-4,
    batch_size: int = 128,
    weight_decay: float = 0.1,
    warmup_fraction: float = 0.1,
    max_grad_norm: float = 1.0,
    negatives: Sequence[str] = (),
    group_families: bool = True,
    seed: int = 0,
    pairs: TrainingPairs | None = None,
    on_epoch_end: Callable[[int, TrainingHistory], None] | None = None,
) -> TrainingHistory:
    """
    Train a dual-stream model (CLIPModel, or anything with `get_image_features` / `get_text_features` and a
    `logit_scale`) contrastively: CLIP's loss on batches holding each image once, with one of its captions drawn
    afresh each epoch (DESIGN §3). AdamW, linear warm-up then cosine decay, gradients clipped.

    Args:
        model ([`PreTrainedModel`]): trained in place (left in eval mode).
        processor: its processor; every image and caption is preprocessed once, before the first step.
        train_split (`datasets.Dataset`): one row per image, `image` and `captions` (plus the mcad-shapes columns for
            `negatives`).
        epochs, lr, batch_size, weight_decay, warmup_fraction, max_grad_norm: the optimisation. On mcad-shapes a
            CLIP from scratch at lr 1e-3 sits on a plateau that 5e-4 escapes (8000 images × 3 epochs: 159 against
            400 validation RSUM).
        negatives (sequence of `"swap"`, `"flip"`): NegCLIP-style extra negatives: each caption's colour-swapped and /
            or relation-flipped distractor joins the image→text candidates. Empty: plain CLIP.
        group_families (`bool`): batches of whole families of near-duplicates (`TrainingPairs.epoch_batches`), where
            the split has them: in-batch negatives that differ in binding, relation or one attribute.
        seed (`int`): caption draws and batch order.
        pairs ([`TrainingPairs`], *optional*): the split already encoded with `{"dual": processor}` (saves the
            preprocessing when several runs share it).
        on_epoch_end (`Callable[[int, TrainingHistory], None]`, *optional*): called after each epoch (its number,
            from 1) with the history so far, the model in eval mode (e.g. to log or to evaluate on validation).
    """
    start = time.perf_counter()
    _prepare_cpu(model)
    pairs = pairs if pairs is not None else TrainingPairs.from_split(train_split, {"dual": processor})
    pixels, table = pairs.pixel_values["dual"], pairs.tables["dual"]
    grouped = group_families and pairs.family is not None
    device = model.device
    steps_per_epoch = len(pairs.epoch_batches(0, batch_size, seed))
    if steps_per_epoch == 0:
        raise ValueError(f"The training split has fewer images than batch_size={batch_size}; lower batch_size.")
    optimizer, scheduler = _optimizer(model, lr, weight_decay, epochs * steps_per_epoch, warmup_fraction)
    loss_fn, history = ContrastiveLoss(), TrainingHistory()
    model.train()
    for epoch in range(epochs):
        epoch_losses = []
        for index in pairs.epoch_batches(epoch, batch_size, seed, group_families=grouped):
            images = F.normalize(_embedding(model.get_image_features(
                pixel_values=pixels[pairs.image_index[index]].to(device))), dim=-1)
            text_rows = pairs.caption_row[index]
            negative_rows = _distractor_rows(pairs, index, negatives)[:, 1]
            input_ids, attention_mask = table.rows(torch.cat([text_rows, negative_rows]))
            texts = F.normalize(_embedding(model.get_text_features(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))), dim=-1)
            loss = loss_fn(images, texts[: len(index)], model.logit_scale,
                           texts[len(index):] if len(negative_rows) else None)
            history.steps.append({"lr": scheduler.get_last_lr()[0]})
            _step(loss, model, optimizer, scheduler, max_grad_norm)
            with torch.no_grad():  # CLIP clamps its scale at 100
                model.logit_scale.clamp_(max=math.log(100))
            history.losses.append(loss.item())
            epoch_losses.append(loss.item())
        history.epoch_losses.append(float(np.mean(epoch_losses)))
        logger.info("dual teacher: epoch %d/%d, loss %.4f", epoch + 1, epochs, history.epoch_losses[-1])
        _end_epoch(model, epoch, history, on_epoch_end)
    model.eval()
    history.seconds = time.perf_counter() - start
    return history


@dataclass(frozen=True)
class FusionCurriculum:
    """
    The fusion teacher's schedule (DESIGN §7): which captions, and which negatives, at each point of training
    (`epoch` is fractional: step / steps per epoch).

    1. Random negatives for the first `random_negative_epochs`: a cross-encoder trained from scratch on hard negatives
       from its first step finds no signal it can use (telling near-duplicates apart needs the grounding it does not
       have yet) and collapses to a constant score.
    2. Then the hardest in-batch negatives under the dual teacher, and a share of colour-swap / relation-flip
       distractors rising linearly from 0 to `hard_negative_share` over `ramp_epochs`.
    Independently, the first `canonical_epochs` draw only canonical captions (naming the left / top object first),
    then a share of the images rising from 0 to 1 over `wording_ramp_epochs` draws from every paraphrase, inverse
    wordings included (all at once: a cross-encoder that has learned "the first-named object is on the left" meets
    inverse wordings as contradictions, and can fall back to a constant score).

    Args:
        canonical_epochs (`float`): epochs drawing canonical captions only.
        random_negative_epochs (`float`): epochs whose in-batch negatives are drawn at random, not mined.
        hard_negative_share (`float`): the share of swap/flip distractors among the negatives after the ramp (the
            rest are in-batch negatives).
        ramp_epochs (`float`): epochs over which the distractor share rises, from the end of the random phase
            (0: the full share at once).
        wording_ramp_epochs (`float`): epochs over which inverse wordings come in, after `canonical_epochs`
            (0: all at once).
    """

    canonical_epochs: float = 2.0
    random_negative_epochs: float = 2.0
    hard_negative_share: float = 0.8
    ramp_epochs: float = 1.0
    wording_ramp_epochs: float = 0.0

    def __post_init__(self):
        if not 0 <= self.hard_negative_share <= 1:
            raise ValueError(f"hard_negative_share must be in [0, 1], got {self.hard_negative_share}.")
        for name in ("canonical_epochs", "random_negative_epochs", "ramp_epochs", "wording_ramp_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")

    def all_wordings_share(self, epoch: float) -> float:
        """The share of images drawing from every wording (the others: canonical captions only) at `epoch`."""
        if epoch < self.canonical_epochs:
            return 0.0
        if self.wording_ramp_epochs == 0:
            return 1.0
        return min(1.0, (epoch - self.canonical_epochs) / self.wording_ramp_epochs)

    def canonical_only(self, epoch: float) -> bool:
        """Whether training at `epoch` draws canonical captions only."""
        return self.all_wordings_share(epoch) == 0

    def mines_negatives(self, epoch: float) -> bool:
        """Whether the in-batch negatives at `epoch` are the dual teacher's hardest (else random)."""
        return epoch >= self.random_negative_epochs

    def distractor_share(self, epoch: float) -> float:
        """The share of swap/flip distractors among the negatives at `epoch`."""
        if not self.mines_negatives(epoch):
            return 0.0
        if self.ramp_epochs == 0:
            return self.hard_negative_share
        return self.hard_negative_share * min(1.0, (epoch - self.random_negative_epochs) / self.ramp_epochs)


def mine_hard_negatives(similarity: torch.Tensor, same: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The hardest in-batch negatives under the dual teacher: for each image (row) the most similar text that is not
    its own, and for each text (column) the most similar image that is not its own.

    Args:
        similarity (`torch.Tensor` of shape `(B, B)`): images × texts, row i and column i a positive pair.
        same (`torch.BoolTensor` of shape `(B, B)`, *optional*): further pairs that are not negatives (e.g. a
            caption that also describes the other image).

    Returns:
        `(text_of_image, image_of_text)`: `torch.LongTensor`s of shape `(B,)`.
    """
    excluded = torch.eye(len(similarity), dtype=torch.bool, device=similarity.device)
    if same is not None:
        excluded |= same
    masked = similarity.masked_fill(excluded, -torch.inf)
    return masked.argmax(dim=1), masked.argmax(dim=0)


def _fusion_step_pairs(similarity: torch.Tensor, index: torch.Tensor, pairs: TrainingPairs, share: float,
                       negatives_per_positive: int, generator: torch.Generator,
                       distractor_kinds: Sequence[str] = ("swap", "flip")) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The (image position, text row) pairs of one fusion step and their kind (`POSITIVE`, `DISTRACTOR`, `MINED`): the
    B positives, then `negatives_per_positive · B` negatives of which `share` are distractors of `distractor_kinds`
    (as many as the batch has) and the rest hardest in-batch negatives mined by the dual teacher (text for an image,
    image for a text, in turn).
    """
    batch = len(index)
    captions = pairs.caption_row[index]
    same_text = captions[:, None] == captions[None, :]
    text_of_image, image_of_text = mine_hard_negatives(similarity, same_text)
    positions = torch.arange(batch)
    mined = torch.stack([torch.stack([positions, captions[text_of_image]], dim=1),
                         torch.stack([image_of_text, captions], dim=1)], dim=1).reshape(-1, 2)
    distractors = _distractor_rows(pairs, index, distractor_kinds)
    wanted = negatives_per_positive * batch
    taken = min(round(share * wanted), len(distractors))
    chosen = distractors[torch.randperm(len(distractors), generator=generator)[:taken]]
    step_pairs = torch.cat([torch.stack([positions, captions], dim=1), chosen, mined[: wanted - taken]])
    kinds = torch.full((len(step_pairs),), MINED)
    kinds[:batch], kinds[batch : batch + taken] = POSITIVE, DISTRACTOR
    return step_pairs, kinds


@torch.no_grad()
def _dual_embeddings(model: PreTrainedModel, pixels: torch.Tensor, table: TextTable, text_rows: torch.Tensor,
                     batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """v for every image and t for the texts at `text_rows` of a table, L2-normalised, on the CPU."""
    was_training = model.training
    model.eval()
    images = [_embedding(model.get_image_features(pixel_values=chunk.to(model.device))).float().cpu()
              for chunk in pixels.split(batch_size)]
    texts = []
    for rows in text_rows.split(batch_size):
        input_ids, attention_mask = table.rows(rows)
        texts.append(_embedding(model.get_text_features(input_ids=input_ids.to(model.device),
                                                        attention_mask=attention_mask.to(model.device))).float().cpu())
    model.train(was_training)
    return F.normalize(torch.cat(images), dim=-1), F.normalize(torch.cat(texts), dim=-1)


def train_fusion_teacher(
    model: PreTrainedModel,
    processor,
    train_split: datasets.Dataset,
    dual_teacher: PreTrainedModel,
    dual_processor,
    epochs: int = 8,
    lr: float = 5e-4,
    batch_size: int = 64,
    curriculum: FusionCurriculum | None = None,
    negatives_per_positive: int = 2,
    group_families: bool = False,
    weight_decay: float = 0.05,
    warmup_fraction: float = 0.05,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    pairs: TrainingPairs | None = None,
    on_epoch_end: Callable[[int, TrainingHistory], None] | None = None,
) -> TrainingHistory:
    """
    Train a single-stream ITM model (BlipForImageTextRetrieval, or any model with a registered cross-encoder
    adapter) with a balanced matching loss (`BalancedMatchingLoss`) on hard negatives (DESIGN §7).

    Each step takes B pairs (each image once) and scores, encoding each image once: the B positives, and
    `negatives_per_positive · B` negatives — a share (`curriculum.distractor_share`, ramped up) of colour-swap and
    relation-flip distractors of the batch's captions, the rest the hardest in-batch negatives under the frozen dual
    teacher (for each image the most similar other caption, for each caption the most similar other image). Under the
    wording curriculum the first `curriculum.canonical_epochs` draw only captions that name the left / top object
    first; then inverse wordings come in (`curriculum.wording_ramp_epochs`). Relation flips join the distractors
    only once every wording is drawn: before, the relation word alone ("right of" never appears in a canonical
    caption) tells a flip from a positive, a shortcut the model learns at once and must unlearn later. Trained on
    every wording at once, a cross-encoder learns bag-of-words matching and stays at chance on swaps and flips
    (DESIGN §7).

    Args:
        model ([`PreTrainedModel`]): the fusion teacher, trained in place (left in eval mode).
        processor: its processor; every image and text is preprocessed once, before the first step.
        train_split (`datasets.Dataset`): one row per image with `image`, `captions` and the mcad-shapes columns
            `canonical`, `swapped_captions`, `flipped_captions` (without them: no curriculum, no distractors).
        dual_teacher ([`PreTrainedModel`]): the (trained) dual teacher that mines the hard negatives; not trained here.
            Its embeddings of every training image and caption are computed once.
        dual_processor: the dual teacher's processor.
        epochs, lr, batch_size, weight_decay, warmup_fraction, max_grad_norm: the optimisation.
        curriculum ([`FusionCurriculum`], *optional*): the wording curriculum and the distractor ramp (default:
            `FusionCurriculum()`).
        negatives_per_positive (`int`): negatives scored per positive pair.
        group_families (`bool`): batches of whole families of near-duplicates (`TrainingPairs.epoch_batches`), where
            the split has them: the mined negatives are then an image's siblings.
        seed (`int`): caption draws, batch order, distractor draws.
        pairs ([`TrainingPairs`], *optional*): the split already encoded with `{"fusion": processor, "dual":
            dual_processor}`.
        on_epoch_end (`Callable[[int, TrainingHistory], None]`, *optional*): called after each epoch (its number,
            from 1) with the history so far, the model in eval mode.
    """
    start = time.perf_counter()
    _prepare_cpu(model)
    curriculum = curriculum if curriculum is not None else FusionCurriculum()
    pairs = pairs if pairs is not None else TrainingPairs.from_split(train_split, {"fusion": processor,
                                                                                   "dual": dual_processor})
    # The dual teacher is frozen here: its embeddings of every image and caption (not distractor) are computed once.
    caption_rows, caption_position = torch.unique(pairs.caption_row, return_inverse=True)
    dual_images, dual_captions = _dual_embeddings(dual_teacher, pairs.pixel_values["dual"], pairs.tables["dual"],
                                                  caption_rows)
    dual_texts = torch.zeros(len(pairs.texts), dual_captions.shape[1])
    dual_texts[caption_rows] = dual_captions
    pixels, table = pairs.pixel_values["fusion"], pairs.tables["fusion"]
    encoder, loss_fn, history = _cross_encoder(model), BalancedMatchingLoss(), TrainingHistory()
    device = model.device
    steps_per_epoch = len(pairs.epoch_batches(0, batch_size, seed))
    if steps_per_epoch == 0:
        raise ValueError(f"The training split has fewer images than batch_size={batch_size}; lower batch_size.")
    optimizer, scheduler = _optimizer(model, lr, weight_decay, epochs * steps_per_epoch, warmup_fraction)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    step = 0
    for epoch in range(epochs):
        epoch_losses = []
        canonical_only, mining = curriculum.canonical_only(epoch), curriculum.mines_negatives(epoch)
        # A relation flip of a canonical caption says "right of" / "below", of an inverse one "left of" / "above":
        # until every wording is drawn, the relation word alone would tell flips from positives.
        distractor_kinds = ("swap", "flip") if curriculum.all_wordings_share(epoch) >= 1 else ("swap",)
        batches = pairs.epoch_batches(epoch, batch_size, seed, curriculum.all_wordings_share(epoch),
                                      group_families=group_families and mining and pairs.family is not None)
        for index in batches:
            share = curriculum.distractor_share(step / steps_per_epoch)
            images = pairs.image_index[index]
            if mining:
                similarity = dual_images[images] @ dual_texts[pairs.caption_row[index]].t()
            else:  # the "hardest" under a random score: random negatives
                similarity = torch.rand(len(index), len(index), generator=generator)
            step_pairs, kinds = _fusion_step_pairs(similarity, index, pairs, share, negatives_per_positive,
                                                   generator, distractor_kinds)
            texts, text_position = torch.unique(step_pairs[:, 1], return_inverse=True)
            input_ids, attention_mask = table.rows(texts)
            output = encoder(pixels[images].to(device), input_ids.to(device), attention_mask.to(device),
                             pairs=torch.stack([step_pairs[:, 0], text_position], dim=1).to(device),
                             batch_size=len(step_pairs))
            loss = loss_fn(output.match_logits, (kinds == POSITIVE).to(device))
            history.steps.append({"lr": scheduler.get_last_lr()[0], "canonical_only": canonical_only,
                                  "mined_negatives": mining, "distractor_share": float((kinds == DISTRACTOR).sum() / (kinds != POSITIVE).sum())})
            _step(loss, model, optimizer, scheduler, max_grad_norm)
            history.losses.append(loss.item())
            epoch_losses.append(loss.item())
            step += 1
        history.epoch_losses.append(float(np.mean(epoch_losses)))
        logger.info("fusion teacher: epoch %d/%d, loss %.4f (every wording for %.0f%% of images, %s negatives, "
                    "distractor share %.2f)", epoch + 1, epochs, history.epoch_losses[-1],
                    100 * curriculum.all_wordings_share(epoch), "mined" if mining else "random",
                    curriculum.distractor_share(step / steps_per_epoch))
        _end_epoch(model, epoch, history, on_epoch_end)
    model.eval()
    history.seconds = time.perf_counter() - start
    return history


# --- The shapes fusion teacher's training ---------------------------------------------------------------------------


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
    false of (up to three, -1: none), each named object's shape-word position and centre (x, y). Per text row of
    `pairs.texts` (captions and distractors): the position of its relation word.
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
        siblings = torch.full((len(pairs), 3), -1, dtype=torch.long)
        for pair, false_of in enumerate(false_siblings(captions, pairs.image_index.tolist(), pairs.family.tolist(),
                                                       scenes)):
            siblings[pair, : len(false_of[:3])] = torch.tensor(false_of[:3], dtype=torch.long)
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
def fusion_stack_states(model: MCADFusionModel, pixel_values: torch.Tensor, table: TextTable,
                        batch_size: int = 256) -> dict[str, torch.Tensor]:
    """The frozen unimodal encoders' states of every image and text (float16, on the CPU: the whole split is
    held) and their embeddings v, t; the encoders run on the model's device, in eval mode."""
    model.unimodal.eval()
    device = model.device
    image_states, image_embeds = [], []
    for chunk in pixel_values.split(batch_size):
        states = model.image_states(chunk.to(device))
        image_states.append(states.half().cpu())
        image_embeds.append(model.image_embeds(states).float().cpu())
    text_states, text_embeds = [], []
    for start in range(0, len(table.input_ids), 4 * batch_size):
        rows = slice(start, start + 4 * batch_size)
        states, embeds = model.text_states(table.input_ids[rows].to(device), table.attention_mask[rows].to(device))
        text_states.append(states.half().cpu())
        text_embeds.append(embeds.float().cpu())
    return {"images": torch.cat(image_states), "image_embeds": torch.cat(image_embeds), "texts": torch.cat(text_states),
            "masks": table.attention_mask.bool(), "text_embeds": torch.cat(text_embeds)}


def fuse_cached(model: MCADFusionModel, states: Mapping[str, torch.Tensor], image_rows: torch.Tensor,
                text_rows: torch.Tensor) -> MCADFusionOutput:
    """The fusion stack on pairs (image_rows[p], text_rows[p]) of cached `fusion_stack_states`."""
    length = int(states["masks"][text_rows].sum(1).max())
    device = model.device
    return model.fuse(states["images"][image_rows].to(device), states["texts"][text_rows, :length].to(device),
                      states["masks"][text_rows, :length].to(device), states["image_embeds"][image_rows].to(device),
                      states["text_embeds"][text_rows].to(device))


def train_fusion_stack(
    model: MCADFusionModel,
    processor,
    train_split: datasets.Dataset,
    dual_teacher: CLIPModel | None = None,
    steps: int = 600,
    canonical_steps: int = 200,
    lr: float = 5e-4,
    batch_size: int = 64,
    grounding: float = 1.0,
    relation: float = 1.0,
    siblings: bool = True,
    weight_decay: float = 0.05,
    warmup_steps: int = 50,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    pairs: TrainingPairs | None = None,
    on_step: Callable[[int, MCADFusionModel], None] | None = None,
) -> TrainingHistory:
    """
    Train the fusion stack of an [`MCADFusionModel`] on mcad-shapes. Its unimodal encoders (the trained dual teacher,
    copied in from `dual_teacher` when given) stay frozen: their states of every image and text are computed once.

    Each step takes `batch_size` pairs in batches of whole families (`TrainingPairs.epoch_batches`) and a listwise
    loss: per image, cross-entropy over {its caption, the caption's colour swap, its relation flip, the dual
    teacher's hardest in-batch caption, a random caption}; per caption, over {its image, up to three family
    siblings it is false of (`siblings`), the hardest in-batch image}. For the first `canonical_steps` captions are
    canonical only (left / top object named first) and flips are left out (the word alone would tell them): the
    stack learns which named object is left / above; then every wording. Auxiliary losses on the caption tokens'
    states after `config.relation_layer`: `grounding` · the squared error of each named object's centre regressed from
    its shape word, `relation` · the cross-entropy of the object order read at the relation word (of the caption and
    of its flip: the image decides, not the word). BENCHMARKS.md (issue 8) has every variant tried.

    Args:
        model ([`MCADFusionModel`]): trained in place (left in eval mode).
        processor: the model's processor (the dual teacher's); its tokenizer finds shape and relation words.
        train_split (`datasets.Dataset`): mcad-shapes rows (`scene`, `family`, `canonical`, distractor columns).
        dual_teacher ([`CLIPModel`], *optional*): the trained dual teacher, copied into `model.unimodal` first.
        steps, canonical_steps, lr, batch_size, weight_decay, warmup_steps, max_grad_norm: the schedule.
        grounding, relation (`float`): the auxiliary losses' weights (0: off).
        siblings (`bool`): rank each caption's image above the family siblings it is false of.
        seed (`int`): caption draws, batch order, random captions.
        pairs ([`TrainingPairs`], *optional*): the split already encoded with `{"fusion": processor}`.
        on_step (`Callable[[int, MCADFusionModel], None]`, *optional*): called after every step with the step number
            (from 1) and the model (in train mode; switch it to eval to score).
    """
    start = time.perf_counter()
    _prepare_cpu(model)
    if not {"scene", "family"} <= set(train_split.column_names):
        raise ValueError("train_fusion_stack needs mcad-shapes columns `scene` and `family` (the scene graph gives the "
                         "siblings, the grounding and the object order); build the split with make_shapes.")
    pairs = pairs if pairs is not None else TrainingPairs.from_split(train_split, {"fusion": processor})
    if dual_teacher is not None:
        model.unimodal.load_state_dict(dual_teacher.state_dict())
    model.unimodal.requires_grad_(False).eval()
    states = fusion_stack_states(model, pairs.pixel_values["fusion"], pairs.tables["fusion"])
    targets = FusionStackTargets.from_pairs(pairs, train_split, processor.tokenizer)
    if not siblings:
        targets.siblings.fill_(-1)
    stack = [p for p in model.parameters() if p.requires_grad]
    # Every stack tensor decays, norms and the CLIP weight w included: the recipe BENCHMARKS.md measured.
    optimizer = torch.optim.AdamW(stack, lr=lr, weight_decay=weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
    generator = torch.Generator().manual_seed(seed)
    history, step, epoch = TrainingHistory(), 0, 0
    model.train()
    model.unimodal.eval()
    while step < steps:
        canonical_phase = step < canonical_steps
        batches = pairs.epoch_batches(epoch, batch_size, seed, 0.0 if canonical_phase else 1.0, group_families=True)
        if not batches:
            raise ValueError(f"batch_size={batch_size} is larger than the images drawn per epoch; lower it.")
        for index in batches:
            loss = _fusion_stack_loss(model, states, pairs, targets, index, canonical_phase, grounding, relation,
                                      generator)
            _step(loss, model, optimizer, scheduler, max_grad_norm)  # the frozen encoders have no gradients
            history.losses.append(loss.item())
            history.steps.append({"lr": scheduler.get_last_lr()[0], "canonical_only": canonical_phase})
            step += 1
            if step % 100 == 0:
                logger.info("fusion teacher: step %d/%d, loss %.4f", step, steps, np.mean(history.losses[-100:]))
            if on_step is not None:
                on_step(step, model)
            if step >= steps or canonical_phase != (step < canonical_steps):
                break
        epoch += 1
    model.eval()
    history.seconds = time.perf_counter() - start
    logger.info("fusion teacher: %d steps, loss %.4f -> %.4f, %.0f s", steps, np.mean(history.losses[:50]),
                np.mean(history.losses[-50:]), history.seconds)
    return history


def _fusion_stack_loss(model, states, pairs: TrainingPairs, targets: FusionStackTargets, index: torch.Tensor,
                       canonical_phase: bool, grounding: float, relation: float, generator) -> torch.Tensor:
    image, caption = pairs.image_index[index], pairs.caption_row[index]
    swapped, flipped = pairs.swapped_row[index], pairs.flipped_row[index]
    similarity = states["image_embeds"][image] @ states["text_embeds"][caption].t()
    similarity[caption[:, None] == caption[None, :]] = -9  # never a pair's own caption
    mined_text, mined_image = caption[similarity.argmax(1)], image[similarity.argmax(0)]
    random_text = caption[torch.randint(len(caption), (len(caption),), generator=generator)]
    texts = torch.stack([caption, torch.where(swapped >= 0, swapped, random_text),
                         torch.where(flipped >= 0, flipped, mined_text), mined_text, random_text], 1)
    text_valid = torch.ones_like(texts, dtype=torch.bool)
    text_valid[:, 1], text_valid[:, 2] = swapped >= 0, (flipped >= 0) & (not canonical_phase)
    sibling = targets.siblings[index]
    images = torch.cat([torch.where(sibling >= 0, sibling, image[:, None]), mined_image[:, None]], 1)
    image_valid = torch.cat([sibling >= 0, torch.ones(len(index), 1, dtype=torch.bool)], 1)
    output = fuse_cached(model, states, torch.cat([image.repeat_interleave(5), images.flatten()]),
                         torch.cat([texts.flatten(), caption.repeat_interleave(4)]))
    per_image = output.match_logits[: 5 * len(index)].view(-1, 5)
    per_caption = torch.cat([per_image[:, :1], output.match_logits[5 * len(index) :].view(-1, 4)], 1)
    device = per_image.device
    text_valid, image_valid = text_valid.to(device), torch.cat([text_valid[:, :1], image_valid], 1).to(device)
    target = torch.zeros(len(index), dtype=torch.long, device=device)
    loss = (F.cross_entropy(per_image.masked_fill(~text_valid, -1e4), target)
            + F.cross_entropy(per_caption.masked_fill(~image_valid, -1e4), target))
    rows = torch.arange(len(index))
    relation_states = output.relation_states[: 5 * len(index)].view(len(index), 5, *output.relation_states.shape[1:])
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


# --- Gates ---------------------------------------------------------------------------------------------------------


def _match_logits(teachers, pixel_values: torch.Tensor, table: TextTable, pairs: torch.Tensor,
                  images_per_call: int = 64) -> torch.Tensor:
    """The fusion teacher's match logit of every (image, text row) pair, images encoded `images_per_call` at a time."""
    logits = torch.empty(len(pairs))
    for first in range(0, len(pixel_values), images_per_call):
        selected = torch.nonzero((pairs[:, 0] >= first) & (pairs[:, 0] < first + images_per_call)).flatten()
        if len(selected) == 0:
            continue
        texts, text_position = torch.unique(pairs[selected, 1], return_inverse=True)
        input_ids, attention_mask = table.rows(texts)
        output = teachers.fuse(pixel_values[first : first + images_per_call], input_ids, attention_mask,
                               pairs=torch.stack([pairs[selected, 0] - first, text_position], dim=1))
        logits[selected] = output.match_logits.float().cpu()
    return logits


def rerank(ranks: np.ndarray, candidates: torch.Tensor, scores: torch.Tensor, is_right: torch.Tensor) -> np.ndarray:
    """
    Ranks after re-ranking each query's top-k candidates by a second score: within the top k, the first right
    answer's rank is its place in the re-ranked list; a query with no right answer in its top k keeps its rank.

    Args:
        ranks (`np.ndarray` of shape `(queries,)`): 1-based ranks of the first right answer before re-ranking.
        candidates (`torch.LongTensor` of shape `(queries, k)`): each query's top k, best first (only their count is
            read here; `is_right` and `scores` follow their order).
        scores (`torch.Tensor` of shape `(queries, k)`): the re-ranker's score of each candidate (higher is better).
        is_right (`torch.BoolTensor` of shape `(queries, k)`): whether each candidate is a right answer.
    """
    if not (candidates.shape == scores.shape == is_right.shape):
        raise ValueError(f"candidates {tuple(candidates.shape)}, scores {tuple(scores.shape)} and is_right "
                         f"{tuple(is_right.shape)} must have one shape, (queries, k).")
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    right_in_order = torch.gather(is_right, 1, order)
    has_right = right_in_order.any(dim=1)
    first_right = right_in_order.float().argmax(dim=1) + 1
    reranked = np.array(ranks, copy=True)
    reranked[has_right.numpy()] = first_right[has_right].numpy()
    return reranked


@torch.no_grad()
def teacher_gates(
    teachers,
    split: datasets.Dataset,
    top_k: int = 10,
    matchers: Sequence[str] = GATE_MATCHERS,
    batch_size: int = 256,
    seed: int = 0,
) -> dict:
    """
    The teachers' gates on an mcad-shapes split (DESIGN §7): a teacher that fails its gate teaches nothing. Select
    and tune on the validation split; report the test split.

    Measures:
    - `dual`: the dual teacher's retrieval metrics (`RETRIEVAL_KEYS`) and binding accuracies (swap, flip, all).
    - `fusion`: the fusion teacher's binding accuracies: its match logit for the true caption against the distractor.
    - `reranked`: retrieval metrics after the fusion teacher re-ranks the dual teacher's top `top_k` (image→text: an
      image's k best captions; text→image: a caption's k best images). R@K for K ≥ k cannot change.
    - `matchers`: each bag-of-words matcher's retrieval metrics (`shapes.matcher_embeddings`).
    - `gates`: `dual_beats_matchers` (dual RSUM above every matcher's), `fusion_beats_dual_binding` (fusion binding
      accuracy above the dual teacher's), `reranking_beats_dual` (re-ranked RSUM above the dual teacher's),
      `passed` (all three), and `fusion_binding_above_90` (the aim, not a gate).
    - `rows`: the same figures as table rows (model name -> metrics), for a results table.

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
    start = time.perf_counter()
    processors = teachers.processors
    captions, text_to_image = flatten_captions(split)
    probe = binding_probe(split)
    texts = list(dict.fromkeys([*captions, *probe.distractors]))
    row = {text: index for index, text in enumerate(texts)}
    images = split.cast_column("image", datasets.Image(decode=False))[:]["image"]
    dual_pixels, fusion_pixels = (encode_images(images, processors[name], batch_size) for name in ("dual", "fusion"))
    dual_table, fusion_table = (encode_texts(texts, processors[name]) for name in ("dual", "fusion"))

    image_embeds = torch.cat([teachers.encode_images(chunk).cpu() for chunk in dual_pixels.split(batch_size)])
    text_embeds = torch.cat([teachers.encode_texts(*dual_table.rows(rows)).cpu()
                             for rows in torch.arange(len(texts)).split(batch_size)])
    caption_rows = torch.tensor([row[caption] for caption in captions], dtype=torch.long)
    true_rows = torch.tensor([row[caption] for caption in probe.captions], dtype=torch.long)
    distractor_rows = torch.tensor([row[distractor] for distractor in probe.distractors], dtype=torch.long)
    probe_images = torch.tensor(probe.image_index, dtype=torch.long)
    owner = torch.tensor(text_to_image, dtype=torch.long)

    # Every pair the fusion teacher is asked about, scored once: the probe's and the dual teacher's top k both ways.
    similarity = image_embeds @ text_embeds[caption_rows].t()
    k_texts, k_images = min(top_k, len(captions)), min(top_k, len(split))
    text_candidates = similarity.topk(k_texts, dim=1).indices  # images × k caption positions
    image_candidates = similarity.topk(k_images, dim=0).indices.t()  # captions × k images
    pair_sets = {
        "true": torch.stack([probe_images, true_rows], dim=1),
        "distractor": torch.stack([probe_images, distractor_rows], dim=1),
        "i2t": torch.stack([torch.arange(len(split)).repeat_interleave(k_texts),
                            caption_rows[text_candidates].flatten()], dim=1),
        "t2i": torch.stack([image_candidates.flatten(), caption_rows.repeat_interleave(k_images)], dim=1),
    }
    unique_pairs, position = torch.unique(torch.cat(list(pair_sets.values())), dim=0, return_inverse=True)
    logits = _match_logits(teachers, fusion_pixels, fusion_table, unique_pairs)[position]
    logits = dict(zip(pair_sets, logits.split([len(pairs) for pairs in pair_sets.values()])))

    dual = retrieval_metrics(image_embeds, text_embeds[caption_rows], text_to_image)
    kinds = np.asarray(probe.kinds)
    dual_margin = ((image_embeds[probe_images] * text_embeds[true_rows]).sum(dim=1)
                   - (image_embeds[probe_images] * text_embeds[distractor_rows]).sum(dim=1))
    fusion_margin = logits["true"] - logits["distractor"]
    fusion = {}
    for key, selected in (("swap_accuracy", kinds == "swap"), ("flip_accuracy", kinds == "flip"),
                          ("binding_accuracy", kinds != "")):
        if selected.any():
            dual[key] = _margin_accuracy(dual_margin[torch.from_numpy(selected)])
            fusion[key] = _margin_accuracy(fusion_margin[torch.from_numpy(selected)])

    image_ranks, text_ranks = retrieval_ranks(image_embeds, text_embeds[caption_rows], text_to_image)
    reranked = metrics_from_ranks(
        rerank(image_ranks, text_candidates, logits["i2t"].view(len(split), k_texts),
               owner[text_candidates] == torch.arange(len(split))[:, None]),
        rerank(text_ranks, image_candidates, logits["t2i"].view(len(captions), k_images),
               image_candidates == owner[:, None]),
    )
    matcher_metrics = {name: retrieval_metrics(*matcher_embeddings(split, name, seed=seed)) for name in matchers}

    gates = {
        "dual_beats_matchers": all(dual["rsum"] > metrics["rsum"] for metrics in matcher_metrics.values()),
        "fusion_beats_dual_binding": fusion.get("binding_accuracy", 0.0) > dual.get("binding_accuracy", 100.0),
        "reranking_beats_dual": reranked["rsum"] > dual["rsum"],
    }
    gates["passed"] = all(gates.values())
    gates["fusion_binding_above_90"] = fusion.get("binding_accuracy", 0.0) > 90.0
    rows = {"dual teacher": dual, f"fusion teacher (re-ranks dual top-{top_k})": {**reranked, **fusion}}
    rows.update({f"bag of words ({name})": metrics for name, metrics in matcher_metrics.items()})
    return {"dual": dual, "fusion": fusion, "reranked": reranked, "matchers": matcher_metrics, "gates": gates,
            "rows": rows, "top_k": top_k, "seconds": time.perf_counter() - start}


def _margin_accuracy(margin: torch.Tensor) -> float:
    """Percent of probes whose true caption scores above its distractor (a tie counts one half)."""
    return 100.0 * float(((margin > 0).double() + 0.5 * (margin == 0).double()).mean())


__all__ = [
    "BalancedMatchingLoss", "ContrastiveLoss", "FusionCurriculum", "FusionStackTargets", "TeacherModels", "TextTable",
    "TrainingHistory", "TrainingPairs", "encode_images", "encode_texts", "false_siblings", "first_relation_token",
    "fuse_cached", "fusion_stack_states", "mine_hard_negatives", "rerank", "shapes_teachers", "shapes_tokenizer",
    "symmetric_cross_entropy", "teacher_gates", "train_dual_teacher", "train_fusion_stack", "train_fusion_teacher",
]
