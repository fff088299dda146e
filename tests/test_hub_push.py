"""Model card and Hub push: the dry-run folder is what a newcomer would upload, and it works as is."""

import json
import logging
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants

from modeling_mcad.errors import UserError
from modeling_mcad.hub import (
    DRY_RUN_MARKER,
    HubPushError,
    files_to_upload,
    publishable,
    push_to_hub,
)

from .conftest import TEACHERS, caption_split, run_isolated

FAKE_TOKEN = "hf_mcadTestTokenThatMustNeverBePrinted0123"


def test_model_card_carries_metadata_results_variants_and_widget(carded_folder):
    folder, metrics, examples = carded_folder
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert card.data.base_model == TEACHERS and "mcad-shapes" in card.data.tags
    reported = {result.metric_config: result.metric_value for result in card.data.eval_results}
    assert reported == {key: round(float(metrics[key]), 2) for key in reported} and "t2i_r1" in reported
    assert len(card.data.widget) == len(examples)
    for entry, example in zip(card.data.widget, examples):
        assert (folder / entry["src"].split("/resolve/main/")[1]).is_file()
        assert sorted(row["label"] for row in entry["output"]) == sorted(example["candidate_labels"])
        assert sum(row["score"] for row in entry["output"]) == pytest.approx(1, abs=1e-3)
    assert (folder / "recall.png").read_bytes().startswith(b"\x89PNG") and "](recall.png)" in card.text
    for variant in ("torch-fp32", "torch-fp16", "onnx-fp32", "onnx-int8", "onnx-joint-fp32", "onnx-joint-int8"):
        assert f"| {variant} |" in card.text
    assert "objective: mcad" in card.text and "| mcad | 1 |" in card.text
    # Loading: the class with no custom code comes first, then the package's own, the other libraries after.
    assert {"clip", "transformers.js"} <= set(card.data.tags) and "custom_code" not in card.data.tags
    routes = [card.text.index(route) for route in ("`CLIPModel.from_pretrained`", "trust_remote_code=True)` |",
                                                    "`SentenceTransformer(repo)`", "transformers.js `pipeline(")]
    assert routes == sorted(routes) and card.text.index('from_pretrained("mcad-tests/tiny-student").eval()') < \
        card.text.index('from_pretrained("mcad-tests/tiny-student", trust_remote_code=True)')
    # The widget's scores are in the body too, where every reader sees them.
    for entry in card.data.widget:
        for row in entry["output"]:
            assert f"| {row['label']} | {row['score']:.4f} |" in card.text


def test_dry_run_folder_loads_and_runs_in_a_fresh_process(carded_folder, tmp_path):
    folder, _, examples = carded_folder
    result = push_to_hub(folder, "mcad-tests/tiny-student", dry_run=tmp_path / "upload")
    upload = tmp_path / "upload"
    assert result["files"] == files_to_upload(folder)
    listed = sorted(p.relative_to(upload).as_posix() for p in upload.rglob("*") if p.is_file())
    assert listed == sorted([*result["files"], DRY_RUN_MARKER])  # the marker: hidden, so never uploaded itself
    assert files_to_upload(upload) == result["files"]
    card = ModelCard.load(upload / "README.md")
    example = examples[0]
    texts = list(example["candidate_labels"])
    outputs = run_isolated(
        f"""
        import json, numpy as np, onnxruntime, torch
        from PIL import Image
        from transformers import AutoModel, AutoProcessor, pipeline
        folder = {str(upload)!r}
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        fp16 = AutoModel.from_pretrained(folder, trust_remote_code=True, variant="fp16", dtype=torch.float16).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        image = Image.open(f"{{folder}}/examples/0.png")
        texts = {texts!r}
        with torch.no_grad():
            out = model(**processor(images=[image], text=texts, return_tensors="pt", padding=True))
            half = fp16(**processor(images=[image], text=texts, return_tensors="pt", padding=True))
        tokens = processor(text=texts, padding=True, return_tensors="np")
        pixels = processor(images=[image], return_tensors="np")["pixel_values"]
        onnx = {{}}
        for suffix in ("", "_quantized"):
            text_graph = onnxruntime.InferenceSession(f"{{folder}}/onnx/text_model{{suffix}}.onnx")
            vision_graph = onnxruntime.InferenceSession(f"{{folder}}/onnx/vision_model{{suffix}}.onnx")
            onnx[suffix or "fp32"] = {{
                "text": text_graph.run(None, {{"input_ids": tokens["input_ids"],
                                              "attention_mask": tokens["attention_mask"]}})[0].tolist(),
                "image": vision_graph.run(None, {{"pixel_values": pixels}})[0].tolist()}}
        classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
        print(json.dumps({{
            "model": type(model).__module__, "fp16_dtype": str(fp16.dtype),
            "text": out.text_embeds.tolist(), "image": out.image_embeds.tolist(),
            "fp16_text": half.text_embeds.float().tolist(), "fp16_image": half.image_embeds.float().tolist(),
            "onnx": onnx, "zero_shot": classifier(image, candidate_labels=texts, hypothesis_template="{{}}")}}))
        """,
        tmp_path,
    )
    assert outputs["model"].startswith("transformers_modules.") and outputs["fp16_dtype"] == "torch.float16"
    text, image = torch.tensor(outputs["text"]), torch.tensor(outputs["image"])
    torch.testing.assert_close(torch.tensor(outputs["onnx"]["fp32"]["text"]), text, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(outputs["onnx"]["fp32"]["image"]), image, atol=1e-5, rtol=0)
    int8 = outputs["onnx"]["_quantized"]
    for other_text, other_image, floor in ((int8["text"], int8["image"], 0.99),
                                           (outputs["fp16_text"], outputs["fp16_image"], 0.999)):
        assert (torch.tensor(other_text) * text).sum(-1).min() > floor
        assert (torch.tensor(other_image) * image).sum(-1).min() > floor
    # The card's widget shows what the pipeline really outputs for that image.
    card_scores = {row["label"]: row["score"] for row in card.data.widget[0]["output"]}
    for row in outputs["zero_shot"]:
        assert row["score"] == pytest.approx(card_scores[row["label"]], abs=1e-4)


