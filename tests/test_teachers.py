"""The teachers: dual and fusion wrappers, the modified teacher, the adapter fit, save/load, freezing.

Every teacher is a tiny random config of the real transformers class (CLIPModel, SiglipModel,
BlipForImageTextRetrieval, ViltForImageAndTextRetrieval, MCADFusionModel) with a processor built offline, saved to a
local folder where a path is needed.
"""

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModel,
    BertTokenizer,
    BlipConfig,
    BlipForImageTextRetrieval,
    BlipProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    SiglipConfig,
    SiglipModel,
    SiglipProcessor,
    SiglipTokenizer,
    ViltConfig,
    ViltForImageAndTextRetrieval,
    ViltProcessor,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.models.vilt.image_processing_pil_vilt import ViltImageProcessorPil

from modeling_mcad import MCADModel, MCADProcessor
from modeling_mcad.adapter import AdapterFeatures, adapter_contrastive_logits, compute_adapter_features, fit_adapter
from modeling_mcad.configuration_mcad import PRESET_VOCABULARY
from modeling_mcad.cross_encoders import (
    CROSS_ENCODERS,
    BlipCrossEncoder,
    FusionOutput,
    ViltCrossEncoder,
    cross_encoder_class,
)
from modeling_mcad.fusion_model import MCADFusionConfig, MCADFusionCrossEncoder, MCADFusionModel
from modeling_mcad.objectives import ObjectiveSettings, modified_features, modified_similarity, top_k_candidates
from modeling_mcad.teachers import MCADTeacher

from .conftest import random_images, run_isolated

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "star", "triangle"]
CAPTIONS = [f"a {c} {s} left of a {d} {t}" for c, s, d, t in itertools.product(COLOURS, SHAPES, COLOURS[::-1], SHAPES)]
TINY_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
# The knobs of the modified teacher (the objective's, passed to the teacher's forward).
SETTINGS = ObjectiveSettings(alpha=0.5, beta=0.3, top_k=2, teacher_temperature=0.1, fusion_temperature=2.0)


# --- Tiny teachers with offline processors ---------------------------------------------------------------------------


def tiny_clip() -> tuple[CLIPModel, CLIPProcessor]:
    """CLIPModel (32 px, d_T = 24) and a character-level CLIP BPE tokenizer."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for character in "abcdefghijklmnopqrstuvwxyz":
        vocab[character] = len(vocab)
        vocab[character + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        vision_config={**TINY_TOWER, "image_size": 32, "patch_size": 8},
        text_config={**TINY_TOWER, "vocab_size": len(vocab), "max_position_embeddings": 64,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        projection_dim=24,
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPModel(config).eval(), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_siglip(folder: Path) -> tuple[SiglipModel, SiglipProcessor]:
    """SiglipModel (32 px, d_T = 32) and a SentencePiece SigLIP tokenizer trained offline on the captions."""
    import sentencepiece

    corpus = folder / "captions.txt"
    corpus.write_text("\n".join(CAPTIONS))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=40, hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    tokenizer = SiglipTokenizer(vocab_file=str(folder / "spiece.model"))
    config = SiglipConfig(
        vision_config={**TINY_TOWER, "image_size": 32, "patch_size": 8},
        text_config={**TINY_TOWER, "vocab_size": len(tokenizer), "max_position_embeddings": 64,
                     "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None},
    )
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    return SiglipModel(config).eval(), SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_blip(vision_width: int = 32) -> tuple[BlipForImageTextRetrieval, BlipProcessor]:
    """BlipForImageTextRetrieval (48 px: not the dual teacher's size, d_F = 40) and a WordPiece BERT tokenizer."""
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(PRESET_VOCABULARY)})
    config = BlipConfig(
        vision_config={**TINY_TOWER, "hidden_size": vision_width, "image_size": 48, "patch_size": 16},
        text_config={**TINY_TOWER, "hidden_size": 40, "encoder_hidden_size": vision_width,
                     "vocab_size": len(PRESET_VOCABULARY), "max_position_embeddings": 32,
                     "pad_token_id": 0, "bos_token_id": 2, "sep_token_id": 3, "eos_token_id": 3},
        image_text_hidden_size=16,
    )
    image_processor = BlipImageProcessorPil(size={"height": 48, "width": 48})
    return BlipForImageTextRetrieval(config).eval(), BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_vilt(image_size: int = 32) -> tuple[ViltForImageAndTextRetrieval, ViltProcessor]:
    """ViltForImageAndTextRetrieval (one joint stack over text and 16 patch tokens of 8 px, d_F = 32)."""
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(PRESET_VOCABULARY)})
    config = ViltConfig(**TINY_TOWER, vocab_size=len(PRESET_VOCABULARY), max_position_embeddings=32,
                        image_size=image_size, patch_size=8)
    image_processor = ViltImageProcessorPil(size={"shortest_edge": image_size}, size_divisor=8)
    return ViltForImageAndTextRetrieval(config).eval(), ViltProcessor(image_processor=image_processor,
                                                                      tokenizer=tokenizer)


