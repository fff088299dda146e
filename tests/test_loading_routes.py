"""Every route a CLIP user takes to a published student, on a dry-run Hub folder of a trained one: the plain
transformers classes with no custom code, the package's own class through `trust_remote_code`, sentence-transformers,
and transformers.js (the real client, in Node)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import pipeline

from modeling_mcad import MCADConfig, MCADModel, MCADProcessor
from modeling_mcad.hub import PLAIN_ROUTE_MIN_TRANSFORMERS, push_to_hub

from .conftest import random_images, run_isolated

JS_CLIENT = Path(__file__).parent / "js"
# The oldest transformers the card says loads a CLIP student with no custom code, with the libraries of its time.
OLD_TRANSFORMERS_VERSION = "4.57.1"
OLD_TRANSFORMERS = [f"transformers=={OLD_TRANSFORMERS_VERSION}", "huggingface_hub==0.36.0", "tokenizers==0.22.1"]
OLD_TRANSFORMERS_DIR = Path(__file__).parent / ".cache" / f"transformers-{OLD_TRANSFORMERS_VERSION}"


@pytest.fixture(scope="module")
def hub_folder(carded_folder, tmp_path_factory):
    """What `push --dry_run` writes for the trained tiny student, and its card's widget examples."""
    folder, _, examples = carded_folder
    upload = tmp_path_factory.mktemp("routes") / "mcad-tiny"
    push_to_hub(folder, "mcad-tests/tiny-student", dry_run=upload)
    return upload, examples


def student_embeddings(folder: Path, image_path: Path, texts: list[str]) -> dict[str, np.ndarray]:
    """The package's own model on the folder: the reference every route is held to."""
    from PIL import Image

    model, processor = MCADModel.from_pretrained(folder).eval(), MCADProcessor.from_pretrained(folder)
    with torch.no_grad():
        outputs = model(**processor(images=[Image.open(image_path)], text=texts, return_tensors="pt", padding=True))
    return {"text": outputs.text_embeds.numpy(), "image": outputs.image_embeds.numpy()}


def cosines(embeddings, reference: np.ndarray) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float64)
    embeddings = embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True)
    return (embeddings * reference).sum(-1)


def test_the_folder_loads_as_clip_with_no_custom_code(hub_folder, tmp_path):
    folder, examples = hub_folder
    image_path, texts = folder / "examples" / "0.png", list(examples[0]["candidate_labels"])
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "clip" and config["architectures"] == ["CLIPModel"]
    result = run_isolated(
        f"""
        import json, torch
        from PIL import Image
        from transformers import AutoModel, AutoProcessor, CLIPModel, pipeline
        from sentence_transformers import SentenceTransformer
        folder, texts = {str(folder)!r}, {texts!r}
        image = Image.open({str(image_path)!r})
        processor = AutoProcessor.from_pretrained(folder)
        inputs = processor(images=[image], text=texts, return_tensors="pt", padding=True)
        embeddings = {{}}
        for name, model in (("CLIPModel", CLIPModel.from_pretrained(folder)),
                            ("AutoModel", AutoModel.from_pretrained(folder))):
            with torch.no_grad():
                outputs = model.eval()(**inputs)
                features = model.get_image_features(inputs["pixel_values"]).pooler_output
            embeddings[name] = {{"class": type(model).__name__, "text": outputs.text_embeds.tolist(),
                                 "image": outputs.image_embeds.tolist(), "image_features": features.tolist()}}
        encoder = SentenceTransformer(folder, device="cpu")
        embeddings["SentenceTransformer"] = {{"text": encoder.encode(texts).tolist(),
                                              "image": encoder.encode([image]).tolist()}}
        remote = AutoModel.from_pretrained(folder, trust_remote_code=True)
        classifier = pipeline("zero-shot-image-classification", model=folder)
        print(json.dumps({{"processor": type(processor).__name__, "embeddings": embeddings,
                          "remote": type(remote).__module__ + "." + type(remote).__name__,
                          "zero_shot": classifier(image, candidate_labels=texts, hypothesis_template="{{}}")}}))
        """,
        tmp_path,
    )
    reference = student_embeddings(folder, image_path, texts)
    assert result["processor"] == "CLIPProcessor"
    assert result["embeddings"]["CLIPModel"]["class"] == result["embeddings"]["AutoModel"]["class"] == "CLIPModel"
    for route, embeddings in result["embeddings"].items():
        for modality in ("text", "image"):
            assert cosines(embeddings[modality], reference[modality]).min() >= 0.9999, (route, modality)
    assert cosines(result["embeddings"]["CLIPModel"]["image_features"], reference["image"]).min() >= 0.9999
    # With trust_remote_code the package's own class (and its input checks) loads, from the folder's code.
    assert result["remote"].startswith("transformers_modules.") and result["remote"].endswith(".MCADModel")
    # The plain pipeline gives what the card's widget shows (computed with the package's class).
    card_scores = {row["label"]: row["score"] for row in examples_widget_output(folder)}
    assert {row["label"] for row in result["zero_shot"]} == set(texts)
    for row in result["zero_shot"]:
        assert row["score"] == pytest.approx(card_scores[row["label"]], abs=1e-4)


