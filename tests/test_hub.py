"""Saved students load and run where only the saved folder exists (Hub-ready code)."""

import ast
import json

import numpy as np
import torch

from .conftest import REPO_ROOT, random_images, run_isolated

HUB_FILES = ("configuration_mcad.py", "modeling_mcad.py", "processing_mcad.py")


def reference_inputs(processor):
    images = random_images(3, seed=1) + random_images(1, seed=2, mode="L")
    texts = ["a red circle", "a small blue square left of a star", "two green triangles"]
    return images, texts, processor(images=images, text=texts, return_tensors="pt", padding=True)


def test_save_writes_safetensors_auto_map_and_code(saved_tiny_student):
    files = {path.name for path in saved_tiny_student.iterdir()}
    assert "model.safetensors" in files and not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert set(HUB_FILES) <= files
    auto_map = json.loads((saved_tiny_student / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == auto_map["AutoModelForZeroShotImageClassification"] == "modeling_mcad.MCADModel"
    assert json.loads((saved_tiny_student / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_mcad.MCADProcessor"
    }


def test_hub_files_import_only_torch_transformers_and_each_other():
    for name in HUB_FILES:
        tree = ast.parse((REPO_ROOT / "modeling_mcad" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {"." if node.level else node.module.split(".")[0]}
            else:
                continue
            assert roots <= {"torch", "transformers", ".", "copy", "dataclasses", "typing"}, (name, roots)


def test_fresh_process_loads_with_auto_classes_and_matches(tiny_student, saved_tiny_student, tmp_path):
    model, processor = tiny_student
    images, texts, inputs = reference_inputs(processor)
    with torch.no_grad():
        expected = model(**inputs)
    for index, image in enumerate(images):
        image.save(tmp_path / f"{index}.png")
    result = run_isolated(
        f"""
        import json, torch
        from PIL import Image
        from transformers import AutoModel, AutoProcessor
        folder = {str(saved_tiny_student)!r}
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        images = [Image.open(f"{tmp_path}/{{i}}.png") for i in range({len(images)})]
        inputs = processor(images=images, text={texts!r}, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model(**inputs)
        print(json.dumps({{"model": type(model).__module__, "processor": type(processor).__name__,
                          "logits": out.logits_per_image.tolist(), "text": out.text_embeds.tolist(),
                          "image": out.image_embeds.tolist()}}))
        """,
        tmp_path,
    )
    assert result["model"].startswith("transformers_modules.")  # the copied code, not this package
    assert result["processor"] == "MCADProcessor"
    for key, tensor in (("logits", expected.logits_per_image), ("text", expected.text_embeds),
                        ("image", expected.image_embeds)):
        assert np.abs(np.array(result[key]) - tensor.numpy()).max() <= 1e-6


def test_pipelines_run_on_a_saved_folder(tiny_student, saved_tiny_student, tmp_path):
    model, processor = tiny_student
    image = random_images(1, seed=3)[0]
    image.save(tmp_path / "query.png")
    labels = ["a red circle", "a blue square", "a green star", "a yellow triangle"]
    result = run_isolated(
        f"""
        import json
        from PIL import Image
        from transformers import pipeline
        folder, image = {str(saved_tiny_student)!r}, Image.open("{tmp_path}/query.png")
        zero_shot = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
        image_features = pipeline("image-feature-extraction", model=folder, trust_remote_code=True)
        text_features = pipeline("feature-extraction", model=folder, trust_remote_code=True)
        print(json.dumps({{"zero_shot": zero_shot(image, candidate_labels={labels!r}, hypothesis_template="{{}}"),
                          "image": image_features(image), "text": text_features("a red circle")}}))
        """,
        tmp_path,
    )
    scores = [row["score"] for row in result["zero_shot"]]
    assert sorted(row["label"] for row in result["zero_shot"]) == sorted(labels)
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-5
    # The pipelines' numbers are this model's: its probabilities and its normalised embeddings.
    with torch.no_grad():
        probs = model(**processor(images=[image], text=labels, return_tensors="pt", padding=True)).logits_per_image
        probs = probs.softmax(dim=-1)[0]
        image_embed = model(**processor(images=[image], return_tensors="pt")).image_embeds[0]
        text_embed = model(**processor(text=["a red circle"], return_tensors="pt")).text_embeds[0]
    for row in result["zero_shot"]:
        assert abs(row["score"] - probs[labels.index(row["label"])].item()) < 1e-5
    np.testing.assert_allclose(np.array(result["image"]).reshape(-1), image_embed.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.array(result["text"]).reshape(-1), text_embed.numpy(), atol=1e-5)