@pytest.fixture(scope="module")
def teacher_folders(tmp_path_factory):
    """Each tiny teacher and its processor saved with save_pretrained, as a user's local checkpoints would be."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("teachers")
    folders = {}
    for name, (model, processor) in {"clip": tiny_clip(), "siglip": tiny_siglip(root), "blip": tiny_blip()}.items():
        folders[name] = root / name
        model.save_pretrained(folders[name])
        processor.save_pretrained(folders[name])
    return folders


@pytest.fixture(scope="module")
def teacher(teacher_folders):
    torch.manual_seed(0)
    return MCADTeacher.from_teachers(teacher_folders["clip"], teacher_folders["blip"], adapter_objective="regression")


def collate(teacher, images, captions) -> dict:
    """What the data collator does: each teacher's inputs from the same raw images and captions."""
    return {name: processor(images=images, text=captions, return_tensors="pt", padding=True)
            for name, processor in teacher.processors.items()}


@pytest.fixture(scope="module")
def batch(teacher):
    return collate(teacher, random_images(12, seed=1), CAPTIONS[:12])


# --- Loading, processors, saving -----------------------------------------------------------------------------------


def test_from_local_paths_loads_each_teacher_with_its_own_processor(teacher, teacher_folders, batch):
    assert isinstance(teacher.dual, CLIPModel) and isinstance(teacher.fusion, BlipCrossEncoder)
    assert isinstance(teacher.fusion.model, BlipForImageTextRetrieval)
    assert isinstance(teacher.processors["dual"], CLIPProcessor)
    assert isinstance(teacher.processors["fusion"], BlipProcessor)
    # Same raw images, each model's own size and tokenizer.
    assert batch["dual"]["pixel_values"].shape[-2:] == (32, 32)
    assert batch["fusion"]["pixel_values"].shape[-2:] == (48, 48)
    assert not torch.equal(batch["dual"]["input_ids"][:, :3], batch["fusion"]["input_ids"][:, :3])
    # The checkpoint's weights, not a fresh initialisation.
    saved = CLIPModel.from_pretrained(teacher_folders["clip"]).state_dict()
    assert all(torch.equal(saved[key], value) for key, value in teacher.dual.state_dict().items())
    config = teacher.config
    assert (config.teacher_dim, config.fusion_image_dim, config.fusion_text_dim) == (24, 40, 40)
    assert config.adapter_objective == "regression" and config.adapter_fit is None


def test_from_instances_keeps_their_weights_and_finds_processors_by_name_or_path(teacher_folders):
    dual = SiglipModel.from_pretrained(teacher_folders["siglip"])
    fusion, fusion_processor = tiny_blip()
    before = {key: value.clone() for key, value in {**dual.state_dict(), **fusion.state_dict()}.items()}
    wrapped = MCADTeacher.from_teachers(dual, fusion, fusion_processor=fusion_processor)
    after = {**wrapped.dual.state_dict(), **wrapped.fusion.model.state_dict()}
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert isinstance(wrapped.processors["dual"], SiglipProcessor)  # loaded from dual.name_or_path
    assert wrapped.processors["fusion"] is fusion_processor
    # A fresh instance has no name_or_path: its processor must be passed.
    with pytest.raises(ValueError, match="fusion_processor="):
        MCADTeacher.from_teachers(dual, fusion)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="alpha.*the objective's"):  # the knobs have one home: the objective
        MCADTeacher.from_teachers("unused", "unused", alpha=1.0)
    with pytest.raises(ValueError, match="adapter_objective"):
        MCADTeacher.config_class(adapter_objective="contrastive")
    with pytest.raises(ValueError, match="beta"):
        ObjectiveSettings(beta=1.5)
    with pytest.raises(ValueError, match="register_cross_encoder.*modeling_mcad.fusion_model"):
        cross_encoder_class("mcad_fusion_unknown")
    with pytest.raises(ValueError, match="register_cross_encoder"):
        cross_encoder_class("clip")
    model, _ = tiny_clip()
    with pytest.raises(ValueError, match="BlipForImageTextRetrieval"):
        BlipCrossEncoder(model)


