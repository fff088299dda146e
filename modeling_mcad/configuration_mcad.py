"""Configuration of the MCAD student: a dual encoder whose towers are standard transformers models.

This file travels to the Hub with the weights (`trust_remote_code`): it imports only transformers and its
siblings, relatively.
"""

import copy

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# Tower types the student knows how to pool. Each needs a pooled [batch, dim] vector and that dimension.
SUPPORTED_VISION_TYPES = ("vit", "deit", "mobilevit", "clip_vision_model")
SUPPORTED_TEXT_TYPES = ("bert", "roberta", "distilbert", "clip_text_model")

# The offline preset tokenizer's WordPiece vocabulary (see `MCADProcessor.from_preset`). It lives here because
# it fixes the text tower's embedding table: config and tokenizer read the same list.
_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_CHARACTERS = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()/&+")
_WORDS = """
a an the this that these those there here it its one two three four five six seven eight nine ten
of to in on at by for from with without into onto over under above below beside between behind near far
next left right top bottom upper lower middle center centre side front back corner edge
and or but not no is are was were be been being has have had do does
small large big tiny little huge medium short long tall wide narrow thin thick round flat
red green blue yellow purple orange pink brown black white gray grey cyan magenta violet gold silver
circle circles square squares triangle triangles star stars diamond diamonds cross crosses heart hearts
rectangle rectangles ellipse oval pentagon hexagon shape shapes object objects thing things dot dots
photo photograph picture image drawing scene view background foreground
man woman men women person people boy girl child children baby player group crowd
dog dogs cat cats horse horses bird birds cow sheep elephant bear zebra giraffe animal animals
car cars bus truck train bike bicycle motorcycle boat plane airplane street road city building house
table chair bed sofa couch room kitchen window door wall floor grass tree trees water sea beach snow sky
sitting standing walking running riding holding playing eating looking wearing lying flying
ball frisbee kite umbrella bag phone laptop book food pizza cake plate cup bottle clock sign
""".split()
PRESET_VOCABULARY = (_SPECIAL_TOKENS + _CHARACTERS + ["##" + c for c in _CHARACTERS]
                     + sorted(set(_WORDS) - set(_CHARACTERS)))
PRESET_SPECIAL_TOKEN_IDS = {"pad_token_id": PRESET_VOCABULARY.index("[PAD]"),
                             "bos_token_id": PRESET_VOCABULARY.index("[CLS]"),
                             "eos_token_id": PRESET_VOCABULARY.index("[SEP]")}

