"""Training the two teachers on image-text data, for any dual-stream and any registered single-stream model.

MCAD needs two teachers (DESIGN §1, §4). Published ones come from the Hub; these functions train or fine-tune them
on a training split, as real transformers classes, so the rest of the package treats the result exactly like CLIP and
BLIP checkpoints:

- `train_dual_teacher(...)`: CLIP's contrastive loss, one caption per image per batch (DESIGN §3).
- `train_fusion_teacher(...)`: image-text matching (the balanced ITM loss) on hard negatives mined by the frozen dual
  teacher — for each image the most similar other caption, for each caption the most similar other image — as BLIP
  and ALBEF train their ITM heads. No scene graph, no curriculum: any captioned images.

`TeacherModels` holds both teachers with their processors while they train; `to_mcad_teacher()` freezes them into an
[`MCADTeacher`]. Both loops run in one process on preprocessed tensors (`data.TrainingPairs`: every image and caption
preprocessed once) and use the package's one optimisation recipe (`optimization.py`). On the CPU they flush denormal
floats to zero: Adam's second moments otherwise sink into subnormal numbers late in training and every step becomes
about 100× slower.

The mcad-shapes benchmark trains its own fusion teacher with extra supervision from its scene graphs
(`modeling_mcad.shapes.train_fusion_stack`).
"""

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
from transformers import PreTrainedModel

from .cross_encoders import CrossEncoder, FusionOutput, cross_encoder_class
from .data import TextTable, TrainingPairs
from .errors import UserError
from .fusion_model import MCADFusionModel
from .objectives import ContrastiveLoss, MatchingLoss
from .optimization import TrainingStep, adamw_with_cosine, autocast
from .teachers import MCADTeacher, dual_image_embeds, dual_text_embeds
from .utils import progress

logger = logging.getLogger(__name__)


@dataclass
class TeacherModels:
    """
    The dual and the fusion teacher with their processors, trainable (an [`MCADTeacher`] freezes them). Offers the
    evaluation interface of `MCADTeacher` (`processors`, `encode_images`, `encode_texts`, `fuse`), so gates and
    evaluation take either.

    Args:
        dual ([`PreTrainedModel`]): a dual-stream model with `get_image_features` / `get_text_features`
            (CLIPModel, ...).
        dual_processor: its processor (images and text).
        fusion ([`PreTrainedModel`]): a single-stream ITM model with a registered cross-encoder adapter
            (BlipForImageTextRetrieval, ViltForImageAndTextRetrieval, ...).
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
        return dual_image_embeds(self.dual, pixel_values)

    @torch.no_grad()
    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """t: the dual teacher's L2-normalised text embeddings (float32)."""
        return dual_text_embeds(self.dual, input_ids, attention_mask)

    @torch.no_grad()
    def fuse(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             pairs: torch.Tensor | None = None) -> FusionOutput:
        """The fusion teacher on (image, text) pairs, each image encoded once (see `CrossEncoder.forward`)."""
        device = self.fusion.device
        mask = None if attention_mask is None else attention_mask.to(device)
        return cross_encoder(self.fusion)(pixel_values, input_ids.to(device), mask,
                                          pairs=None if pairs is None else pairs.to(device))

    def to_mcad_teacher(self, **options) -> MCADTeacher:
        """The two teachers (frozen in place) with a fresh fusion adapter: `MCADTeacher.from_teachers`."""
        return MCADTeacher.from_teachers(self.dual, self.fusion, dual_processor=self.dual_processor,
                                         fusion_processor=self.fusion_processor, **options)


def cross_encoder(model: PreTrainedModel) -> CrossEncoder:
    """The cross-encoder adapter around a fusion model: shares its parameters, freezes nothing."""
    return cross_encoder_class(model.config.model_type)(model)