def test_save_and_load_round_trip_the_whole_teacher(teacher, batch, tmp_path):
    with torch.no_grad():
        teacher.adapter.image_projection.weight.normal_()  # as if fitted: the adapter must round-trip too
    folder = tmp_path / "teacher"
    teacher.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    teacher.save_pretrained(folder)  # an earlier teacher save may be replaced
    loaded = MCADTeacher.from_pretrained(folder)
    assert type(AutoModel.from_pretrained(folder)) is MCADTeacher  # the auto classes know the teacher
    assert loaded.config.adapter_objective == "regression"
    assert isinstance(loaded.processors["dual"], CLIPProcessor)
    assert loaded.processors["fusion"].image_processor.size.height == 48
    for key, value in teacher.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    expected = teacher.targets(batch["dual"], batch["fusion"], SETTINGS)
    got = loaded.targets(batch["dual"], batch["fusion"], SETTINGS)
    for key in ("modified_image_embeds", "modified_text_embeds", "similarity", "fusion_logits"):
        torch.testing.assert_close(got[key], expected[key])
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_a_saved_teacher_loads_with_its_own_code_where_the_package_is_absent(teacher, batch, tmp_path):
    with torch.no_grad():
        teacher.adapter.image_projection.weight.normal_()  # as if fitted
    folder = tmp_path / "teacher"
    teacher.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "teachers.MCADTeacherConfig", "AutoModel": "teachers.MCADTeacher"}
    torch.save({name: batch[name]["pixel_values"] for name in ("dual", "fusion")}, tmp_path / "pixels.pt")
    result = run_isolated(
        f"""
        import json, torch
        from transformers import AutoModel
        teacher = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        pixels = torch.load({str(tmp_path / "pixels.pt")!r})
        print(json.dumps({{"class": type(teacher).__module__ + "." + type(teacher).__name__,
                          "processors": sorted(type(p).__name__ for p in teacher.processors.values()),
                          "frozen": not teacher.training and not any(p.requires_grad for p in teacher.parameters()),
                          "adapter": teacher.adapter.image_projection.weight.tolist(),
                          "images": teacher.encode_images(pixels["dual"]).tolist()}}))
        """,
        tmp_path,
    )
    assert result["class"].startswith("transformers_modules.") and result["class"].endswith("teachers.MCADTeacher")
    assert result["processors"] == ["BlipProcessor", "CLIPProcessor"] and result["frozen"]
    torch.testing.assert_close(torch.tensor(result["adapter"]), teacher.adapter.image_projection.weight)
    torch.testing.assert_close(torch.tensor(result["images"]), teacher.encode_images(batch["dual"]["pixel_values"]))


def test_save_refuses_to_replace_a_folder_of_other_files(teacher, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="new or empty folder"):
        teacher.save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


# --- The dual teacher ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dual_name", ["clip", "siglip"])
def test_dual_embeddings_are_the_models_normalised_features(teacher_folders, dual_name):
    wrapped = MCADTeacher.from_teachers(teacher_folders[dual_name], teacher_folders["blip"])
    inputs = wrapped.processors["dual"](images=random_images(3), text=CAPTIONS[:3], return_tensors="pt", padding=True)
    images = wrapped.encode_images(inputs["pixel_values"])
    texts = wrapped.encode_texts(inputs["input_ids"], inputs["attention_mask"])
    model = {"clip": CLIPModel, "siglip": SiglipModel}[dual_name].from_pretrained(teacher_folders[dual_name])
    with torch.no_grad():
        expected_images = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        expected_texts = model.get_text_features(input_ids=inputs["input_ids"],
                                                 attention_mask=inputs["attention_mask"]).pooler_output
    torch.testing.assert_close(images, F.normalize(expected_images, dim=-1))
    torch.testing.assert_close(texts, F.normalize(expected_texts, dim=-1))
    assert images.shape == (3, wrapped.config.teacher_dim)
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(3))


class _TensorFeaturesStudent(MCADModel):
    """A dual model whose get_*_features return the projected tensor itself, as transformers 4.x's CLIPModel did."""

    def get_text_features(self, *args, **kwargs):
        return super().get_text_features(*args, **kwargs).pooler_output

    def get_image_features(self, *args, **kwargs):
        return super().get_image_features(*args, **kwargs).pooler_output