# Every preset's towers are CLIP's (pre-norm; the image pooled at its class token, the text at its end-of-text token,
# [SEP] for the preset tokenizer): a student of two CLIP towers holds exactly `CLIPModel`'s weights, so it loads as
# one with no custom code (`MCADConfig.plain_model_type`). A ViT image tower and a BERT text tower of the same sizes
# remain configurable (docs/experiments/2026-12-01-student-and-ablation.md: a BERT text tower of the `shapes` size
# never bound a colour to its shape).
_CLIP_TEXT = {"model_type": "clip_text_model", **PRESET_SPECIAL_TOKEN_IDS}
PRESETS = {
    # About 55 thousand parameters: for unit tests only.
    "tiny": {
        "vision_config": {
            "model_type": "clip_vision_model", "image_size": 32, "patch_size": 8, "num_channels": 3,
            "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        },
        "text_config": {
            **_CLIP_TEXT, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "max_position_embeddings": 32,
        },
        "projection_dim": 32,
    },
    # The mcad-shapes student: 32 px scenes need fine patches (4 px) more than width.
    "shapes": {
        "vision_config": {
            "model_type": "clip_vision_model", "image_size": 32, "patch_size": 4, "num_channels": 3,
            "hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 3, "intermediate_size": 384,
        },
        "text_config": {
            **_CLIP_TEXT, "hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 3,
            "intermediate_size": 384, "max_position_embeddings": 32,
        },
        "projection_dim": 96,
    },
    # 224 px, deployable. Patches of 32 px rather than MobileViT: on a 2-core CPU MobileViT-XXS took 786 ms for 32
    # images against 81 ms for a ViT of this size (ViT-B/32: 1848 ms), its unfold ops being slow.
    "mobile": {
        "vision_config": {
            "model_type": "clip_vision_model", "image_size": 224, "patch_size": 32, "num_channels": 3,
            "hidden_size": 192, "num_hidden_layers": 6, "num_attention_heads": 3, "intermediate_size": 768,
        },
        "text_config": {
            **_CLIP_TEXT, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
            "intermediate_size": 1024, "max_position_embeddings": 77,
        },
        "projection_dim": 256,
    },
}

# Standard transformers classes that hold a student's weights under the same names (both build their towers with
# `AutoModel.from_config`, as `MCADModel` does, and project the towers' `pooler_output`): a saved student names the
# first that fits as its `model_type`, so it loads with no custom code. The vision-text dual encoder projects
# `hidden_size` wide pooled outputs, which MobileViT lacks (and DistilBERT has no pooled output at all).
PLAIN_MODEL_CLASSES = {"clip": "CLIPModel", "vision-text-dual-encoder": "VisionTextDualEncoderModel"}
_DUAL_ENCODER_VISION_TYPES = ("vit", "deit", "clip_vision_model")
_DUAL_ENCODER_TEXT_TYPES = ("bert", "roberta", "clip_text_model")


class MCADConfig(PreTrainedConfig):
    r"""
    Configuration of [`MCADModel`], the MCAD student: an image tower and a text tower (any supported
    transformers model type), a linear projection of each to `projection_dim`, and a learnable logit scale.

    Saved, it names the standard class that holds the same weights (`plain_model_type`: `CLIPModel` for two CLIP
    towers, as every preset has), so the folder loads without custom code too.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the image tower; its `model_type` must be one of `SUPPORTED_VISION_TYPES`
            (default: a ViT).
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the text tower; its `model_type` must be one of `SUPPORTED_TEXT_TYPES` (default: BERT).
        projection_dim (`int`, *optional*, defaults to 256):
            Dimension of the shared image-text embedding space.
        logit_scale_init_value (`float`, *optional*, defaults to 2.6592):
            Initial value of the log of the logit scale; 2.6592 = ln(1 / 0.07), as in CLIP.

    Example:

    ```python
    >>> from modeling_mcad import MCADConfig, MCADModel
    >>> config = MCADConfig(vision_config={"model_type": "mobilevit", "image_size": 64}, projection_dim=128)
    >>> model = MCADModel(config)
    ```
    """

    model_type = "mcad"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projection_dim: int = 256
    logit_scale_init_value: float = 2.6592

    def __post_init__(self, **kwargs):
        # A saved config's `model_type` is a standard class's (`to_dict`); as an attribute it would hide ours.
        if kwargs.get("model_type") in PLAIN_MODEL_CLASSES:
            kwargs.pop("model_type")
        super().__post_init__(**kwargs)
        _check_tower_type("vision_config", self.vision_config.model_type, SUPPORTED_VISION_TYPES)
        _check_tower_type("text_config", self.text_config.model_type, SUPPORTED_TEXT_TYPES)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MCADConfig":
        """Config of a named preset (`tiny`, `shapes` or `mobile`; see `PRESETS`), with top-level overrides."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        kwargs = copy.deepcopy(PRESETS[name])
        kwargs["text_config"]["vocab_size"] = len(PRESET_VOCABULARY)
        kwargs.update(overrides)
        return cls(**kwargs)

    def plain_model_type(self) -> str | None:
        """
        The `model_type` of the standard transformers class that loads this student's weights with no custom code
        (`PLAIN_MODEL_CLASSES`): `clip` when both towers are CLIP's, `vision-text-dual-encoder` when both towers give
        a pooled output `hidden_size` wide, `None` otherwise (the student then loads only with its own code).
        """
        vision, text = self.vision_config.model_type, self.text_config.model_type
        if (vision, text) == ("clip_vision_model", "clip_text_model"):
            return "clip"
        if vision in _DUAL_ENCODER_VISION_TYPES and text in _DUAL_ENCODER_TEXT_TYPES:
            return "vision-text-dual-encoder"
        return None

    def to_dict(self) -> dict:
        """
        The config as saved: where a standard class holds the same weights (`plain_model_type`), `model_type` and
        `architectures` name that class, so that `CLIPModel`, `AutoModel`, the pipelines and transformers.js load
        the folder without its code, while `auto_map` still leads `trust_remote_code=True` to `MCADModel`.
        """
        output = super().to_dict()
        plain = self.plain_model_type()
        if plain is not None:
            output["model_type"] = plain
            output["architectures"] = [PLAIN_MODEL_CLASSES[plain]]
        return output

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        """Read a config as transformers does; a student saved under a standard class's `model_type` (`to_dict`),
        or that class's own checkpoint, is read as an `MCADConfig`, without transformers' model-type warning."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") in PLAIN_MODEL_CLASSES:
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs


def _check_tower_type(key: str, model_type: str, supported: tuple[str, ...]) -> None:
    if model_type not in supported:
        raise ValueError(
            f"{key} has model_type {model_type!r}, which the MCAD student cannot use as a tower. "
            f"Use one of {', '.join(supported)}."
        )


__all__ = [
    "MCADConfig", "PLAIN_MODEL_CLASSES", "PRESETS", "PRESET_VOCABULARY", "SUPPORTED_TEXT_TYPES",
    "SUPPORTED_VISION_TYPES",
]