@dataclass
class TrainingHistory:
    """
    What a teacher's training did.

    Args:
        losses (`list[float]`): the loss of every step.
        epoch_losses (`list[float]`): the mean loss of every epoch.
        seconds (`float`): wall time, preprocessing included.
    """

    losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def prepare_cpu(model: torch.nn.Module) -> None:
    """Flush denormal floats to zero on the CPU (see the module docstring: subnormal Adam states, 100× slower steps)."""
    if next(model.parameters()).device.type == "cpu":
        torch.set_flush_denormal(True)


@torch.no_grad()
def dual_embeddings(model: PreTrainedModel, pixel_values: torch.Tensor, table: TextTable, text_rows: torch.Tensor,
                    batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """v for every image and t for the texts at `text_rows` of a table, L2-normalised, on the CPU, in eval mode."""
    was_training = model.training
    model.eval()
    images = [dual_image_embeds(model, chunk).cpu() for chunk in pixel_values.split(batch_size)]
    texts = [dual_text_embeds(model, *table.rows(rows)).cpu() for rows in text_rows.split(batch_size)]
    model.train(was_training)
    return torch.cat(images), torch.cat(texts)


def _distractor_rows(pairs: TrainingPairs, index: torch.Tensor, kinds: Sequence[str]) -> torch.Tensor:
    """The text rows of every available distractor of the given kinds (`swap`, `flip`) of the pairs at `index`."""
    rows = [{"swap": pairs.swapped_row, "flip": pairs.flipped_row}[kind][index] for kind in kinds]
    rows = torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)
    return rows[rows >= 0]


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
    autocast_dtype: torch.dtype | None = None,
    on_epoch_end: Callable[[int, TrainingHistory], None] | None = None,
) -> TrainingHistory:
    """
    Train a dual-stream model (CLIPModel, or anything with `get_image_features` / `get_text_features` and a
    `logit_scale`) contrastively: CLIP's loss on batches holding each image once, with one of its captions drawn
    afresh each epoch (DESIGN §3).

    Args:
        model ([`PreTrainedModel`]): trained in place (left in eval mode).
        processor: its processor; every image and caption is preprocessed once, before the first step.
        train_split (`datasets.Dataset`): one row per image, `image` and `captions` (plus `swapped_captions` /
            `flipped_captions` for `negatives`, `family` for `group_families`).
        epochs, lr, batch_size, weight_decay, warmup_fraction, max_grad_norm: the optimisation (`optimization.py`).
        negatives (sequence of `"swap"`, `"flip"`): NegCLIP-style extra negatives: each caption's colour-swapped and /
            or relation-flipped distractor joins the image→text candidates. Empty: plain CLIP.
        group_families (`bool`): batches of whole families of near-duplicates (`TrainingPairs.epoch_batches`), where
            the split has them: in-batch negatives that differ in binding, relation or one attribute.
        seed (`int`): caption draws and batch order.
        pairs ([`TrainingPairs`], *optional*): the split already encoded with `{"dual": processor}`.
        autocast_dtype (`torch.dtype`, *optional*): mixed precision for the forward passes (e.g. `torch.bfloat16`;
            see `optimization.mixed_precision_dtype`); None: float32.
        on_epoch_end (`Callable[[int, TrainingHistory], None]`, *optional*): called after each epoch (its number,
            from 1) with the history so far, the model in eval mode.
    """
    start = time.perf_counter()
    prepare_cpu(model)
    pairs = pairs if pairs is not None else TrainingPairs.from_split(train_split, {"dual": processor})
    pixels, table = pairs.pixel_values["dual"], pairs.tables["dual"]
    grouped = group_families and pairs.family is not None
    steps_per_epoch = len(pairs.epoch_batches(0, batch_size, seed))
    if steps_per_epoch == 0:
        raise UserError(f"The training split has fewer images than batch_size={batch_size}; lower batch_size.")
    total_steps = epochs * steps_per_epoch
    optimizer, scheduler = adamw_with_cosine(model, lr, total_steps, weight_decay, int(warmup_fraction * total_steps))
    step = TrainingStep(model, optimizer, scheduler, max_grad_norm)
    loss_fn, history = ContrastiveLoss(), TrainingHistory()
    bar = progress(total=total_steps, desc="dual teacher")
    model.train()
    for epoch in range(epochs):
        epoch_losses = []
        for index in pairs.epoch_batches(epoch, batch_size, seed, group_families=grouped):
            negative_rows = _distractor_rows(pairs, index, negatives)
            with autocast(model.device, autocast_dtype):
                images = dual_image_embeds(model, pixels[pairs.image_index[index]])
                texts = dual_text_embeds(model, *table.rows(torch.cat([pairs.caption_row[index], negative_rows])))
            loss = loss_fn(images, texts[: len(index)], model.logit_scale,
                           texts[len(index):] if len(negative_rows) else None)
            step(loss)
            history.losses.append(loss.item())
            epoch_losses.append(loss.item())
            bar.update(1)
        history.epoch_losses.append(float(np.mean(epoch_losses)))
        bar.set_postfix(epoch=epoch + 1, loss=f"{history.epoch_losses[-1]:.3f}")
        logger.info("dual teacher: epoch %d/%d, loss %.4f", epoch + 1, epochs, history.epoch_losses[-1])
        _end_epoch(model, epoch, history, on_epoch_end)
    bar.close()
    model.eval()
    history.seconds = time.perf_counter() - start
    return history


