"""A fusion teacher built over a CLIP dual teacher: a single-stream stack over its token states (ALBEF / BLIP's shape).
It is the fusion teacher of mcad-shapes (`modeling_mcad.shapes` trains it), and any trained CLIPModel can be its base.

ViLT and BLIP trained from scratch on mcad-shapes never passed the fusion gate
(docs/experiments/2026-11-29-fusion-teacher.md): whether "A ⟨relation⟩ B" is true is the XOR of the relation word and
the order of the objects in the image, and an additive head gets no first-order gradient for an XOR.
[`MCADFusionModel`] is the structure that passes:

- its unimodal encoders are a trained CLIP dual teacher (`unimodal`, frozen while the stack trains), as ALBEF / BLIP
  fuse aligned unimodal states;
- a joint pre-norm transformer over [fusion token; caption token states; patch states + 2D sine-cosine positions];
- m = head(f) + w · <v, t> + Σ_tokens g(x_t) · r(h_t): the fused state's score, the CLIP similarity (as BLIP adds ITC
  to ITM when it re-ranks) and a **relation readout**: each caption token's state after `relation_layer`, read by
  the relation head r (trained to tell which named object is left of / above the other), times a gate g learned
  from the token's input state (the dual teacher's text state there, which carries the word). The product gives
  the XOR a first-order gradient.

`MCADFusionCrossEncoder` is its cross-encoder adapter (registered for `model_type` "mcad_fusion"), so
`MCADTeacher.from_teachers(dual, fusion)` takes it like BLIP or ViLT. This file imports only torch, transformers and
its siblings `cross_encoders` / `errors` (single-dot imports): a saved model or teacher carries it, with them, as
custom code (`register_for_auto_class` below), and loads with `trust_remote_code=True` where the package is absent.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, CLIPModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import ModelOutput

from .cross_encoders import CrossEncoder, FusionOutput, register_cross_encoder
from .errors import UserError


def sincos_positions(grid: int, width: int) -> torch.Tensor:
    """2D sine-cosine position embeddings, `(1 + grid², width)`: a zero row for [CLS], then the patches row by row
    (half the channels encode the row, half the column, as in MAE)."""
    if width % 4:
        raise ValueError(f"2D sine-cosine positions need a width divisible by 4, got {width}.")
    frequencies = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    rows, columns = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                   indexing="ij")
    parts = []
    for coordinate in (rows.flatten(), columns.flatten()):
        angles = coordinate[:, None] * frequencies[None, :]
        parts += [angles.sin(), angles.cos()]
    patches = torch.cat(parts, dim=1)
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), patches]).float()


class MCADFusionConfig(PreTrainedConfig):
    r"""
    Configuration of [`MCADFusionModel`].

    Args:
        unimodal_config (`dict` or `PreTrainedConfig`, *optional*): the CLIP config of the unimodal encoders (the dual
            teacher's).
        hidden_size (`int`, *optional*, defaults to 128): width of the fusion stack.
        num_hidden_layers (`int`, *optional*, defaults to 4): its depth.
        num_attention_heads (`int`, *optional*, defaults to 4).
        relation_layer (`int`, *optional*): the layer (from 1; default: half the depth, at least 1) whose
            caption-token states the grounding and relation heads read (and the relation readout).
        relation_readout (`bool`, *optional*, defaults to `True`): add the gated relation readout to m. `False`
            gives the additive head of the second round of BENCHMARKS.md, which stays at chance on relation flips.
        contrastive_weight_init (`float`, *optional*, defaults to 10.0): initial w in m = ... + w · <v, t>.
    """

    model_type = "mcad_fusion"
    sub_configs_defaults = {"unimodal_config": SubConfigSpec(config_class=AutoConfig, model_type="clip")}

    unimodal_config: dict | PreTrainedConfig | None = None
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    relation_layer: int | None = None
    relation_readout: bool = True
    contrastive_weight_init: float = 10.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
            if not getattr(self, name) >= 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)!r}.")
        if self.unimodal_config.model_type != "clip":
            raise UserError(f"unimodal_config must be a CLIP config (the dual teacher's), got model_type "
                            f"{self.unimodal_config.model_type!r}.")
        if self.relation_layer is None:
            self.relation_layer = max(1, self.num_hidden_layers // 2)
        if not 1 <= self.relation_layer <= self.num_hidden_layers:
            raise UserError(f"relation_layer must be in [1, num_hidden_layers={self.num_hidden_layers}], got "
                            f"{self.relation_layer}.")
        if self.hidden_size % self.num_attention_heads or self.hidden_size % 4:
            raise UserError(f"hidden_size={self.hidden_size} must be a multiple of 4 and of num_attention_heads="
                            f"{self.num_attention_heads}.")


@dataclass
class MCADFusionOutput(ModelOutput):
    """
    Args:
        match_logits (`torch.FloatTensor` of shape `(pairs,)`): m for each (image, caption) pair.
        fused (`torch.FloatTensor` of shape `(pairs, hidden_size)`): f, the fusion token's final (normalised) state.
        relation_states (`torch.FloatTensor` of shape `(pairs, length, hidden_size)`): the caption tokens' states after
            `relation_layer` (what the grounding and relation heads read).
    """

    match_logits: torch.FloatTensor | None = None
    fused: torch.FloatTensor | None = None
    relation_states: torch.FloatTensor | None = None


class MCADFusionModel(PreTrainedModel):
    """
    A single-stream image-text matcher over a CLIP dual teacher's token states (see the module docstring). Build it
    from a trained dual teacher with [`MCADFusionModel.from_dual_teacher`].

    Args:
        config ([`MCADFusionConfig`]).
    """

    config_class = MCADFusionConfig
    base_model_prefix = "mcad_fusion"
    input_modalities = ("image", "text")

    def __init__(self, config: MCADFusionConfig):
        super().__init__(config)
        self.unimodal = CLIPModel(config.unimodal_config)
        vision, text = config.unimodal_config.vision_config, config.unimodal_config.text_config
        width = config.hidden_size
        self.image_projection = nn.Sequential(nn.LayerNorm(vision.hidden_size), nn.Linear(vision.hidden_size, width))
        self.text_projection = nn.Sequential(nn.LayerNorm(text.hidden_size), nn.Linear(text.hidden_size, width))
        self.register_buffer("patch_positions", sincos_positions(vision.image_size // vision.patch_size, width))
        self.text_positions = nn.Parameter(torch.empty(text.max_position_embeddings, width))
        self.modality = nn.Parameter(torch.empty(2, width))
        self.fusion_token = nn.Parameter(torch.empty(width))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, config.num_attention_heads, 4 * width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(width)
        self.match_head = nn.Linear(width, 1)
        self.contrastive_weight = nn.Parameter(torch.empty(()))
        self.grounding_head = nn.Linear(width, 2)  # (x, y) of the object a shape word names
        self.relation_head = nn.Linear(width, 1)  # logit: the first-named object is left of / above the second
        self.readout_gate = nn.Linear(width, 1)
        self.post_init()

    def _init_weights(self, module):
        # The stack keeps torch's own initialisation (what it was tuned with); the unimodal encoders come from a
        # trained dual teacher (`from_dual_teacher`). Loading needs a complete checkpoint (as MCADTeacher saves it):
        # stack weights missing from one would not be initialised here.
        if isinstance(module, MCADFusionModel):
            init.normal_(module.text_positions, std=0.02)
            init.normal_(module.modality, std=0.02)
            init.normal_(module.fusion_token, std=0.02)
            init.constant_(module.contrastive_weight, self.config.contrastive_weight_init)
            init.normal_(module.readout_gate.weight, std=0.02)
            init.zeros_(module.readout_gate.bias)
            vision = self.config.unimodal_config.vision_config
            init.copy_(module.patch_positions,
                       sincos_positions(vision.image_size // vision.patch_size, self.config.hidden_size))

    @classmethod
    def from_dual_teacher(cls, dual: CLIPModel, **config_kwargs) -> "MCADFusionModel":
        """A fusion teacher whose unimodal encoders are a copy of `dual` (its config and weights) and a fresh stack."""
        if not isinstance(dual, CLIPModel):
            raise ValueError(f"The dual teacher must be a CLIPModel, got {type(dual).__name__}.")
        model = cls(MCADFusionConfig(unimodal_config=dual.config.to_dict(), **config_kwargs))
        model.unimodal.load_state_dict(dual.state_dict())
        return model

    def use_dual_teacher(self, dual: CLIPModel | None = None) -> None:
        """Freeze the unimodal encoders, after copying `dual` (the trained dual teacher) into them when given: only
        the stack trains then, as ALBEF and BLIP fuse aligned unimodal states."""
        if dual is not None:
            self.unimodal.load_state_dict(dual.state_dict())
        self.unimodal.requires_grad_(False).eval()

    def image_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The unimodal vision encoder's token states ([CLS] first), `(images, 1 + patches, vision width)`."""
        return self.unimodal.vision_model(pixel_values=pixel_values).last_hidden_state

    def image_embeds(self, image_states: torch.Tensor) -> torch.Tensor:
        """v: the dual teacher's L2-normalised image embedding, from its [CLS] state."""
        pooled = self.unimodal.vision_model.post_layernorm(image_states[:, 0])
        return F.normalize(self.unimodal.visual_projection(pooled), dim=-1)

    def text_states(self, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The unimodal text encoder's token states and t, the L2-normalised text embedding."""
        output = self.unimodal.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return output.last_hidden_state, F.normalize(self.unimodal.text_projection(output.pooler_output), dim=-1)

    def fuse(self, image_states: torch.Tensor, text_states: torch.Tensor, attention_mask: torch.Tensor,
             image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> MCADFusionOutput:
        """
        The stack on pairs (image_states[p], text_states[p]).

        Args:
            image_states (`torch.Tensor` of shape `(pairs, 1 + patches, vision width)`): from `image_states`.
            text_states (`torch.Tensor` of shape `(pairs, length, text width)`): from `text_states`.
            attention_mask (`torch.Tensor` of shape `(pairs, length)`): 1 for caption tokens, 0 for padding.
            image_embeds, text_embeds (`torch.Tensor` of shape `(pairs, projection dim)`): v and t.
        """
        pairs, length = text_states.shape[:2]
        if len(image_states) != pairs or image_states.shape[1] != len(self.patch_positions):
            raise ValueError(f"Got image states of shape {tuple(image_states.shape)} for {pairs} captions: pass one "
                             f"image per caption, each with {len(self.patch_positions)} tokens (the dual teacher's "
                             f"[CLS] and patches at its image size, from `image_states`).")
        mask = attention_mask.bool()
        dtype = self.fusion_token.dtype
        words = self.text_projection(text_states.to(dtype))
        sequence = torch.cat([
            self.fusion_token.expand(pairs, 1, -1),
            words + self.modality[0] + self.text_positions[:length],
            self.image_projection(image_states.to(dtype)) + self.patch_positions + self.modality[1],
        ], dim=1)
        padding = torch.cat([mask.new_zeros(pairs, 1), ~mask, mask.new_zeros(pairs, image_states.shape[1])], dim=1)
        relation_states = None
        for depth, layer in enumerate(self.layers, start=1):
            sequence = layer(sequence, src_key_padding_mask=padding)
            if depth == self.config.relation_layer:
                relation_states = sequence[:, 1 : 1 + length]
        fused = self.final_norm(sequence[:, 0])
        logits = self.match_head(fused).squeeze(-1) + self.contrastive_weight * (image_embeds * text_embeds).sum(-1)
        if self.config.relation_readout:
            readout = self.readout_gate(words).squeeze(-1) * self.relation_head(relation_states).squeeze(-1)
            logits = logits + (readout * mask).sum(-1)
        return MCADFusionOutput(match_logits=logits, fused=fused, relation_states=relation_states)

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, image_states: torch.Tensor | None = None,
                **kwargs) -> MCADFusionOutput:
        """
        Match logits of pairs (image p, caption p).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(pairs, channels, height, width)`): from the dual teacher's
                processor; or pass `image_states` (from `image_states`) instead.
            input_ids (`torch.LongTensor` of shape `(pairs, length)`), attention_mask (*optional*).
        """
        if (pixel_values is None) == (image_states is None):
            raise ValueError("Pass exactly one of pixel_values and image_states.")
        if input_ids is None:
            raise ValueError("input_ids is required: the fusion teacher scores (image, caption) pairs.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if image_states is None:
            image_states = self.image_states(pixel_values)
        text_states, text_embeds = self.text_states(input_ids, attention_mask)
        return self.fuse(image_states, text_states, attention_mask, self.image_embeds(image_states), text_embeds)


class MCADFusionCrossEncoder(CrossEncoder):
    """
    [`MCADFusionModel`] as a cross-encoder. Image state: the unimodal vision encoder's tokens. Text state: the
    unimodal text encoder's tokens and t, once per text (they do not depend on the image). Pair pass: the fusion
    stack. f = the fusion token's final state (one vector for P_v and P_t); m = the model's match logit.
    """

    model_class = MCADFusionModel

    @property
    def fused_dims(self) -> tuple[int, int]:
        return self.model.config.hidden_size, self.model.config.hidden_size

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.image_states(pixel_values)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     texts_per_call: int = 512) -> tuple[torch.Tensor, ...]:
        encoded = [self.model.text_states(input_ids[start : start + texts_per_call],
                                          attention_mask[start : start + texts_per_call])
                   for start in range(0, len(input_ids), texts_per_call)]
        states, embeds = (torch.cat(parts) for parts in zip(*encoded))
        return states, attention_mask, embeds

    def score_pairs(self, image_states: torch.Tensor, text_states: torch.Tensor, attention_mask: torch.Tensor,
                    text_embeds: torch.Tensor) -> FusionOutput:
        output = self.model.fuse(image_states, text_states, attention_mask, self.model.image_embeds(image_states),
                                 text_embeds)
        return FusionOutput(match_logits=output.match_logits, fused=output.fused)


AutoConfig.register(MCADFusionConfig.model_type, MCADFusionConfig, exist_ok=True)
AutoModel.register(MCADFusionConfig, MCADFusionModel, exist_ok=True)
register_cross_encoder(MCADFusionConfig.model_type, MCADFusionCrossEncoder)
MCADFusionConfig.register_for_auto_class()
MCADFusionModel.register_for_auto_class("AutoModel")

__all__ = ["MCADFusionConfig", "MCADFusionCrossEncoder", "MCADFusionModel", "MCADFusionOutput", "sincos_positions"]
