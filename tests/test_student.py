"""The student model, its config, presets and processor."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_layers import GradientCheckpointingLayer

from modeling_mcad import PRESETS, MCADConfig, MCADModel, MCADProcessor
from modeling_mcad.configuration_mcad import PRESET_VOCABULARY

from .conftest import random_images

TINY_VISION = {
    "vit": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 64},
    "deit": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 64},
    "mobilevit": {"image_size": 64, "hidden_sizes": [16, 24, 32], "neck_hidden_sizes": [8, 8, 16, 16, 24, 24, 48],
                  "num_attention_heads": 2, "expand_ratio": 2.0},
    "clip_vision_model": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "intermediate_size": 64},
}
TINY_TEXT = {
    "bert": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
    "roberta": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
    "distilbert": {"dim": 32, "n_layers": 1, "n_heads": 2, "hidden_dim": 64},
    "clip_text_model": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                        "intermediate_size": 64},
}
VOCAB = 100


def tiny_config(vision_type: str, text_type: str) -> MCADConfig:
    text = {"model_type": text_type, "vocab_size": VOCAB, "max_position_embeddings": 40, **TINY_TEXT[text_type]}
    return MCADConfig(vision_config={"model_type": vision_type, **TINY_VISION[vision_type]},
                      text_config=text, projection_dim=16)


@pytest.mark.parametrize("vision_type,text_type", list(itertools.product(TINY_VISION, TINY_TEXT)))
def test_every_tower_combination_embeds_scores_and_trains(vision_type, text_type):
    torch.manual_seed(0)
    config = tiny_config(vision_type, text_type)
    model = MCADModel(config)
    size = config.vision_config.image_size
    pixel_values = torch.randn(4, 3, size, size)
    input_ids = torch.randint(5, VOCAB, (4, 7))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 5:] = 0

    model.eval()
    out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, return_loss=True)
    assert out.logits_per_image.shape == (4, 4) and out.image_embeds.shape == (4, 16)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(4))
    # Logits are the scaled cosine similarities of the get_*_features embeddings.
    image_features = F.normalize(model.get_image_features(pixel_values).pooler_output, dim=-1)
    text_features = F.normalize(model.get_text_features(input_ids, attention_mask=attention_mask).pooler_output,
                                dim=-1)
    torch.testing.assert_close(out.logits_per_image, model.logit_scale.exp() * image_features @ text_features.t())
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.t())

    # A few optimisation steps on these four pairs lower the contrastive loss: gradients reach both towers.
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                     return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_contrastive_loss_is_symmetric_cross_entropy():
    model = MCADModel(tiny_config("vit", "bert")).eval()
    pixel_values, input_ids = torch.randn(3, 3, 32, 32), torch.randint(5, VOCAB, (3, 6))
    out = model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True)
    targets = torch.arange(3)
    expected = (F.cross_entropy(out.logits_per_image, targets) + F.cross_entropy(out.logits_per_text, targets)) / 2
    torch.testing.assert_close(out.loss, expected)


def test_single_modality_forward_puts_its_embedding_first():
    model = MCADModel(tiny_config("vit", "bert")).eval()
    image_only = model(pixel_values=torch.randn(2, 3, 32, 32))
    text_only = model(input_ids=torch.randint(5, VOCAB, (2, 6)))
    assert image_only[0] is image_only.image_embeds and image_only.logits_per_image is None
    assert text_only[0] is text_only.text_embeds and text_only.text_embeds.shape == (2, 16)
    as_tuple = model(pixel_values=torch.randn(2, 3, 32, 32), return_dict=False)
    assert as_tuple[0].shape == (2, 16)


def test_logit_scale_starts_at_config_value():
    model = MCADModel(MCADConfig.from_preset("tiny", logit_scale_init_value=1.5))
    assert model.logit_scale.item() == pytest.approx(1.5)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_offline_and_fit_their_processor(name):
    model = MCADModel.from_preset(name).eval()
    processor = MCADProcessor.from_preset(name)
    assert model.config.text_config.vocab_size == len(processor.tokenizer) == len(PRESET_VOCABULARY)
    inputs = processor(images=random_images(2), text=["a small red circle left of a blue square", "a star"],
                       return_tensors="pt", padding=True)
    size = PRESETS[name]["vision_config"]["image_size"]
    assert inputs["pixel_values"].shape == (2, 3, size, size)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits_per_image.shape == (2, 2)


def test_mobile_preset_is_a_tenth_of_clip_vit_b32():
    parameters = sum(p.numel() for p in MCADModel.from_preset("mobile").parameters())
    assert parameters < 151_000_000 / 10


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        MCADModel.from_preset("huge")
    with pytest.raises(ValueError, match="choose one of"):
        MCADProcessor.from_preset("huge")


def test_preset_tokenizer_knows_caption_words_and_falls_back_to_characters():
    tokenizer = MCADProcessor.from_preset("tiny").tokenizer
    tokens = tokenizer.tokenize("A large Purple triangle above a small cyan star")
    assert tokens == ["a", "large", "purple", "triangle", "above", "a", "small", "cyan", "star"]
    assert tokenizer.unk_token not in tokenizer.tokenize("zyxwv qrst")  # unknown words split into characters


# Bad input: a ValueError that names the input and the fix.

def test_unsupported_tower_type_is_refused():
    with pytest.raises(ValueError, match="vision_config has model_type 'swin'.*Use one of"):
        MCADConfig(vision_config={"model_type": "swin"})
    with pytest.raises(ValueError, match="text_config has model_type 'gpt2'.*Use one of"):
        MCADConfig(text_config={"model_type": "gpt2"})


def test_missing_inputs_are_refused():
    model = MCADModel.from_preset("tiny")
    with pytest.raises(ValueError, match="needs `input_ids`, `pixel_values`"):
        model()
    with pytest.raises(ValueError, match="return_loss=True needs both"):
        model(pixel_values=torch.randn(1, 3, 32, 32), return_loss=True)


@pytest.mark.parametrize("shape", [(2, 3, 48, 48), (2, 1, 32, 32), (3, 32, 32)])
def test_wrong_image_size_or_channels_is_refused(shape):
    model = MCADModel.from_preset("tiny")
    with pytest.raises(ValueError, match=r"pixel_values has shape .* expects \(batch_size, 3, 32, 32\).*processor"):
        model(pixel_values=torch.randn(*shape))


def test_text_beyond_position_limit_is_refused_by_model_and_processor():
    model = MCADModel.from_preset("tiny")
    processor = MCADProcessor.from_preset("tiny")
    with pytest.raises(ValueError, match="at most 32; call the processor with truncation=True"):
        model(input_ids=torch.randint(5, 100, (1, 33)))
    long_text = " ".join(["circle"] * 60)
    with pytest.raises(ValueError, match=r"text\[1\] is 62 tokens long.*truncation=True"):
        processor(text=["a star", long_text], padding=True)
    truncated = processor(text=["a star", long_text], padding=True, truncation=True, return_tensors="pt")
    assert truncated["input_ids"].shape == (2, 32)
    model(**truncated)  # fits the model


def test_token_ids_outside_vocabulary_are_refused():
    model = MCADModel.from_preset("tiny")
    with pytest.raises(ValueError, match="outside the vocabulary.*processor saved with it"):
        model(input_ids=torch.tensor([[2, 5000, 3]]))


def test_non_string_text_is_refused_by_processor():
    with pytest.raises(ValueError, match="text must be a string or a list of strings"):
        MCADProcessor.from_preset("tiny")(text=["a star", 3])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_processor_converts_image_modes_to_three_channels(mode):
    processor = MCADProcessor.from_preset("tiny")
    pixel_values = processor(images=random_images(1, mode=mode), return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32)


# --- the transformers 5 CLIP API ------------------------------------------------------------------------------------


def test_get_features_return_tower_outputs_with_the_projection_as_pooler_output():
    torch.manual_seed(0)
    model, processor = MCADModel.from_preset("tiny").eval(), MCADProcessor.from_preset("tiny")
    model.set_attn_implementation("eager")  # SDPA computes no attention weights to return
    inputs = processor(images=random_images(2), text=["a red circle", "a blue square left of a star"],
                       return_tensors="pt", padding=True)
    layers = model.config.text_config.num_hidden_layers
    with torch.no_grad():
        text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"], output_hidden_states=True,
                                       output_attentions=True)
        image = model.get_image_features(inputs["pixel_values"], output_hidden_states=True)
        joint = model(**inputs, output_hidden_states=True)
        as_tuple = model.get_image_features(inputs["pixel_values"], return_dict=False)
    assert text.pooler_output.shape == image.pooler_output.shape == (2, model.config.projection_dim)
    assert len(text.hidden_states) == layers + 1 and len(text.attentions) == layers
    assert len(image.hidden_states) == model.config.vision_config.num_hidden_layers + 1 and not image.attentions
    torch.testing.assert_close(joint.text_embeds, F.normalize(text.pooler_output, dim=-1))
    torch.testing.assert_close(joint.image_embeds, F.normalize(image.pooler_output, dim=-1))
    assert len(joint.vision_model_output.hidden_states) == len(image.hidden_states)
    torch.testing.assert_close(as_tuple[1], image.pooler_output)  # (last_hidden_state, pooler_output, ...)


def test_interpolate_pos_encoding_takes_images_of_another_size():
    torch.manual_seed(0)
    model = MCADModel.from_preset("tiny").eval()
    native, larger = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"expects \(batch_size, 3, 32, 32\)"):
            model.get_image_features(larger)
        assert model.get_image_features(larger, interpolate_pos_encoding=True).pooler_output.shape == (2, 32)
        torch.testing.assert_close(model.get_image_features(native, interpolate_pos_encoding=True).pooler_output,
                                   model.get_image_features(native).pooler_output)
    convolutional = MCADModel(tiny_config("mobilevit", "bert"))
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True needs .* this one is 'mobilevit'"):
        convolutional.get_image_features(torch.randn(1, 3, 64, 64), interpolate_pos_encoding=True)


@pytest.mark.parametrize("vision_type,text_type", [("clip_vision_model", "clip_text_model"), ("vit", "bert")])
def test_gradient_checkpointing_trains_exactly_as_without(vision_type, text_type):
    """With checkpointing every layer runs its forward again in the backward pass; the weights end up the same."""
    torch.manual_seed(0)
    reference = MCADModel(tiny_config(vision_type, text_type))
    checkpointed = MCADModel(tiny_config(vision_type, text_type))
    checkpointed.load_state_dict(reference.state_dict())
    checkpointed.activation_checkpointing_enable()  # transformers 5's name for gradient_checkpointing_enable
    assert checkpointed.is_activation_checkpointing and not reference.is_activation_checkpointing
    size = reference.config.vision_config.image_size
    pixel_values, input_ids = torch.randn(4, 3, size, size), torch.randint(5, VOCAB, (4, 7))
    layer_runs = {"reference": 0, "checkpointed": 0}
    for name, model in (("reference", reference), ("checkpointed", checkpointed)):
        # Hooks on a checkpointed layer stay outside the checkpoint: count runs of a module inside it.
        first_layer = next(module for module in model.text_model.modules()
                           if isinstance(module, GradientCheckpointingLayer))

        def count(*_, name=name):
            layer_runs[name] += 1

        next(first_layer.children()).register_forward_hook(count)
        # Plain SGD: Adam turns rounding-level gradient differences of near-zero gradients into whole steps.
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model.train()
        torch.manual_seed(1)  # the same dropout masks (BERT's): the recomputation replays the forward's
        for _ in range(3):
            loss = model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert layer_runs == {"reference": 3, "checkpointed": 6}
    for (name, expected), actual in zip(reference.state_dict().items(), checkpointed.state_dict().values()):
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_saved_config_names_clip_and_reads_back_as_itself(name, tmp_path):
    config = MCADConfig.from_preset(name)
    saved = config.to_dict()
    assert (saved["model_type"], saved["architectures"]) == ("clip", ["CLIPModel"])
    for read in (MCADConfig.from_dict(saved), MCADConfig(**saved)):
        assert read.model_type == "mcad" and read.to_dict() == saved
    config.save_pretrained(tmp_path)  # adds auto_map, for trust_remote_code
    reloaded = MCADConfig.from_pretrained(tmp_path)
    assert reloaded.model_type == "mcad" and {k: v for k, v in reloaded.to_dict().items() if k != "auto_map"} == saved