@pytest.fixture(scope="module")
def old_transformers() -> Path:
    """`OLD_TRANSFORMERS` installed with pip into tests/.cache on first use (the other libraries are this venv's)."""
    if not OLD_TRANSFORMERS_DIR.is_dir():
        staging = OLD_TRANSFORMERS_DIR.with_name(OLD_TRANSFORMERS_DIR.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(staging),
                        *OLD_TRANSFORMERS], check=True, capture_output=True, timeout=600)
        staging.rename(OLD_TRANSFORMERS_DIR)
    return OLD_TRANSFORMERS_DIR


def test_the_oldest_transformers_named_on_the_card_loads_the_folder_as_clip(hub_folder, old_transformers, tmp_path):
    folder, examples = hub_folder
    image_path, texts = folder / "examples" / "0.png", list(examples[0]["candidate_labels"])
    result = run_isolated(
        f"""
        import json, torch, transformers
        from PIL import Image
        from transformers import AutoModel, AutoProcessor
        folder = {str(folder)!r}
        processor = AutoProcessor.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder).eval()
        with torch.no_grad():
            outputs = model(**processor(images=[Image.open({str(image_path)!r})], text={texts!r}, return_tensors="pt",
                                        padding=True))
        print(json.dumps({{"version": transformers.__version__, "class": type(model).__name__,
                          "text": outputs.text_embeds.tolist(), "image": outputs.image_embeds.tolist()}}))
        """,
        tmp_path,
        python_path=old_transformers,
    )
    assert result["version"] == OLD_TRANSFORMERS_VERSION and result["class"] == "CLIPModel"
    assert OLD_TRANSFORMERS_VERSION.startswith(PLAIN_ROUTE_MIN_TRANSFORMERS["CLIPModel"] + ".")
    reference = student_embeddings(folder, image_path, texts)
    for modality in ("text", "image"):
        assert cosines(result[modality], reference[modality]).min() >= 0.9999, modality


def examples_widget_output(folder: Path) -> list[dict]:
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md").data.widget[0]["output"]


@pytest.mark.parametrize("vision_type,text_type", [("vit", "bert"), ("vit", "clip_text_model"),
                                                  ("clip_vision_model", "bert")])