@pytest.fixture
def recording_hub(monkeypatch):
    """HfApi.create_repo / upload_folder replaced by recorders (no network); returns the list of calls."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", self.token, repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", self.token, kwargs["repo_id"], kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_uploads_exactly_the_dry_run_files_and_never_shows_the_token(
    carded_folder, recording_hub, monkeypatch, tmp_path, caplog, capfd
):
    folder, _, _ = carded_folder
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    caplog.set_level(logging.DEBUG)
    dry_run = push_to_hub(folder, "mcad-tests/tiny-student", dry_run=tmp_path / "dry")
    result = push_to_hub(folder, "mcad-tests/tiny-student", private=True)
    (_, create_token, repo_id, create_kwargs), (_, upload_token, _, upload_kwargs) = recording_hub
    assert repo_id == "mcad-tests/tiny-student" and create_kwargs["private"] is True
    assert create_token == upload_token == FAKE_TOKEN  # handed to huggingface_hub...
    assert upload_kwargs["allow_patterns"] == result["files"] == dry_run["files"]
    assert upload_kwargs["folder_path"] == folder
    captured = capfd.readouterr()
    assert FAKE_TOKEN not in captured.out + captured.err + caplog.text + repr(result)  # ...and shown nowhere
    assert "Uploading" in caplog.text


def test_a_failing_upload_does_not_show_the_token(carded_folder, monkeypatch, caplog, capfd):
    folder, _, _ = carded_folder
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # a closed port: the real client fails fast
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Exception, match="Connection refused") as error:  # it reached the (closed) endpoint
        push_to_hub(folder, "mcad-tests/tiny-student")
    captured = capfd.readouterr()
    assert FAKE_TOKEN not in captured.out + captured.err + caplog.text + str(error.value) + str(error.getrepr())


def test_offline_or_without_a_token_nothing_is_uploaded(carded_folder, recording_hub, monkeypatch, tmp_path):
    folder, _, _ = carded_folder
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE is set, so nothing was uploaded.*dry_run"):
        push_to_hub(folder, "mcad-tests/tiny-student")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(HubPushError, match="No Hugging Face token found.*hf auth login.*HF_TOKEN"):
        push_to_hub(folder, "mcad-tests/tiny-student")
    assert recording_hub == []


def test_incomplete_folders_and_overlapping_dry_runs_are_refused(carded_folder, tmp_path):
    folder, _, _ = carded_folder
    incomplete = tmp_path / "incomplete"
    shutil.copytree(folder, incomplete, ignore=shutil.ignore_patterns("README.md"))
    with pytest.raises(UserError, match="lacks README.md"):
        push_to_hub(incomplete, "mcad-tests/tiny-student", dry_run=tmp_path / "dry")
    for overlapping in (folder, folder / "inside", folder.parent):
        with pytest.raises(UserError, match="overlaps the exported folder"):
            push_to_hub(folder, "mcad-tests/tiny-student", dry_run=overlapping)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.md").write_text("precious")
    with pytest.raises(UserError, match="not an earlier dry run"):
        push_to_hub(folder, "mcad-tests/tiny-student", dry_run=tmp_path / "results")
    assert (tmp_path / "results" / "table.md").read_text() == "precious"
    with pytest.raises(UserError, match=r"repo_id='not a repo id' is not a Hub repository id.*user/name"):
        push_to_hub(folder, "not a repo id", dry_run=tmp_path / "dry")
    assert not (tmp_path / "dry").exists() and (folder / "README.md").is_file()


def tree(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_a_dry_run_replaces_only_an_earlier_dry_run(carded_folder, saved_tiny_student, tmp_path):
    folder, _, _ = carded_folder
    dry = tmp_path / "dry"
    first = push_to_hub(folder, "mcad-tests/tiny-student", dry_run=dry)
    (dry / "README.md").write_text("edited")  # changed contents: still the earlier dry run, replaced whole
    push_to_hub(folder, "mcad-tests/tiny-student", dry_run=dry)
    assert (dry / "README.md").read_bytes() == (folder / "README.md").read_bytes()

    # A trained student (config.json and weights), a dry run someone added a file to, a file: all kept as they are.
    student = tmp_path / "student"
    shutil.copytree(saved_tiny_student, student)
    (dry / "notes.md").write_text("mine")
    (tmp_path / "file").write_text("a file")
    for destination in (student, dry, tmp_path / "file"):
        before = tree(destination) if destination.is_dir() else destination.read_bytes()
        with pytest.raises(UserError, match=rf"dry_run={destination} .*(not an earlier dry run|not a folder).*new or "
                                            "empty folder"):
            push_to_hub(folder, "mcad-tests/tiny-student", dry_run=destination)
        assert (tree(destination) if destination.is_dir() else destination.read_bytes()) == before
    assert json.loads((dry / DRY_RUN_MARKER).read_text())["files"] == first["files"]


def test_hidden_files_and_links_are_not_uploaded(carded_folder, recording_hub, monkeypatch, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(carded_folder[0], folder)
    secret = tmp_path / "secret.txt"
    secret.write_text("HF_TOKEN=hf_secret")
    (folder / ".env").write_text("HF_TOKEN=hf_secret")
    (folder / ".README.md.tmp-x1y2").write_text("an interrupted write")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "notes.md").write_text("private")
    (folder / "onnx" / ".cache.json").write_text("{}")
    (folder / "linked.txt").symlink_to(secret)
    (folder / "linked_folder").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "data.txt").write_text("outside the folder")

    files = files_to_upload(folder)
    assert files == files_to_upload(carded_folder[0])  # nothing of the above
    assert not any(name.startswith(".") or "linked" in name for file in files for name in file.split("/"))
    dry = push_to_hub(folder, "mcad-tests/tiny-student", dry_run=tmp_path / "dry")
    assert sorted(tree(tmp_path / "dry")) == sorted([*dry["files"], DRY_RUN_MARKER])
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    push_to_hub(folder, "mcad-tests/tiny-student")
    assert recording_hub[-1][3]["allow_patterns"] == files


def test_publishable_replaces_local_paths_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "photos").mkdir(parents=True)
    config = {"output_dir": str(tmp_path / "run"), "dataset": "data/photos", "teacher": "openai/clip-vit-base-patch16",
              "home": "~/models/student/", "shapes": "mcad-shapes", "nested": {"list": [str(tmp_path), 3, None]}}
    assert publishable(config) == {
        "output_dir": "<local: run>", "dataset": "<local: photos>", "teacher": "openai/clip-vit-base-patch16",
        "home": "<local: student>", "shapes": "mcad-shapes", "nested": {"list": [f"<local: {tmp_path.name}>", 3, None]},
    }


class MainProcess(SimpleNamespace):
    """What the push stage asks of an Accelerator, for a single process."""

    is_main_process = True

    def wait_for_everyone(self):
        pass


def test_the_push_stage_publishes_no_local_path(exported_student, tmp_path, tmp_path_factory):
    """train_mcad.py push with local dataset, teachers, checkpoint and dry-run folders: no published file names them,
    nor this machine's home or working folder."""
    import datasets

    import train_mcad

    run = tmp_path / "run"
    shutil.copytree(exported_student[0], run / "export")
    split = caption_split(36, seed=5)
    data = tmp_path / "my_photos"
    datasets.DatasetDict({"train": split.select(range(12)), "validation": split.select(range(12, 24)),
                          "test": split.select(range(24, 36))}).save_to_disk(data)
    config = train_mcad.TrainConfig(
        output_dir=str(run), dataset=str(data), dual_teacher=str(tmp_path / "teachers" / "dual"),
        fusion_teacher=str(tmp_path / "teachers"), student_tokenizer=str(tmp_path / "tokenizer"),
        resume_from_checkpoint=str(run / "checkpoints" / "step_1"), repo_id="mcad-tests/tiny-student",
        dry_run=str(tmp_path / "upload"), license="cc-by-4.0",
    )
    (tmp_path / "teachers").mkdir()
    metrics = {key: 50.0 for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")}
    (run / "results.json").write_text(json.dumps({"student (mcad)": {**metrics, "rsum": 300.0}}))
    assert train_mcad.push(config, MainProcess()) == str(tmp_path / "upload")

    card = ModelCard.load(tmp_path / "upload" / "README.md")
    assert card.data.license == "cc-by-4.0"  # the run's, not a constant
    assert {(result.dataset_type, result.dataset_name) for result in card.data.eval_results} == {
        ("<local: my_photos>", "<local: my_photos>")}
    assert "<local: tokenizer>" in card.text and "<local: teachers>" in card.text
    assert not re.search(r"^(output_dir|dry_run|resume_from_checkpoint):", card.text, re.MULTILINE)
    assert card.data.base_model is None and card.data.datasets is None  # local teachers and data: no Hub ids
    needles = {str(tmp_path), str(tmp_path_factory.getbasetemp()), str(Path.home()), os.getcwd()}
    for path in (tmp_path / "upload").rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert not [needle for needle in needles if needle.encode() in content], path
