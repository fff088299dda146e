"""The MCAD student: a small CLIP-style dual encoder built from standard transformers towers.

This file travels to the Hub with the weights (`trust_remote_code`): it imports only torch, transformers and
its siblings, relatively.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_mcad import MCADConfig

# Written into every saved config so that both auto classes resolve to this model (a class registers one auto
# class only; the zero-shot-image-classification pipeline asks for the second).
AUTO_MAP = {
    "AutoConfig": "configuration_mcad.MCADConfig",
    "AutoModel": "modeling_mcad.MCADModel",
    "AutoModelForZeroShotImageClassification": "modeling_mcad.MCADModel",
}
# Image towers whose forward takes `interpolate_pos_encoding` (images of another size than `image_size`).
INTERPOLATING_VISION_TYPES = ("vit", "deit", "clip_vision_model")


@dataclass
class MCADOutput(ModelOutput):
    """
    Output of [`MCADModel`]; the same fields as transformers' `CLIPOutput`, so CLIP-style code reads it unchanged.

    Args:
        loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `return_loss` is `True`):
            Symmetric image-text contrastive (InfoNCE) loss.
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`):
            Scaled cosine similarities of every image with every text.
        logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`):
            The transpose of `logits_per_image`.
        text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised text embeddings.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised image embeddings.
        text_model_output (`BaseModelOutputWithPooling`):
            The text tower's output, its `pooler_output` the projected embedding (`get_text_features`).
        vision_model_output (`BaseModelOutputWithPooling`):
            The image tower's output, its `pooler_output` the projected embedding (`get_image_features`).
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(
            self[k] if k not in ("text_model_output", "vision_model_output") else getattr(self, k).to_tuple()
            for k in self.keys()
        )


def contrastive_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: the i-th text matches the i-th image."""
    targets = torch.arange(len(logits_per_text), device=logits_per_text.device)
    return (F.cross_entropy(logits_per_text, targets) + F.cross_entropy(logits_per_text.t(), targets)) / 2


def _pooled_dim(config) -> int:
    """Width of a tower's pooled output."""
    if config.model_type == "mobilevit":
        return config.neck_hidden_sizes[-1]
    return config.dim if config.model_type == "distilbert" else config.hidden_size


def _projected(outputs: ModelOutput, projection: nn.Linear) -> BaseModelOutputWithPooling:
    """A tower's output with its pooled vector projected as `pooler_output`: the tower's pooler, or its first
    ([CLS]) token where it has none (DistilBERT)."""
    pooled = getattr(outputs, "pooler_output", None)
    pooled = pooled if pooled is not None else outputs.last_hidden_state[:, 0]
    return BaseModelOutputWithPooling(
        last_hidden_state=outputs.last_hidden_state,
        pooler_output=projection(pooled),
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
    )


def _is_exporting() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


class MCADPreTrainedModel(PreTrainedModel):
    config_class = MCADConfig
    base_model_prefix = "mcad"
    input_modalities = ("image", "text")
    _supports_sdpa = True
    # The towers' encoders checkpoint their layers (`activation_checkpointing_enable`, formerly gradient_...).
    supports_gradient_checkpointing = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MCADModel):
            init.normal_(module.visual_projection.weight, std=module.visual_projection.in_features**-0.5)
            init.normal_(module.text_projection.weight, std=module.text_projection.in_features**-0.5)
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            # Runs after the towers' own init. Convolutional towers (MobileViT) draw conv weights and BatchNorm
            # scales from N(0, 0.02): the signal then shrinks ~100x per block and a randomly initialised tower
            # outputs ~1e-17 in eval mode. A student trained from scratch needs He init and unit scales.
            for layer in module.vision_model.modules():
                if isinstance(layer, nn.Conv2d):
                    init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.weight is not None:
                    init.ones_(layer.weight)


