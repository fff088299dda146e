"""Single-stream (image-text matching) models behind one small plug-in interface.

MCAD's second teacher is a cross-encoder: it reads an image and a caption together and gives, for each pair, a fused
feature f (its ITM hidden state) and a match logit m. Models differ in where those live, so each family gets one
adapter class, a [`CrossEncoder`] subclass that implements three members (and may override a fourth):

- `fused_dims` — (d_F of the image part, d_F of the text part); equal when the model has one fused vector.
- `encode_images(pixel_values)` — the per-image state the pair scorer attends to, one row per image.
- `score_pairs(image_states, *text_rows)` — a [`FusionOutput`] for pairs (image_states[p], text p).
- `encode_texts(input_ids, attention_mask)` — what `score_pairs` reads of each text, as a tuple of tensors with
  one row per text: by default the tokens themselves; a model whose text stream does not see the image (an
  ALBEF-style unimodal text encoder before the fusion layers) encodes each text once here.

The base class does the rest: it encodes every image (and text) once and scores any list of (image, text) pairs in
chunks, so an image paired with k captions costs one image-encoder pass, not k. Register the class for its `model_type`
with [`register_cross_encoder`] and `MCADTeacher.from_teachers` accepts that model as the fusion teacher.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn
from transformers import BlipForImageTextRetrieval, PreTrainedModel, ViltForImageAndTextRetrieval
from transformers.utils import ModelOutput

from .errors import UserError
from .utils import progress


class FusedParts:
    """The parts of a fused feature each adapter map reads, for objects with `fused`, `fused_image`, `fused_text`."""

    def image_part(self) -> torch.Tensor:
        """The feature P_v reads: `fused_image` where the model gives one, else `fused`."""
        return self.fused if self.fused_image is None else self.fused_image

    def text_part(self) -> torch.Tensor:
        """The feature P_t reads: `fused_text` where the model gives one, else `fused`."""
        return self.fused if self.fused_text is None else self.fused_text


@dataclass
class FusionOutput(FusedParts, ModelOutput):
    """
    What the fusion teacher says about a list of (image, text) pairs.

    Args:
        match_logits (`torch.FloatTensor` of shape `(num_pairs,)`):
            m, the ITM match logit: the log-odds that the pair matches (for a 2-way ITM head,
            logit(match) − logit(no match), so sigmoid(m) is the head's match probability).
        fused (`torch.FloatTensor` of shape `(num_pairs, d_F)`):
            f, the cross-encoder's fused ITM hidden state (the state the ITM head reads).
        fused_image (`torch.FloatTensor` of shape `(num_pairs, d_F_image)`, *optional*):
            The image part of f, for models that keep separate image and text streams; P_v reads it. `None`: P_v reads
            `fused`.
        fused_text (`torch.FloatTensor` of shape `(num_pairs, d_F_text)`, *optional*):
            The text part of f; P_t reads it. `None`: P_t reads `fused`.
    """

    match_logits: torch.FloatTensor | None = None
    fused: torch.FloatTensor | None = None
    fused_image: torch.FloatTensor | None = None
    fused_text: torch.FloatTensor | None = None


class CrossEncoder(nn.Module, ABC):
    """
    Plug-in interface to one single-stream ITM model (see the module docstring). Subclasses set `model_class` (the
    transformers class a checkpoint of this family is loaded with) and implement `fused_dims`, `encode_images` and
    `score_pairs`.

    Args:
        model ([`PreTrainedModel`]): the ITM model, an instance of `model_class`.
    """

    model_class: type[PreTrainedModel]

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        if not isinstance(model, self.model_class):
            raise ValueError(
                f"{type(self).__name__} wraps a {self.model_class.__name__}, got a {type(model).__name__}. Load the "
                f"fusion teacher with {self.model_class.__name__}.from_pretrained(...)."
            )
        self.model = model

    @property
    @abstractmethod
    def fused_dims(self) -> tuple[int, int]:
        """(d_F of the image part, d_F of the text part) of the fused feature."""

    @abstractmethod
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The state `score_pairs` needs from each image, one row per image (e.g. the vision encoder's tokens)."""

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What `score_pairs` reads of each text, one row per text: by default `(input_ids, attention_mask)`."""
        return input_ids, attention_mask

    @abstractmethod
    def score_pairs(self, image_states: torch.Tensor, *text_rows: torch.Tensor) -> FusionOutput:
        """
        Fused features and match logits of the pairs (image_states[p], text p), one cross-encoder pass each; the
        text rows are `encode_texts`'s tensors at the pairs' texts (by default `input_ids`, `attention_mask`).
        """

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pairs: torch.Tensor | None = None,
        batch_size: int = 256,
        images_per_call: int = 64,
    ) -> FusionOutput:
        """
        Score (image, text) pairs, encoding each image (and, with `encode_texts`, each text) once.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, channels, height, width)`): from the fusion
                teacher's processor; may stay on the CPU (each chunk of images moves to `input_ids`' device).
            input_ids (`torch.LongTensor` of shape `(num_texts, length)`): from the fusion teacher's processor, on
                the model's device.
            attention_mask (`torch.Tensor` of shape `(num_texts, length)`, *optional*).
            pairs (`torch.LongTensor` of shape `(num_pairs, 2)`, *optional*): rows of (image index, text index).
                Default: image i with text i (then `num_images` must equal `num_texts`).
            batch_size (`int`): pairs per `score_pairs` call; bounds memory, does not change the result.
            images_per_call (`int`): images encoded at a time (their states are held while their pairs are scored);
                bounds memory, does not change the result.
        """
        _check_inputs(pixel_values, input_ids, attention_mask, pairs)
        if pairs is None:
            rows = torch.arange(len(input_ids), device=input_ids.device)
            pairs = torch.stack([rows, rows], dim=1)
        pairs = pairs.to(input_ids.device)
        texts = self.encode_texts(input_ids, torch.ones_like(input_ids) if attention_mask is None else attention_mask)
        scored = {}  # field -> tensor of every pair's values, filled chunk by chunk
        image_chunks = range(0, len(pixel_values), images_per_call)
        for first in progress(image_chunks, desc="fusion teacher: scoring pairs", disable=len(image_chunks) < 4):
            selected = torch.nonzero((pairs[:, 0] >= first) & (pairs[:, 0] < first + images_per_call)).flatten()
            if len(selected) == 0:
                continue
            pixels = pixel_values[first : first + images_per_call].to(input_ids.device, self.model.dtype)
            image_states = self.encode_images(pixels)
            for chunk in selected.split(batch_size):
                output = self.score_pairs(image_states[pairs[chunk, 0] - first],
                                          *(rows[pairs[chunk, 1]] for rows in texts))
                for key in ("match_logits", "fused", "fused_image", "fused_text"):
                    value = getattr(output, key)
                    if value is not None:
                        if key not in scored:
                            scored[key] = value.new_empty((len(pairs), *value.shape[1:]))
                        scored[key][chunk] = value
        return FusionOutput(**scored)


def _check_inputs(pixel_values, input_ids, attention_mask, pairs) -> None:
    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values must be (num_images, channels, height, width), got shape "
                         f"{tuple(pixel_values.shape)}; build it with the fusion teacher's processor "
                         "(teacher.processors['fusion']).")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (num_texts, length), got shape {tuple(input_ids.shape)}.")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids "
                         f"{tuple(input_ids.shape)}; pass the mask the processor returned with these input_ids.")
    if pairs is None:
        if len(pixel_values) != len(input_ids):
            raise ValueError(f"Got {len(pixel_values)} images and {len(input_ids)} texts: without `pairs`, image i is "
                             "scored with text i, so pass as many of each, or pass pairs=[[image, text], ...].")
        return
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError("pairs must be (num_pairs, 2) rows of (image index, text index), got shape "
                         f"{tuple(pairs.shape)}.")
    images, texts = pairs[:, 0], pairs[:, 1]
    if len(pairs) and (pairs.min() < 0 or images.max() >= len(pixel_values) or texts.max() >= len(input_ids)):
        raise ValueError(f"pairs index outside {len(pixel_values)} images / {len(input_ids)} texts.")


class BlipCrossEncoder(CrossEncoder):
    """
    [`BlipForImageTextRetrieval`] with its ITM head (`use_itm_head=True`).

    Image state: the vision encoder's tokens. Pair pass: the text encoder, cross-attending to those tokens, as in the
    model's own forward (the caption's first token is whatever the processor put there, [CLS] for BLIP's processor).
    f = the fused [CLS] state `question_embeds[:, 0]` that the ITM head reads (one vector: P_v and P_t both read it);
    m = itm_head(f)[:, 1] − itm_head(f)[:, 0] (BLIP's class 1 is "match").
    """

    model_class = BlipForImageTextRetrieval

    @property
    def fused_dims(self) -> tuple[int, int]:
        width = self.model.config.text_config.hidden_size
        return width, width

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model(pixel_values=pixel_values).last_hidden_state

    def score_pairs(
        self, image_states: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> FusionOutput:
        image_attention = torch.ones(image_states.shape[:-1], dtype=torch.long, device=image_states.device)
        text_states = self.model.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_states,
            encoder_attention_mask=image_attention,
        ).last_hidden_state
        fused = text_states[:, 0]
        itm_logits = self.model.itm_head(fused)
        return FusionOutput(match_logits=itm_logits[:, 1] - itm_logits[:, 0], fused=fused)


class ViltCrossEncoder(CrossEncoder):
    """
    [`ViltForImageAndTextRetrieval`]: one joint transformer over the caption's tokens and the image's patch tokens
    (a single stream: text and patches attend to each other in every layer).

    Image state: the patch embeddings with their position and modality embeddings (`ViltEmbeddings.visual_embed`), so
    the patch projection runs once per image. Pair pass: the joint encoder over [text tokens; image tokens].
    f = ViLT's pooled [CLS] state (the state its ranking head reads; one vector for P_v and P_t);
    m = the ranking head's score `rank_output(f)`. Images are taken whole, every patch (a batch shares one size, as
    the processor makes it for images resized alike; ViLT's padding masks are not used).
    """

    model_class = ViltForImageAndTextRetrieval

    @property
    def fused_dims(self) -> tuple[int, int]:
        width = self.model.config.hidden_size
        return width, width

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # ViLT's own `visual_embed` draws a random patch order from the global RNG on every call (it samples up to
        # `max_image_length` patches); whole, unpadded images need none of that.
        embeddings = self.model.vilt.embeddings
        patches = embeddings.patch_embeddings(pixel_values)
        width, rows, columns = patches.shape[1:]
        grid = self.model.config.image_size // self.model.config.patch_size
        positions = embeddings.position_embeddings[:, 1:].transpose(1, 2).reshape(1, width, grid, grid)
        if (rows, columns) != (grid, grid):
            positions = nn.functional.interpolate(positions, size=(rows, columns), mode="bilinear",
                                                  align_corners=True)
        patches = (patches + positions).flatten(2).transpose(1, 2)
        cls = (embeddings.cls_token + embeddings.position_embeddings[:, :1]).expand(len(patches), -1, -1)
        return embeddings.dropout(torch.cat([cls, patches], dim=1))

    def score_pairs(
        self, image_states: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> FusionOutput:
        image_mask = torch.ones(image_states.shape[:-1], dtype=torch.long, device=image_states.device)
        fused = self.model.vilt(input_ids=input_ids, attention_mask=attention_mask, image_embeds=image_states,
                                pixel_mask=image_mask).pooler_output
        return FusionOutput(match_logits=self.model.rank_output(fused).squeeze(-1), fused=fused)


# model_type of the fusion teacher's config → its adapter class.
CROSS_ENCODERS: dict[str, type[CrossEncoder]] = {"blip": BlipCrossEncoder, "vilt": ViltCrossEncoder}


def register_cross_encoder(model_type: str, adapter_class: type[CrossEncoder]) -> None:
    """Make a fusion teacher of `model_type` (its config's `model_type`) usable through `adapter_class`."""
    if not (isinstance(adapter_class, type) and issubclass(adapter_class, CrossEncoder)):
        raise ValueError(f"{adapter_class!r} is not a CrossEncoder subclass.")
    CROSS_ENCODERS[model_type] = adapter_class


def cross_encoder_class(model_type: str) -> type[CrossEncoder]:
    """The adapter class registered for a fusion teacher's `model_type`."""
    if model_type not in CROSS_ENCODERS:
        raise UserError(
            f"No cross-encoder adapter for model_type {model_type!r} (known: {sorted(CROSS_ENCODERS)}). Write a "
            "CrossEncoder subclass for it and call register_cross_encoder(model_type, YourClass); a package that "
            "defines one registers it when imported (the fusion teacher built over CLIP, 'mcad_fusion': import "
            "modeling_mcad.fusion_model)."
        )
    return CROSS_ENCODERS[model_type]


__all__ = [
    "CROSS_ENCODERS",
    "BlipCrossEncoder",
    "CrossEncoder",
    "FusedParts",
    "FusionOutput",
    "ViltCrossEncoder",
    "cross_encoder_class",
    "register_cross_encoder",
]