def test_towers_that_cannot_form_a_clip_model_load_as_a_vision_text_dual_encoder(tmp_path, vision_type, text_type):
    tower = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    preset = MCADConfig.from_preset("tiny")
    vision = {"model_type": vision_type, "image_size": 32, "patch_size": 8, **tower}
    text = {**preset.text_config.to_dict(), "model_type": text_type, "max_position_embeddings": 32, **tower}
    config = MCADConfig(vision_config=vision, text_config=text, projection_dim=16)
    folder = tmp_path / "student"
    torch.manual_seed(0)
    MCADModel(config).save_pretrained(folder)
    MCADProcessor.from_config(config).save_pretrained(folder)
    image_path, texts = tmp_path / "image.png", ["a red circle", "a blue square left of a green star"]
    random_images(1, seed=4)[0].save(image_path)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "vision-text-dual-encoder"
    result = run_isolated(
        f"""
        import json, torch
        from PIL import Image
        from transformers import AutoModel, AutoProcessor, VisionTextDualEncoderModel
        folder = {str(folder)!r}
        processor = AutoProcessor.from_pretrained(folder)
        inputs = processor(images=[Image.open({str(image_path)!r})], text={texts!r}, return_tensors="pt", padding=True)
        rows = {{}}
        for route, model in (("class", VisionTextDualEncoderModel.from_pretrained(folder)),
                             ("auto", AutoModel.from_pretrained(folder))):
            with torch.no_grad():
                outputs = model.eval()(**inputs)
            rows[route] = {{"class": type(model).__name__, "text": outputs.text_embeds.tolist(),
                           "image": outputs.image_embeds.tolist()}}
        print(json.dumps(rows))
        """,
        tmp_path,
    )
    reference = student_embeddings(folder, image_path, texts)
    for route in ("class", "auto"):
        assert result[route]["class"] == "VisionTextDualEncoderModel"
        for modality in ("text", "image"):
            assert cosines(result[route][modality], reference[modality]).min() >= 0.9999, (route, modality)


def test_a_student_no_standard_class_holds_keeps_its_own_model_type(tmp_path):
    """DistilBERT has no pooled output to project: only the package's code loads such a student."""
    preset = MCADConfig.from_preset("tiny")
    text = {"model_type": "distilbert", "dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64,
            "max_position_embeddings": 32, "vocab_size": preset.text_config.vocab_size}
    config = MCADConfig(vision_config=preset.vision_config.to_dict(), text_config=text, projection_dim=16)
    assert config.plain_model_type() is None
    MCADModel(config).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mcad"
    assert MCADModel.from_pretrained(tmp_path).config.text_config.model_type == "distilbert"


@pytest.fixture(scope="module")
def transformers_js():
    """The transformers.js client of tests/js, installed on first use (npm ci; no install scripts: onnxruntime-node
    ships its CPU binary, and its script only fetches GPU extras)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed: the transformers.js route runs the real client in Node.js")
    if not (JS_CLIENT / "node_modules" / "@huggingface" / "transformers").is_dir():
        subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=JS_CLIENT, check=True,
                       capture_output=True, timeout=600)
    return JS_CLIENT / "zero_shot.mjs"


@pytest.mark.parametrize("dtype", ["fp32", "q8"])
def test_transformers_js_zero_shot_pipeline_matches_python(transformers_js, hub_folder, tmp_path, dtype):
    folder, examples = hub_folder
    from PIL import Image

    # At the model's input size: resizing a 4x4 widget image 8x up, PIL and sharp (transformers.js) interpolate
    # differently, which is not what this test is about.
    size = json.loads((folder / "config.json").read_text())["vision_config"]["image_size"]
    image_path, texts = tmp_path / "query.png", list(examples[0]["candidate_labels"])
    Image.open(folder / "examples" / "0.png").convert("RGB").resize((size, size), Image.NEAREST).save(image_path)
    node = subprocess.run(["node", str(transformers_js), str(folder), str(image_path), dtype, *texts],
                          capture_output=True, text=True, timeout=300)
    assert node.returncode == 0, node.stderr[-3000:]
    scores = {row["label"]: row["score"] for row in json.loads(node.stdout.strip().splitlines()[-1])}
    classifier = pipeline("zero-shot-image-classification", model=str(folder))
    expected = classifier(Image.open(image_path), candidate_labels=texts, hypothesis_template="{}")
    assert set(scores) == set(texts)
    for row in expected:
        assert scores[row["label"]] == pytest.approx(row["score"], abs=0.02)