class MCADModel(MCADPreTrainedModel):
    """
    The MCAD student: an image tower and a text tower (built with `AutoModel.from_config` from the config's
    sub-configs), a linear projection of each pooled output to `projection_dim`, and a learnable logit scale.
    A plain dual encoder at inference: images are embedded once, a text query costs one text forward pass.

    Args:
        config ([`MCADConfig`]): the towers' sub-configs, `projection_dim` and `logit_scale_init_value`.

    Example:

    ```python
    >>> from modeling_mcad import MCADModel, MCADProcessor
    >>> model, processor = MCADModel.from_preset("tiny"), MCADProcessor.from_preset("tiny")
    >>> inputs = processor(text=["a red circle"], images=[image], return_tensors="pt", padding=True)
    >>> probs = model(**inputs).logits_per_image.softmax(dim=-1)
    ```
    """

    def __init__(self, config: MCADConfig):
        super().__init__(config)
        self.vision_model = AutoModel.from_config(config.vision_config)
        self.text_model = AutoModel.from_config(config.text_config)
        # Keep the towers' configs the same objects as the parent's, so edits to one show in the other.
        self.vision_model.config = config.vision_config
        self.text_model.config = config.text_config
        self.visual_projection = nn.Linear(_pooled_dim(config.vision_config), config.projection_dim, bias=False)
        self.text_projection = nn.Linear(_pooled_dim(config.text_config), config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.config.auto_map = {**getattr(config, "auto_map", {}), **AUTO_MAP}
        self.post_init()

    @classmethod
    def from_preset(cls, name: str, **config_overrides) -> "MCADModel":
        """
        A randomly initialised student of a named preset, built offline.

        - `tiny`: about 55k parameters, for tests.
        - `shapes`: the mcad-shapes student (32 px images, 4 px patches): 0.62M parameters.
        - `mobile`: 224 px, deployable: a CLIP image tower of width 192 with 32 px patches (6 layers) and a CLIP
          text tower of width 256 (4 layers), 6.65M parameters with the preset vocabulary (CLIP ViT-B/32: 151M) —
          chosen for CPU and phone latency.

        Every preset's towers are CLIP's, so the saved student loads as a plain `CLIPModel` too.

        Args:
            name (`str`): `tiny`, `shapes` or `mobile`.
            config_overrides: top-level `MCADConfig` fields to change (e.g. `projection_dim`).
        """
        return cls(MCADConfig.from_preset(name, **config_overrides))

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """
        The text tower's output with the projected text embedding (not normalised) as its `pooler_output`, as
        `CLIPModel.get_text_features` in transformers 5.x.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): token ids from the processor.
            attention_mask (`torch.Tensor`, *optional*): 1 for real tokens, 0 for padding.
            position_ids (`torch.Tensor`, *optional*): passed to the text tower.
            token_type_ids (`torch.Tensor`, *optional*): passed to towers that take them (BERT).
            kwargs: passed to the text tower (`output_hidden_states`, `output_attentions`, ...).

        Returns:
            `BaseModelOutputWithPooling`: `pooler_output` of shape `(batch_size, projection_dim)`, and the tower's
            `last_hidden_state`, `hidden_states`, `attentions`.
        """
        outputs = self._text_tower(input_ids, attention_mask, position_ids, token_type_ids, **kwargs)
        return _projected(outputs, self.text_projection)

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs
    ) -> BaseModelOutputWithPooling:
        """
        The image tower's output with the projected image embedding (not normalised) as its `pooler_output`.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): images as
                prepared by the processor.
            interpolate_pos_encoding (`bool`, defaults to `False`): take images of another size than the tower's
                `image_size`, interpolating its position embeddings (ViT, DeiT and CLIP image towers).
            kwargs: passed to the image tower (`output_hidden_states`, `output_attentions`, ...).

        Returns:
            `BaseModelOutputWithPooling`: `pooler_output` of shape `(batch_size, projection_dim)`, and the tower's
            `last_hidden_state`, `hidden_states`, `attentions`.
        """
        outputs = self._vision_tower(pixel_values, interpolate_pos_encoding, **kwargs)
        return _projected(outputs, self.visual_projection)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> MCADOutput:
        """
        Embed images and/or texts; with both, score every image against every text.

        Args:
            input_ids (`torch.LongTensor` of shape `(text_batch_size, sequence_length)`, *optional*):
                Token ids from the processor.
            pixel_values (`torch.FloatTensor` of shape `(image_batch_size, num_channels, height, width)`,
                *optional*): Images from the processor.
            attention_mask (`torch.Tensor`, *optional*): 1 for real tokens, 0 for padding.
            position_ids (`torch.LongTensor`, *optional*): passed to the text tower.
            token_type_ids (`torch.LongTensor`, *optional*): passed to towers that take them.
            return_loss (`bool`, *optional*): also return the symmetric contrastive loss (needs both inputs and
                equal batch sizes: the i-th text is the i-th image's caption).
            interpolate_pos_encoding (`bool`, defaults to `False`): see `get_image_features`.
            kwargs: passed to both towers (`output_hidden_states`, `output_attentions`); `return_dict=False`
                returns a tuple.

        Returns:
            [`MCADOutput`]. With a single modality only its embedding is set, so it is the output's first field
            (what the feature-extraction pipelines read).
        """
        if input_ids is None and pixel_values is None:
            raise ValueError("MCADModel needs `input_ids`, `pixel_values` or both; build them with MCADProcessor.")

        text_embeds = image_embeds = text_outputs = vision_outputs = None
        if input_ids is not None:
            # return_dict=True: with config.return_dict False these would return tuples.
            text_outputs = self.get_text_features(input_ids, attention_mask, position_ids, token_type_ids,
                                                  **kwargs, return_dict=True)
            text_embeds = F.normalize(text_outputs.pooler_output, dim=-1)
        if pixel_values is not None:
            vision_outputs = self.get_image_features(pixel_values, interpolate_pos_encoding, **kwargs,
                                                     return_dict=True)
            image_embeds = F.normalize(vision_outputs.pooler_output, dim=-1)

        logits_per_text = logits_per_image = loss = None
        if text_embeds is not None and image_embeds is not None:
            logits_per_text = self.logit_scale.exp() * text_embeds @ image_embeds.t()
            logits_per_image = logits_per_text.t()
            if return_loss:
                loss = contrastive_loss(logits_per_text)
        elif return_loss:
            raise ValueError("return_loss=True needs both `input_ids` and `pixel_values` (matching pairs).")

        return MCADOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )

    def _text_tower(self, input_ids, attention_mask=None, position_ids=None, token_type_ids=None, **kwargs):
        if not _is_exporting():
            self._check_input_ids(input_ids)
        optional = {"token_type_ids": token_type_ids, "position_ids": position_ids}
        return self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **{name: value for name, value in optional.items() if value is not None},
            **kwargs,
            return_dict=True,
        )

    def _vision_tower(self, pixel_values, interpolate_pos_encoding=False, **kwargs):
        if interpolate_pos_encoding:
            if self.config.vision_config.model_type not in INTERPOLATING_VISION_TYPES:
                raise ValueError(
                    f"interpolate_pos_encoding=True needs an image tower with position embeddings to interpolate "
                    f"({', '.join(INTERPOLATING_VISION_TYPES)}); this one is "
                    f"{self.config.vision_config.model_type!r}: resize images to its image_size instead."
                )
            kwargs["interpolate_pos_encoding"] = True
        if not _is_exporting():
            self._check_pixel_values(pixel_values, any_size=interpolate_pos_encoding)
        return self.vision_model(pixel_values=pixel_values, **kwargs, return_dict=True)

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        text_config = self.config.text_config
        if input_ids.ndim != 2:
            raise ValueError(
                f"input_ids must have shape (batch_size, sequence_length), got {tuple(input_ids.shape)}; "
                "tokenize a list of strings with MCADProcessor(text=[...])."
            )
        if input_ids.shape[1] > text_config.max_position_embeddings:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens but the text tower takes at most "
                f"{text_config.max_position_embeddings}; call the processor with truncation=True."
            )
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= text_config.vocab_size):
            raise ValueError(
                f"input_ids holds ids outside the vocabulary [0, {text_config.vocab_size}); the tokenizer does "
                "not match this model: use the processor saved with it."
            )

    def _check_pixel_values(self, pixel_values: torch.Tensor, any_size: bool = False) -> None:
        vision_config = self.config.vision_config
        size = vision_config.image_size
        expected = (vision_config.num_channels, size, size)
        if any_size:  # interpolate_pos_encoding: any height and width
            expected = (vision_config.num_channels, "height", "width")
        shape = tuple(pixel_values.shape[1:])
        if pixel_values.ndim != 4 or any(isinstance(size, int) and size != actual
                                         for size, actual in zip(expected, shape)):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)} but this model expects "
                f"(batch_size, {', '.join(map(str, expected))}); prepare images with the model's processor "
                "(MCADProcessor or its image_processor), which resizes them and converts them to RGB."
            )


__all__ = ["MCADModel", "MCADOutput", "MCADPreTrainedModel"]
