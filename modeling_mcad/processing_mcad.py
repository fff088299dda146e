"""The MCAD student's processor: an image processor and a tokenizer behind one call.

This file travels to the Hub with the weights (`trust_remote_code`): it imports only transformers and its
siblings, relatively.
"""

from transformers import BertTokenizer, ProcessorMixin
from transformers.image_utils import PILImageResampling
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .configuration_mcad import PRESET_VOCABULARY, MCADConfig

# The standard processor with the same parts (an image processor and a tokenizer), named in saved folders.
STANDARD_PROCESSOR_CLASS = "CLIPProcessor"
# Text towers with a token type embedding.
TOKEN_TYPE_TEXT_TYPES = ("bert", "roberta")
# 16-bit grayscale PIL modes: transformers' RGB conversion clips their values at 255 (mid-gray turns white).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_eight_bits(image):
    """A 16-bit grayscale PIL image scaled to 8 bits (other images unchanged), before the RGB conversion."""
    if getattr(image, "mode", None) in _SIXTEEN_BIT_MODES:
        return image.convert("I").point(lambda value: value * (1 / 257)).convert("L")
    return image


class MCADProcessor(ProcessorMixin):
    """
    Wraps an image processor and a tokenizer into one processor, as `CLIPProcessor` does.

    Unlike most processors it refuses, by default, a text longer than the tokenizer's `model_max_length`
    rather than let the model fail on it later: pass `truncation=True` to cut such texts instead.

    Args:
        image_processor ([`BaseImageProcessor`]): resizes, rescales and normalises images.
        tokenizer ([`PreTrainedTokenizerBase`]): turns captions into `input_ids` / `attention_mask`.

    Example:

    ```python
    >>> processor = MCADProcessor.from_preset("shapes")
    >>> inputs = processor(text=["a red circle left of a blue square"], images=[image], return_tensors="pt",
    ...                    padding=True)
    ```
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_preset(cls, name: str) -> "MCADProcessor":
        """
        The processor of a named preset (`tiny`, `shapes`, `mobile`), built offline: see `from_config`.

        Real deployments take the teacher's tokenizer instead, e.g.
        `MCADProcessor(image_processor, AutoTokenizer.from_pretrained("openai/clip-vit-base-patch32"))`, with the
        student's `text_config.vocab_size` set to `len(tokenizer)`.
        """
        return cls.from_config(MCADConfig.from_preset(name))

    @classmethod
    def from_config(cls, config: MCADConfig, tokenizer=None) -> "MCADProcessor":
        """
        A processor that fits a student config, built offline: an image processor that resizes to the image tower's
        size (bilinear, no crop, mean = std = 0.5, any image mode converted to RGB) and, unless `tokenizer` is given,
        a lower-casing WordPiece tokenizer over `PRESET_VOCABULARY` (special tokens, single characters as a fallback,
        a few hundred caption words) limited to the text tower's positions. Either tokenizer makes `token_type_ids`
        only for text towers that read them.
        """
        size = {"height": config.vision_config.image_size, "width": config.vision_config.image_size}
        # CLIP's image processor made to resize to the square as ViT's does (no centre crop): CLIPProcessor in
        # transformers 4.x and transformers.js then read the saved file as it is meant.
        image_processor = CLIPImageProcessorPil(
            size=size,
            crop_size=size,
            do_center_crop=False,
            resample=PILImageResampling.BILINEAR,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            do_convert_rgb=True,
        )
        if tokenizer is None:
            tokenizer = BertTokenizer(
                vocab={token: index for index, token in enumerate(PRESET_VOCABULARY)},
                model_max_length=config.text_config.max_position_embeddings,
            )
        # Token types only for towers that read them: CLIPModel's forward (transformers 4.x) refuses them. Set in
        # init_kwargs too, which is what a saved tokenizer_config.json holds.
        if config.text_config.model_type not in TOKEN_TYPE_TEXT_TYPES:
            names = [name for name in tokenizer.model_input_names if name != "token_type_ids"]
            tokenizer.model_input_names = tokenizer.init_kwargs["model_input_names"] = names
        return cls(image_processor=image_processor, tokenizer=tokenizer)

    def to_dict(self) -> dict:
        """The processor as saved: `processor_class` names `CLIPProcessor`, the standard processor of the same two
        parts, so `AutoProcessor` loads the folder without custom code; `auto_map` still leads
        `trust_remote_code=True` to this class."""
        return {**super().to_dict(), "processor_class": STANDARD_PROCESSOR_CLASS}

    def save_pretrained(self, save_directory, **kwargs) -> list[str]:
        """Save as every processor does, with the image processor's own `preprocessor_config.json` beside it (written
        first, so that `push_to_hub=True` uploads it too): the file transformers.js and transformers 4.x read."""
        image_processor_files = self.image_processor.save_pretrained(save_directory)
        return [*super().save_pretrained(save_directory, **kwargs), *image_processor_files]

    def __call__(self, images=None, text=None, **kwargs):
        """
        Prepare images and/or texts for the student.

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*): RGB,
                grayscale (8 or 16 bits), palette, CMYK or RGBA images (converted to RGB by the image processor).
            text (`str` or `list[str]`, *optional*): captions or queries.
            kwargs: passed on: `return_tensors`, `padding`, `truncation`, `max_length`, ...

        Returns:
            [`BatchFeature`] with `pixel_values` and/or `input_ids`, `attention_mask` (and `token_type_ids` where
            the tokenizer makes them).
        """
        if text is not None and not isinstance(text, str):
            if not isinstance(text, (list, tuple)):
                raise ValueError(f"text must be a string or a list of strings, got {type(text).__name__}.")
            for index, item in enumerate(text):
                if not isinstance(item, str):
                    raise ValueError(f"text must be a string or a list of strings, but text[{index}] is "
                                     f"{type(item).__name__}.")
        if images is not None:
            images = [_to_eight_bits(image) for image in images] if isinstance(images, (list, tuple)) else (
                _to_eight_bits(images))
        encoding = super().__call__(images=images, text=text, **kwargs)
        if "attention_mask" in encoding and not kwargs.get("truncation"):
            self._check_text_length(encoding["attention_mask"], kwargs.get("max_length"))
        return encoding

    def _check_text_length(self, attention_mask, max_length=None) -> None:
        limit = max_length or self.tokenizer.model_max_length
        if hasattr(attention_mask, "ndim"):  # a tensor or array of shape (batch, length)
            rows = attention_mask.reshape(-1, attention_mask.shape[-1]).tolist()
        else:  # lists: one row (a single text) or a list of rows
            rows = attention_mask if attention_mask and isinstance(attention_mask[0], list) else [attention_mask]
        for index, length in enumerate(sum(row) for row in rows):
            if length > limit:
                raise ValueError(
                    f"text[{index}] is {length} tokens long, more than the model's limit of {limit}; "
                    "shorten it or call the processor with truncation=True."
                )


__all__ = ["MCADProcessor"]