def test_a_dual_teacher_returning_plain_tensors_works_too(teacher_folders):
    """Models whose get_*_features return tensors (transformers 4.x style) are dual teachers as well."""
    student, student_processor = MCADModel.from_preset("tiny"), MCADProcessor.from_preset("tiny")
    plain = _TensorFeaturesStudent(student.config)
    plain.load_state_dict(student.state_dict())
    wrapped = MCADTeacher.from_teachers(plain, teacher_folders["blip"], dual_processor=student_processor)
    inputs = student_processor(images=random_images(2), text=CAPTIONS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = F.normalize(student.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output,
                               dim=-1)
    torch.testing.assert_close(wrapped.encode_texts(inputs["input_ids"], inputs["attention_mask"]), expected)
    assert wrapped.config.teacher_dim == student.config.projection_dim


# --- The fusion teacher --------------------------------------------------------------------------------------------


def test_fuse_reproduces_blip_itm_head_and_encodes_each_image_once(teacher, batch):
    inputs = batch["fusion"]
    blip = teacher.fusion.model
    with torch.no_grad():
        reference = blip(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                         attention_mask=inputs["attention_mask"], use_itm_head=True)
    fused = teacher.fuse(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(fused.match_logits, reference.itm_score[:, 1] - reference.itm_score[:, 0])
    torch.testing.assert_close(fused.fused, reference.question_embeds[:, 0])

    # Arbitrary pairs: image 0 with three texts, image 5 with one; the vision encoder sees each image once.
    encoded = []
    hook = blip.vision_model.register_forward_hook(lambda module, args, output: encoded.append(len(output[0])))
    pairs = torch.tensor([[0, 0], [0, 4], [0, 7], [5, 2]])
    try:
        scored = teacher.fuse(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], pairs=pairs)
    finally:
        hook.remove()
    assert encoded == [len(inputs["pixel_values"])]  # one vision pass over the batch's images
    for row, (image, text) in enumerate(pairs.tolist()):
        with torch.no_grad():
            single = blip(input_ids=inputs["input_ids"][text:text + 1],
                          pixel_values=inputs["pixel_values"][image:image + 1],
                          attention_mask=inputs["attention_mask"][text:text + 1])
        torch.testing.assert_close(scored.match_logits[row], single.itm_score[0, 1] - single.itm_score[0, 0])
        torch.testing.assert_close(scored.fused[row], single.question_embeds[0, 0])


def test_vilt_adapter_reproduces_its_ranking_score_for_any_pairs(teacher_folders):
    """The single-stream ViLT: f is the pooled state its ranking head reads, m the head's score; images resized to
    another size than the model's get their position embeddings interpolated, as in ViLT's own forward."""
    vilt, processor = tiny_vilt()
    captions = CAPTIONS[:3]
    images = random_images(2, seed=5)
    for size in ({"shortest_edge": 32}, {"shortest_edge": 48}):  # 32x32 and 48x56 pixels
        inputs = processor(images=images, text=captions, return_tensors="pt", padding=True, size=size)
        pairs = torch.tensor([[0, 0], [1, 0], [1, 2], [0, 1]])
        scored = ViltCrossEncoder(vilt)(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"],
                                        pairs=pairs)
        for row, (image, text) in enumerate(pairs.tolist()):
            with torch.no_grad():
                single = vilt.vilt(input_ids=inputs["input_ids"][text:text + 1],
                                   attention_mask=inputs["attention_mask"][text:text + 1],
                                   pixel_values=inputs["pixel_values"][image:image + 1],
                                   pixel_mask=inputs["pixel_mask"][image:image + 1])
            torch.testing.assert_close(scored.fused[row], single.pooler_output[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(scored.match_logits[row], vilt.rank_output(single.pooler_output)[0, 0],
                                       atol=1e-5, rtol=1e-4)
    # As MCAD's fusion teacher: the adapter reads d_F = ViLT's width, and the whole teacher round-trips.
    wrapped = MCADTeacher.from_teachers(teacher_folders["clip"], vilt, fusion_processor=processor)
    assert wrapped.adapter.image_projection.in_features == vilt.config.hidden_size
    batch = collate(wrapped, random_images(3, seed=6), CAPTIONS[:3])
    expected = wrapped.targets(batch["dual"], batch["fusion"], SETTINGS)
    folder = Path(teacher_folders["clip"]).parent / "vilt_teacher"
    wrapped.save_pretrained(folder)
    loaded = MCADTeacher.from_pretrained(folder)
    assert isinstance(loaded.fusion, ViltCrossEncoder)
    torch.testing.assert_close(loaded.targets(batch["dual"], batch["fusion"], SETTINGS).modified_image_embeds,
                               expected.modified_image_embeds)


def test_mcad_fusion_model_scores_any_pairs_over_a_copy_of_the_dual_teacher(tmp_path):
    """The shapes fusion teacher: its unimodal encoders are a copy of the dual teacher (not shared), m = head(f) +
    w·<v, t> + the relation readout, the adapter scores any pairs as the model's own forward, and the whole MCAD
    teacher round-trips through save_pretrained / from_pretrained (AutoConfig knows "mcad_fusion")."""
    clip, processor = tiny_clip()
    torch.manual_seed(0)
    fusion = MCADFusionModel.from_dual_teacher(clip, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    assert fusion.config.relation_layer == 1 and fusion.config.unimodal_config.projection_dim == 24
    for (name, copied), original in zip(fusion.unimodal.state_dict().items(), clip.state_dict().values()):
        assert torch.equal(copied, original) and copied.data_ptr() != original.data_ptr(), name
    fusion.eval()
    inputs = processor(images=random_images(3, seed=7), text=CAPTIONS[:4], return_tensors="pt", padding=True)
    pairs = torch.tensor([[0, 0], [2, 3], [1, 1], [2, 0]])
    scored = MCADFusionCrossEncoder(fusion)(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"],
                                            pairs=pairs)
    with torch.no_grad():
        single = fusion(pixel_values=inputs["pixel_values"][pairs[:, 0]], input_ids=inputs["input_ids"][pairs[:, 1]],
                        attention_mask=inputs["attention_mask"][pairs[:, 1]])
        similarity = (clip.get_image_features(pixel_values=inputs["pixel_values"][pairs[:, 0]]).pooler_output,
                      clip.get_text_features(input_ids=inputs["input_ids"][pairs[:, 1]],
                                             attention_mask=inputs["attention_mask"][pairs[:, 1]]).pooler_output)
        cosine = F.cosine_similarity(*similarity)
        head = fusion.match_head(single.fused).squeeze(-1)
    torch.testing.assert_close(scored.match_logits, single.match_logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scored.fused, single.fused, atol=1e-5, rtol=1e-4)
    fusion.config.relation_readout = False  # off, m is the fused head plus the weighted CLIP similarity ...
    with torch.no_grad():
        plain = fusion(pixel_values=inputs["pixel_values"][pairs[:, 0]], input_ids=inputs["input_ids"][pairs[:, 1]],
                       attention_mask=inputs["attention_mask"][pairs[:, 1]]).match_logits
    fusion.config.relation_readout = True
    torch.testing.assert_close(plain, head + fusion.contrastive_weight * cosine, atol=1e-5, rtol=1e-4)
    # ... on (the default), Σ_tokens gate(word state) · relation_head(state after relation_layer) is added.
    with torch.no_grad():
        text_states, _ = fusion.text_states(inputs["input_ids"][pairs[:, 1]], inputs["attention_mask"][pairs[:, 1]])
        gate = fusion.readout_gate(fusion.text_projection(text_states)).squeeze(-1)
        order = fusion.relation_head(single.relation_states).squeeze(-1)
    readout = (gate * order * inputs["attention_mask"][pairs[:, 1]]).sum(-1)
    assert readout.abs().min() > 1e-4
    torch.testing.assert_close(single.match_logits - plain, readout, atol=1e-5, rtol=1e-4)

    teacher = MCADTeacher.from_teachers(clip, fusion, dual_processor=processor, fusion_processor=processor)
    assert teacher.adapter.image_projection.in_features == 32
    batch = collate(teacher, random_images(3, seed=8), CAPTIONS[:3])
    expected = teacher.fuse(batch["fusion"]["pixel_values"], batch["fusion"]["input_ids"],
                            batch["fusion"]["attention_mask"])
    teacher.save_pretrained(tmp_path / "fusion_teacher")
    loaded = MCADTeacher.from_pretrained(tmp_path / "fusion_teacher")
    assert isinstance(loaded.fusion, MCADFusionCrossEncoder)
    # The folder carries fusion_model.py with the teacher's code: it loads where the package is absent.
    assert (tmp_path / "fusion_teacher" / "fusion_model.py").is_file()
    torch.save(dict(batch["fusion"]), tmp_path / "fusion_inputs.pt")
    result = run_isolated(
        f"""
        import json, torch
        from transformers import AutoModel
        teacher = AutoModel.from_pretrained({str(tmp_path / "fusion_teacher")!r}, trust_remote_code=True)
        inputs = torch.load({str(tmp_path / "fusion_inputs.pt")!r})
        fused = teacher.fuse(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
        print(json.dumps({{"fusion": type(teacher.fusion).__module__ + "." + type(teacher.fusion).__name__,
                          "match_logits": fused.match_logits.tolist()}}))
        """,
        tmp_path,
    )
    assert result["fusion"].startswith("transformers_modules.")
    assert result["fusion"].endswith("fusion_model.MCADFusionCrossEncoder")
    torch.testing.assert_close(torch.tensor(result["match_logits"]), expected.match_logits)
    again = loaded.fuse(batch["fusion"]["pixel_values"], batch["fusion"]["input_ids"],
                        batch["fusion"]["attention_mask"])
    torch.testing.assert_close(again.match_logits, expected.match_logits)
    with pytest.raises(ValueError, match="CLIPModel"):
        MCADFusionModel.from_dual_teacher(tiny_vilt()[0])
    with pytest.raises(ValueError, match="relation_layer"):
        MCADFusionConfig(unimodal_config=clip.config.to_dict(), num_hidden_layers=2, relation_layer=3)
    with pytest.raises(ValueError, match="exactly one of pixel_values and image_states"):
        fusion(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="one image per caption"):
        fusion(pixel_values=inputs["pixel_values"][:2], input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="num_attention_heads must be >= 1"):
        MCADFusionConfig(unimodal_config=clip.config.to_dict(), num_attention_heads=0)


def test_a_cross_encoder_with_separate_image_and_text_parts_plugs_in(teacher_folders, batch, monkeypatch):
    """One adapter class is all another ITM model needs; P_v reads the image part, P_t the text part."""

    class SplitBlipCrossEncoder(BlipCrossEncoder):
        @property
        def fused_dims(self):
            return self.model.config.vision_config.hidden_size, self.model.config.text_config.hidden_size

        def score_pairs(self, image_states, input_ids, attention_mask):
            output = super().score_pairs(image_states, input_ids, attention_mask)
            return FusionOutput(match_logits=output.match_logits, fused=output.fused,
                                fused_image=image_states.mean(dim=1), fused_text=output.fused)

    monkeypatch.setitem(CROSS_ENCODERS, "blip", SplitBlipCrossEncoder)
    fusion, fusion_processor = tiny_blip(vision_width=16)
    wrapped = MCADTeacher.from_teachers(teacher_folders["clip"], fusion, fusion_processor=fusion_processor)
    assert wrapped.adapter.image_projection.in_features == 16 and wrapped.adapter.text_projection.in_features == 40
    inputs = collate(wrapped, random_images(4, seed=3), CAPTIONS[:4])
    targets = wrapped.targets(inputs["dual"], inputs["fusion"], ObjectiveSettings(alpha=1.0))
    parts = wrapped.fuse(**{key: inputs["fusion"][key] for key in ("pixel_values", "input_ids", "attention_mask")})
    with torch.no_grad():
        torch.testing.assert_close(targets.adapted_image_embeds, wrapped.adapter.image_projection(parts.fused_image))
        torch.testing.assert_close(targets.adapted_text_embeds, wrapped.adapter.text_projection(parts.fused_text))


# --- The modified teacher ------------------------------------------------------------------------------------------


def test_alpha_zero_and_beta_zero_give_the_dual_teacher_exactly(teacher, batch):
    dual_settings = ObjectiveSettings(alpha=0.0, beta=0.0, teacher_temperature=0.1)
    targets = teacher.targets(batch["dual"], batch["fusion"], dual_settings)
    v = teacher.encode_images(batch["dual"]["pixel_values"])
    t = teacher.encode_texts(batch["dual"]["input_ids"], batch["dual"]["attention_mask"])
    assert torch.equal(targets.modified_image_embeds, v) and torch.equal(targets.modified_text_embeds, t)
    assert torch.equal(targets.similarity, v @ t.t() / 0.1)
    assert targets.fusion_logits is None and targets.fusion_mask is None
    dual_only = teacher.targets(batch["dual"], settings=dual_settings)  # no fusion inputs needed then
    assert torch.equal(dual_only.similarity, targets.similarity)


def test_modified_features_follow_the_formula(teacher, batch):
    alpha = 0.7
    targets = teacher.targets(batch["dual"], batch["fusion"], ObjectiveSettings(alpha=alpha, teacher_temperature=0.1))
    fused = teacher.fuse(**{key: batch["fusion"][key] for key in ("pixel_values", "input_ids", "attention_mask")})
    with torch.no_grad():
        p_v = teacher.adapter.image_projection(fused.fused)
        p_t = teacher.adapter.text_projection(fused.fused)
    v, t = targets.image_embeds, targets.text_embeds
    v_hat = F.normalize(v + alpha * F.normalize(p_v, dim=-1), dim=-1)
    t_hat = F.normalize(t + alpha * F.normalize(p_t, dim=-1), dim=-1)
    torch.testing.assert_close(targets.adapted_image_embeds, p_v)
    torch.testing.assert_close(targets.modified_image_embeds, v_hat)
    torch.testing.assert_close(targets.modified_text_embeds, t_hat)
    torch.testing.assert_close(targets.similarity, v_hat @ t_hat.t() / 0.1)
    # fusion_only: α = ∞ keeps the adapted fused features alone.
    image, text = modified_features(v, t, p_v, p_t, float("inf"))
    torch.testing.assert_close(image, F.normalize(p_v, dim=-1))
    torch.testing.assert_close(text, F.normalize(p_t, dim=-1))


def test_top_k_candidates_by_hand():
    # Dual similarities (images × texts) = v·t with v = identity rows, so t's columns are the similarity matrix.
    similarity = torch.tensor([[0.9, 0.8, 0.1, 0.0],
                               [0.7, 0.2, 0.6, 0.1],
                               [0.0, 0.3, 0.5, 0.4],
                               [0.2, 0.1, 0.0, 0.3]])
    mask = top_k_candidates(torch.eye(4), similarity.t(), k=1)
    rows = {(0, 0), (1, 0), (2, 2), (3, 3)}          # each image's best text
    columns = {(0, 0), (0, 1), (1, 2), (2, 3)}       # each text's best image
    diagonal = {(i, i) for i in range(4)}
    expected = torch.zeros(4, 4, dtype=torch.bool)
    for i, j in rows | columns | diagonal:
        expected[i, j] = True
    assert torch.equal(mask, expected)
    assert torch.equal(top_k_candidates(torch.eye(4), similarity.t(), k=9), torch.ones(4, 4, dtype=torch.bool))


def test_beta_scores_top_k_pairs_only_and_blends_their_logits(teacher, batch):
    images, captions = random_images(16, seed=2), CAPTIONS[:16]
    inputs = collate(teacher, images, captions)
    scored_pairs, encoded_images = [], []
    score_pairs, encode_images = teacher.fusion.score_pairs, teacher.fusion.encode_images
    teacher.fusion.score_pairs = lambda states, ids, mask: scored_pairs.append(len(ids)) or score_pairs(
        states, ids, mask)
    teacher.fusion.encode_images = lambda pixels: encoded_images.append(len(pixels)) or encode_images(pixels)
    try:
        beta, k, batch_size = SETTINGS.beta, SETTINGS.top_k, 16
        targets = teacher.targets(inputs["dual"], inputs["fusion"], SETTINGS)
    finally:
        del teacher.fusion.score_pairs, teacher.fusion.encode_images
    mask = targets.fusion_mask
    assert sum(encoded_images) == batch_size
    assert sum(scored_pairs) == mask.sum().item() <= batch_size * (2 * k + 1) < batch_size**2
    assert torch.equal(mask, top_k_candidates(targets.image_embeds, targets.text_embeds, k))
    # The logits at the mask are the fusion teacher's on exactly those pairs; the rest of Ŝ is untouched.
    pairs = mask.nonzero()
    fused = teacher.fuse(inputs["fusion"]["pixel_values"], inputs["fusion"]["input_ids"],
                         inputs["fusion"]["attention_mask"], pairs=pairs)
    torch.testing.assert_close(targets.fusion_logits[mask], fused.match_logits)
    plain = targets.modified_image_embeds @ targets.modified_text_embeds.t() / SETTINGS.teacher_temperature
    expected = torch.where(mask, (1 - beta) * plain + beta * targets.fusion_logits / SETTINGS.fusion_temperature,
                           plain)
    torch.testing.assert_close(targets.similarity, expected)
    # β changes only Ŝ: the features are those of the β = 0 teacher.
    without_fusion_logits = teacher.targets(inputs["dual"], inputs["fusion"], dataclasses.replace(SETTINGS, beta=0.0))
    torch.testing.assert_close(targets.modified_image_embeds, without_fusion_logits.modified_image_embeds)


def test_targets_refuse_what_they_cannot_compute(teacher, batch):
    with pytest.raises(ValueError, match="fusion_inputs"):
        teacher.targets(batch["dual"], settings=SETTINGS)  # α = 0.5 needs the fusion teacher
    with pytest.raises(ValueError, match="same batch"):
        teacher.targets(batch["dual"], {key: value[:5] for key, value in batch["fusion"].items()})
    with pytest.raises(ValueError, match="pixel_values"):
        teacher.targets({"input_ids": batch["dual"]["input_ids"]}, batch["fusion"])
    with pytest.raises(ValueError, match="fusion_logits"):
        modified_similarity(torch.eye(2), torch.eye(2), 0.1, beta=0.5)


# --- Frozen teachers -----------------------------------------------------------------------------------------------


def test_teachers_are_frozen_and_stay_in_eval_mode_under_a_training_parent(teacher, batch):
    parent = torch.nn.ModuleDict({"teacher": teacher, "student": torch.nn.Linear(2, 2)})
    parent.train()
    assert parent["student"].training
    assert not any(module.training for module in teacher.modules())
    assert not any(parameter.requires_grad for parameter in teacher.parameters())
    targets = teacher.targets(batch["dual"], batch["fusion"], SETTINGS)
    assert not any(value.requires_grad for value in targets.values())
    # With dropout switched on, training mode would make two calls differ; in eval mode they agree.
    dropouts = [module for module in teacher.modules() if isinstance(module, torch.nn.Dropout)]
    assert dropouts
    for module in dropouts:
        module.p = 0.5
    try:
        torch.testing.assert_close(teacher.targets(batch["dual"], batch["fusion"], SETTINGS).similarity,
                                   targets.similarity)
    finally:
        for module in dropouts:
            module.p = 0.0


# --- Fitting the adapter -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def features(teacher):
    """v, t, f of 64 pairs (16 images, 4 captions each), computed once over collated batches."""
    images = random_images(16, seed=4)
    pairs = [(i, CAPTIONS[(i * 4 + j) % len(CAPTIONS)]) for i in range(16) for j in range(4)]
    batches = []
    for start in range(0, len(pairs), 16):
        chunk = pairs[start:start + 16]
        batch = collate(teacher, [images[i] for i, _ in chunk], [caption for _, caption in chunk])
        batches.append({**batch, "image_index": torch.tensor([i for i, _ in chunk])})
    return compute_adapter_features(teacher, batches)


def test_compute_adapter_features_is_one_pass_of_both_teachers(teacher, features):
    assert len(features) == 64 and features.image_ids.tolist() == [i for i in range(16) for _ in range(4)]
    assert features.image_embeds.shape == (64, 24) and features.fused.shape == (64, 40)
    # Captions of one image share its image embedding.
    torch.testing.assert_close(features.image_embeds[0], features.image_embeds[3])
    held_out = features.select(torch.arange(48, 64))
    assert len(held_out) == 16 and torch.equal(held_out.fused, features.fused[48:])


@pytest.fixture(scope="module")
def informative_features(teacher):
    """256 pairs whose fused feature carries both v and t (a random linear mix plus noise), as a cross-encoder's
    feature carries both modalities: something for the adapter to learn, unlike a random teacher's features."""
    generator = torch.Generator().manual_seed(0)
    d_t, d_f = teacher.config.teacher_dim, teacher.config.fusion_image_dim
    v = F.normalize(torch.randn(256, d_t, generator=generator), dim=-1)
    t = F.normalize(torch.randn(256, d_t, generator=generator), dim=-1)
    fused = torch.cat([v, t], dim=1) @ torch.randn(2 * d_t, d_f, generator=generator)
    noise = 0.1 * torch.randn(256, d_f, generator=generator)
    return AdapterFeatures(image_embeds=v, text_embeds=t, fused=fused + noise)


@pytest.mark.parametrize("objective", ["regression", "one_sided", "two_sided"])
def test_each_adapter_objective_lowers_its_loss_and_leaves_the_teacher_frozen(teacher, informative_features, objective):
    adapter_before = {key: value.clone() for key, value in teacher.adapter.state_dict().items()}
    dual_before = teacher.dual.text_projection.weight.clone()
    fit = fit_adapter(teacher, informative_features, ObjectiveSettings(alpha=1.0), objective=objective, steps=120,
                      lr=2e-2, batch_size=32)
    try:
        first, last = sum(fit.losses[:5]) / 5, sum(fit.losses[-5:]) / 5
        assert last < 0.5 * first, (first, last)
        assert fit.objective == objective and len(fit.losses) == 120
        assert teacher.config.adapter_fit == {"objective": objective, "alpha": 1.0, "fusion_only": False,
                                              "teacher_temperature": 0.05}
        if objective != "regression":  # the contrastive fits make the modified teacher retrieve its fitted pairs
            assert fit.modified_recall_at_1 > fit.dual_recall_at_1 + 0.3
        assert not torch.equal(teacher.adapter.image_projection.weight, adapter_before["image_projection.weight"])
        assert torch.equal(teacher.dual.text_projection.weight, dual_before)
        assert not any(parameter.requires_grad for parameter in teacher.parameters())
    finally:
        teacher.adapter.load_state_dict(adapter_before)


def _fused_sides_of_each_score(objective: str, batch: int = 4) -> list[tuple[bool, bool]]:
    """For every score of the objective's score matrices: whether the positive pair's image-part and text-part fused
    features both feed it (by gradient: d score_ij / d f)."""
    torch.manual_seed(0)
    v, t = F.normalize(torch.randn(batch, 6), dim=-1), F.normalize(torch.randn(batch, 6), dim=-1)
    fused_image, fused_text = torch.randn(batch, 5, requires_grad=True), torch.randn(batch, 5, requires_grad=True)
    p_v, p_t = torch.nn.Linear(5, 6, bias=False), torch.nn.Linear(5, 6, bias=False)
    sides = []
    settings = ObjectiveSettings(alpha=1.0, teacher_temperature=0.1)
    for scores in adapter_contrastive_logits(objective, v, t, p_v(fused_image), p_t(fused_text), settings):
        for i, j in itertools.product(range(batch), repeat=2):
            grad_image, grad_text = torch.autograd.grad(scores[i, j], (fused_image, fused_text), retain_graph=True,
                                                        allow_unused=True)
            image_rows = set() if grad_image is None else set(grad_image.abs().sum(1).nonzero().flatten().tolist())
            text_rows = set() if grad_text is None else set(grad_text.abs().sum(1).nonzero().flatten().tolist())
            assert image_rows <= {i} and text_rows <= {j}  # a score reads only its own image's and text's pair
            sides.append((bool(image_rows), bool(text_rows)))
    return sides


def test_one_sided_never_puts_the_fused_feature_on_both_sides_of_a_score():
    one_sided = _fused_sides_of_each_score("one_sided")
    assert not any(image and text for image, text in one_sided)
    assert any(image for image, _ in one_sided) and any(text for _, text in one_sided)  # and does use f
    # The check can fail: two_sided's positive scores read f_i on both sides.
    assert any(image and text for image, text in _fused_sides_of_each_score("two_sided"))


def test_contrastive_fit_needs_alpha(teacher, features):
    with pytest.raises(ValueError, match="alpha"):
        fit_adapter(teacher, features, ObjectiveSettings(alpha=0.0), objective="one_sided", steps=1)


def test_adapter_features_select_keeps_optional_fields():
    features = AdapterFeatures(image_embeds=torch.randn(5, 3), text_embeds=torch.randn(5, 3), fused=torch.randn(5, 4))
    subset = features.select(torch.tensor([True, False, True, False, False]))
    assert len(subset) == 2 and subset.image_ids is None and subset.fused_text is None
    assert torch.equal(subset.image_part(), features.fused[[0, 2]]) and torch.equal(subset.text_part(), subset.fused)