def mine_hard_negatives(similarity: torch.Tensor,
                        same: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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


def matching_step_pairs(similarity: torch.Tensor, captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The (batch position of the image, text row) pairs one matching step scores, and which are positives: the B
    positives, each image with its hardest other caption, each caption with its hardest other image
    (`mine_hard_negatives`; a pair whose caption text is the positive's own is never a negative).

    Args:
        similarity (`torch.Tensor` of shape `(B, B)`): the dual teacher's scores, images × captions of the batch.
        captions (`torch.LongTensor` of shape `(B,)`): each pair's caption row.
    """
    positions = torch.arange(len(captions))
    text_of_image, image_of_text = mine_hard_negatives(similarity, captions[:, None] == captions[None, :])
    step_pairs = torch.cat([torch.stack([positions, captions], dim=1),
                            torch.stack([positions, captions[text_of_image]], dim=1),
                            torch.stack([image_of_text, captions], dim=1)])
    is_positive = torch.zeros(len(step_pairs), dtype=torch.bool)
    is_positive[: len(captions)] = True
    return step_pairs, is_positive


def train_fusion_teacher(
    model: PreTrainedModel,
    processor,
    train_split: datasets.Dataset,
    dual_teacher: PreTrainedModel,
    dual_processor,
    epochs: int = 3,
    lr: float = 1e-4,
    batch_size: int = 64,
    weight_decay: float = 0.05,
    warmup_fraction: float = 0.05,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    pairs: TrainingPairs | None = None,
    autocast_dtype: torch.dtype | None = None,
    on_epoch_end: Callable[[int, TrainingHistory], None] | None = None,
) -> TrainingHistory:
    """
    Train or fine-tune a single-stream ITM model (BlipForImageTextRetrieval, ViltForImageAndTextRetrieval, or any model
    with a registered cross-encoder adapter) by image-text matching on hard negatives, as BLIP and ALBEF do: each step
    takes B pairs (each image once) and scores, encoding each image once, the B positives, each image with its
    hardest other caption and each caption with its hardest other image under the frozen dual teacher
    (`matching_step_pairs`), with the balanced matching loss (`objectives.MatchingLoss`).

    Args:
        model ([`PreTrainedModel`]): the fusion teacher, trained in place (left in eval mode).
        processor: its processor; every image and text is preprocessed once, before the first step.
        train_split (`datasets.Dataset`): one row per image with `image` and `captions`.
        dual_teacher ([`PreTrainedModel`]): the (trained) dual teacher that mines the hard negatives; not trained here.
            Its embeddings of every training image and caption are computed once.
        dual_processor: the dual teacher's processor.
        epochs, lr, batch_size, weight_decay, warmup_fraction, max_grad_norm: the optimisation (`optimization.py`).
        seed (`int`): caption draws and batch order.
        pairs ([`TrainingPairs`], *optional*): the split already encoded with `{"fusion": processor, "dual":
            dual_processor}`.
        autocast_dtype (`torch.dtype`, *optional*): mixed precision for the forward passes; None: float32.
        on_epoch_end (`Callable[[int, TrainingHistory], None]`, *optional*): called after each epoch (its number,
            from 1) with the history so far, the model in eval mode.
    """
    start = time.perf_counter()
    prepare_cpu(model)
    if isinstance(model, MCADFusionModel):  # a stack over the dual teacher's token states: the trained ones
        model.use_dual_teacher(dual_teacher)
    pairs = pairs if pairs is not None else TrainingPairs.from_split(train_split, {"fusion": processor,
                                                                                   "dual": dual_processor})
    caption_rows, caption_position = torch.unique(pairs.caption_row, return_inverse=True)
    dual_images, dual_captions = dual_embeddings(dual_teacher, pairs.pixel_values["dual"], pairs.tables["dual"],
                                                 caption_rows)
    dual_of_pair = dual_captions[caption_position]  # t of each training pair's caption
    pixels, table = pairs.pixel_values["fusion"], pairs.tables["fusion"]
    steps_per_epoch = len(pairs.epoch_batches(0, batch_size, seed))
    if steps_per_epoch == 0:
        raise UserError(f"The training split has fewer images than batch_size={batch_size}; lower batch_size.")
    total_steps = epochs * steps_per_epoch
    optimizer, scheduler = adamw_with_cosine(model, lr, total_steps, weight_decay, int(warmup_fraction * total_steps))
    step = TrainingStep(model, optimizer, scheduler, max_grad_norm)
    encoder, loss_fn, history = cross_encoder(model), MatchingLoss(), TrainingHistory()
    bar = progress(total=total_steps, desc="fusion teacher")
    device = model.device
    model.train()
    for epoch in range(epochs):
        epoch_losses = []
        for index in pairs.epoch_batches(epoch, batch_size, seed):
            images = pairs.image_index[index]
            step_pairs, is_positive = matching_step_pairs(dual_images[images] @ dual_of_pair[index].t(),
                                                          pairs.caption_row[index])
            texts, text_position = torch.unique(step_pairs[:, 1], return_inverse=True)
            input_ids, attention_mask = table.rows(texts)
            with autocast(device, autocast_dtype):
                output = encoder(pixels[images].to(device), input_ids.to(device), attention_mask.to(device),
                                 pairs=torch.stack([step_pairs[:, 0], text_position], dim=1).to(device),
                                 batch_size=len(step_pairs))
            loss = loss_fn(output.match_logits.float(), is_positive.to(device))
            step(loss)
            history.losses.append(loss.item())
            epoch_losses.append(loss.item())
            bar.update(1)
        history.epoch_losses.append(float(np.mean(epoch_losses)))
        bar.set_postfix(epoch=epoch + 1, loss=f"{history.epoch_losses[-1]:.3f}")
        logger.info("fusion teacher: epoch %d/%d, loss %.4f", epoch + 1, epochs, history.epoch_losses[-1])
        _end_epoch(model, epoch, history, on_epoch_end)
    bar.close()
    model.eval()
    history.seconds = time.perf_counter() - start
    return history


def _end_epoch(model: torch.nn.Module, epoch: int, history: TrainingHistory, on_epoch_end) -> None:
    if on_epoch_end is not None:
        model.eval()
        on_epoch_end(epoch + 1, history)
        model.train()


__all__ = [
    "TeacherModels",
    "TrainingHistory",
    "cross_encoder",
    "dual_embeddings",
    "matching_step_pairs",
    "mine_hard_negatives",
    "prepare_cpu",
    "train_dual_teacher",
    "train_fusion_teacher",
]
