"""Checkpoints and reruns: pruning and "latest" follow the order of writing, a damaged state file is named, a stage
refuses to replace or mix with an earlier run's outputs unless told to, and a teacher cache is used only when its
record shows it was built from this run's teacher and data, with finite values.
"""

import json
import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train_mcad
from modeling_mcad.checkpointing import STATE_FILE, CheckpointManager
from modeling_mcad.errors import UserError
from modeling_mcad.utils import atomic_directory

from .conftest import snapshot, train_script_error
from .test_fault_injection import FakeAccelerator, checkpoint_values, load_checkpoint, save_checkpoint
from .test_train import run_script, write_run

# The bad-input cases of this file (the corpus of tests/test_bad_inputs.py lists them too): each ends with status 2, a
# message naming the input and the fix, and no file of the run changed.
BAD_INPUT_CASES = {
    "rerun_into_an_earlier_run": "distill again where student/ and checkpoints/ are, without --resume_from_checkpoint "
                                 "or --overwrite_output_dir",
    "rerun_of_teachers_stage": "the same full command again: its teachers stage where teacher/ is",
    "damaged_training_state_json": "--resume_from_checkpoint naming a checkpoint whose training_state.json is cut off",
    "cache_of_another_teacher_or_data": "a teacher cache folder built from another training split (copied in by hand)",
    "nonfinite_teacher_cache": "a teacher cache whose files hold a NaN",
}


# --- CheckpointManager ----------------------------------------------------------------------------------------------


def test_pruning_keeps_the_checkpoints_written_last(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, f"model {step}", keep=2)
        manager = CheckpointManager(tmp_path, FakeAccelerator(), keep=2)
        assert [path.name for path in manager.checkpoints()] == [f"step_{step}", f"step_{step - 1}"][:step]
    assert load_checkpoint(tmp_path)[0] == "model 5"


def test_a_run_resumed_from_an_older_checkpoint_keeps_its_new_ones(tmp_path):
    """Resumed from step 2 when step 4 exists, the run's step 3 is the newest: "latest" loads it, pruning keeps it."""
    save_checkpoint(tmp_path, 2, "model 2")
    save_checkpoint(tmp_path, 4, "model 4")
    assert load_checkpoint(tmp_path, str(tmp_path / "step_2"))[0] == "model 2"
    save_checkpoint(tmp_path, 3, "model 3 after a resume from 2", keep=1)
    assert checkpoint_values(tmp_path) == {"step_3": "model 3 after a resume from 2"}

    save_checkpoint(tmp_path, 5, "model 5")
    save_checkpoint(tmp_path, 1, "model 1 after a resume from the start")
    assert list(checkpoint_values(tmp_path)) == ["step_1", "step_5"]  # the last written first
    assert load_checkpoint(tmp_path)[0] == "model 1 after a resume from the start"


def test_a_damaged_state_file_is_passed_over_for_latest_and_named_for_an_explicit_path(tmp_path, caplog):
    save_checkpoint(tmp_path, 2, "model 2")
    save_checkpoint(tmp_path, 4, "model 4")
    state_file = tmp_path / "step_4" / STATE_FILE
    state_file.write_text('{"global_step": 4, "epo')  # cut off
    with caplog.at_level(logging.WARNING, logger="modeling_mcad.checkpointing"):
        value, state = load_checkpoint(tmp_path)
    assert (value, state["global_step"]) == ("model 2", 2)
    assert re.search(r"checkpoint\(s\) \['step_4'\] in \S+: training_state\.json is damaged; passed over", caplog.text)
    with pytest.raises(UserError, match=rf"^{re.escape(str(state_file))} is damaged \(JSONDecodeError: .*\)\. Resume "
                                        r"from another checkpoint of \S+ \(step_2\) or from 'latest'"):
        load_checkpoint(tmp_path, str(tmp_path / "step_4"))
    state_file.write_text('{"global_step": 4}')
    with pytest.raises(UserError, match=r"is damaged \(it does not hold the integers global_step, epoch, "):
        load_checkpoint(tmp_path, str(tmp_path / "step_4"))


def test_a_write_removes_what_crashed_writes_of_the_same_folder_left(tmp_path):
    for leftover in (".out.tmp-k1lled", ".out.removing-x", ".other.tmp-1"):
        (tmp_path / leftover).mkdir()
    (tmp_path / ".out.tmp-k1lled" / "half.bin").write_bytes(b"12")
    (tmp_path / ".out.tmp-file").write_text("a file, not a folder this writes")
    with atomic_directory(tmp_path / "out") as temporary:
        (temporary / "whole.bin").write_bytes(b"1234")
    # Another folder's leftovers and files stay; the new write is whole.
    assert sorted(path.name for path in tmp_path.iterdir()) == [".other.tmp-1", ".out.tmp-file", "out"]
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["whole.bin"]


def test_atomic_directory_syncs_every_file_and_the_renames(tmp_path, monkeypatch):
    import os

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda descriptor: (synced.append(os.readlink(f"/proc/self/fd/{descriptor}")),
                                                         real_fsync(descriptor)))
    with atomic_directory(tmp_path / "out") as temporary:
        (temporary / "inner").mkdir()
        (temporary / "inner" / "weights.bin").write_bytes(b"1234")
        (temporary / "config.json").write_text("{}")
    names = {Path(path).name for path in synced}
    assert {"weights.bin", "config.json", "inner"} <= names  # the files and the folders' entries, before the rename
    assert str(tmp_path) in synced  # the rename itself
    assert (tmp_path / "out" / "inner" / "weights.bin").read_bytes() == b"1234"


def test_a_resumed_run_logs_no_step_twice(tmp_path):
    log = tmp_path / "distill_log.jsonl"
    log.write_text("".join(json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in range(1, 6))
                   + '{"step": 6, "lo')  # killed while writing step 6
    train_mcad.truncate_jsonl(log, 3)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    for step in (4, 5):
        train_mcad.append_jsonl(log, {"step": step, "loss": 0.0})
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5]


# --- The teacher cache's record -------------------------------------------------------------------------------------

ONE_PROCESS = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0, wait_for_everyone=lambda: None)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A saved tiny teacher (CLIP + BLIP) and two small training splits: (teacher folder, split, other split)."""
    from modeling_mcad.shapes import make_shapes
    from modeling_mcad.teachers import MCADTeacher

    from .test_teachers import tiny_blip, tiny_clip

    folder = tmp_path_factory.mktemp("tiny_teacher") / "teacher"
    torch.manual_seed(0)
    (dual, dual_processor), (fusion, fusion_processor) = tiny_clip(), tiny_blip()
    MCADTeacher.from_teachers(dual, fusion, dual_processor=dual_processor,
                              fusion_processor=fusion_processor).save_pretrained(folder)
    splits = [make_shapes(seed=seed, train=8, validation=0, test=0, image_size=32)["train"] for seed in (0, 1)]
    return folder, *splits


def test_a_cache_is_reused_only_for_the_same_teacher_data_and_precision(tiny_teacher, tmp_path):
    from modeling_mcad.teacher_cache import TeacherCache, build_teacher_cache
    from modeling_mcad.teachers import MCADTeacher

    teacher_dir, split, _ = tiny_teacher
    teacher = MCADTeacher.from_pretrained(teacher_dir)
    folder = build_teacher_cache(teacher, teacher_dir, split, tmp_path, ONE_PROCESS, batch_size=4)
    built = snapshot(folder)
    assert build_teacher_cache(teacher, teacher_dir, split, tmp_path, ONE_PROCESS) == folder  # reused
    assert TeacherCache.for_run(tmp_path, teacher_dir, split).folder == folder

    teacher.autocast_dtype = torch.bfloat16  # the same teacher, run in another precision: other values
    with pytest.raises(UserError, match=rf"^The teacher cache {re.escape(str(folder))} was built from another teacher, "
                                        r"training data or teacher precision than this run's \(teacher_precision "
                                        r"'torch\.float32' there, 'torch\.bfloat16' here\)\. Rebuild it with "
                                        r"`train_mcad\.py cache --overwrite_output_dir`"):
        build_teacher_cache(teacher, teacher_dir, split, tmp_path, ONE_PROCESS)
    assert snapshot(folder) == built
    assert build_teacher_cache(teacher, teacher_dir, split, tmp_path, ONE_PROCESS, overwrite=True) == folder
    assert json.loads((folder / "cache_record.json").read_text())["teacher_precision"] == "torch.bfloat16"


def test_a_ranking_cache_holds_the_fusion_teachers_scores_of_each_caption_and_its_negatives(tiny_teacher, tmp_path):
    from modeling_mcad.data import flatten_pairs, to_rgb
    from modeling_mcad.teacher_cache import CACHE_COLUMNS, TeacherCache, build_teacher_cache
    from modeling_mcad.teachers import MCADTeacher

    teacher_dir, split, _ = tiny_teacher
    teacher = MCADTeacher.from_pretrained(teacher_dir)
    negatives = ["swapped_caption", "flipped_caption"]
    plain = build_teacher_cache(teacher, teacher_dir, split, tmp_path, ONE_PROCESS, batch_size=4)
    ranked = build_teacher_cache(teacher, teacher_dir, split, tmp_path, ONE_PROCESS, batch_size=4,
                                 negative_columns=negatives)
    assert ranked != plain  # its own folder: the plain cache stays as it was
    with pytest.raises(UserError, match="No teacher cache"):
        TeacherCache.for_run(tmp_path, teacher_dir, split, ["swapped_caption"])
    pair_index = torch.tensor([0, 7, 13])
    plain_targets = TeacherCache.for_run(tmp_path, teacher_dir, split).targets(pair_index)
    targets = TeacherCache.for_run(tmp_path, teacher_dir, split, negatives).targets(pair_index)
    assert set(targets) == {*CACHE_COLUMNS, "candidate_match_logits"} and set(plain_targets) == set(CACHE_COLUMNS)
    for name in CACHE_COLUMNS:  # the same targets, however many texts the fusion teacher read beside them
        torch.testing.assert_close(targets[name], plain_targets[name], atol=2e-3, rtol=0)
    pairs = flatten_pairs(split)
    fusion = teacher.processors["fusion"]
    for row, index in enumerate(pair_index.tolist()):
        pair = pairs[index]
        texts = [pair["caption"], pair["swapped_caption"], pair["flipped_caption"]]
        tokens = fusion.tokenizer(texts, return_tensors="pt", padding=True)
        pixels = fusion.image_processor([to_rgb(pair["image"])], return_tensors="pt")["pixel_values"]
        expected = teacher.fuse(pixels, tokens["input_ids"], tokens["attention_mask"],
                                pairs=torch.tensor([[0, 0], [0, 1], [0, 2]])).match_logits
        torch.testing.assert_close(targets["candidate_match_logits"][row], expected, atol=2e-2, rtol=1e-2)

    # A match threshold alone needs each caption's own score: a cache of its own, one column.
    own = build_teacher_cache(teacher, teacher_dir, split, tmp_path, ONE_PROCESS, batch_size=4, negative_columns=[])
    assert own not in (plain, ranked)
    own_scores = TeacherCache.for_run(tmp_path, teacher_dir, split, []).targets(pair_index)["candidate_match_logits"]
    assert own_scores.shape == (3, 1)
    torch.testing.assert_close(own_scores[:, 0], targets["candidate_match_logits"][:, 0], atol=2e-2, rtol=0)

    split_without = split.map(lambda row: {"flipped_captions": [None] * len(row["captions"])})
    with pytest.raises(UserError, match="Image 0 of the training split has a caption without a 'flipped_caption' "
                                        "hard negative.*Leave that column out of --negative_captions"):
        build_teacher_cache(teacher, teacher_dir, split_without, tmp_path, ONE_PROCESS, negative_columns=negatives)
    with pytest.raises(UserError, match=r"need the training split's \['flipped_captions'\], which it has not"):
        build_teacher_cache(teacher, teacher_dir, split.remove_columns("flipped_captions"), tmp_path, ONE_PROCESS,
                            negative_columns=negatives)
    with pytest.raises(UserError, match="negative caption column 'caption' is not one the pairs carry"):
        build_teacher_cache(teacher, teacher_dir, split, tmp_path, ONE_PROCESS, negative_columns=["caption"])


def test_mined_captions_are_the_other_images_captions_the_dual_teacher_ranks_highest(tiny_teacher, tmp_path):
    from modeling_mcad.teacher_cache import (
        TeacherCache,
        build_teacher_cache,
        mine_captions,
        save_mined_captions,
        with_mined_captions,
    )
    from modeling_mcad.teachers import MCADTeacher

    teacher_dir, split, other_split = tiny_teacher
    # Image 1 copies two captions of image 0 and image 2 one of image 1's: a text is ranked once, never for an
    # image it describes.
    captions = list(split["captions"])
    captions[1] = captions[0][:2] + captions[1][2:]
    captions[2] = captions[1][2:3] + captions[2][1:]
    split = split.remove_columns("captions").add_column("captions", captions)
    with pytest.raises(UserError, match="run the cache stage first"):
        with_mined_captions(split, tmp_path, teacher_dir)
    cache = TeacherCache(build_teacher_cache(MCADTeacher.from_pretrained(teacher_dir), teacher_dir, split, tmp_path,
                                             ONE_PROCESS, batch_size=4))
    mined = mine_captions(split, cache, images_per_chunk=3)  # chunks that do not divide the 8 images
    v, t = (cache.rows[name][:].float() for name in ("teacher_image_embeds", "teacher_text_embeds"))
    pair_texts = [text for image_captions in captions for text in image_captions]
    first_pair = 0
    for image, own in enumerate(captions):
        # By hand: image a's score of each distinct text (its first pair's embedding) that is none of a's own.
        scores = {}
        for j, text in enumerate(pair_texts):
            if text not in own and text not in scores:
                scores[text] = float(v[first_pair] @ t[j])
        assert mined[image] == sorted(scores, key=lambda text: -scores[text])[:len(own)]
        first_pair += len(own)
    assert mined[0] != mined[1]  # the copied texts are image 1's own, not its negatives

    saved = save_mined_captions(tmp_path, teacher_dir, split)
    assert with_mined_captions(split, tmp_path, teacher_dir)["mined_captions"] == mined
    # The plain cache rebuilt in another precision: the texts mined from the old one are refused, then mined again.
    teacher = MCADTeacher.from_pretrained(teacher_dir)
    teacher.autocast_dtype = torch.bfloat16
    build_teacher_cache(teacher, teacher_dir, split, tmp_path, ONE_PROCESS, overwrite=True)
    with pytest.raises(UserError, match="were mined from another version of the teacher cache"):
        with_mined_captions(split, tmp_path, teacher_dir)
    assert save_mined_captions(tmp_path, teacher_dir, split) == saved
    assert len(with_mined_captions(split, tmp_path, teacher_dir)["mined_captions"]) == len(captions)
    saved.write_text("[")  # damaged
    with pytest.raises(UserError, match="or the file is damaged"):
        with_mined_captions(split, tmp_path, teacher_dir)
    with pytest.raises(UserError, match="holds 40 pairs and the training split 3"):
        mine_captions(other_split.select([0]).map(lambda row: {"captions": row["captions"][:3]}), cache)

    # Two images alike in every text: neither has another text to be mined.
    twins = split.select([0, 0])
    twin_cache = TeacherCache(build_teacher_cache(MCADTeacher.from_pretrained(teacher_dir), teacher_dir, twins,
                                                  tmp_path / "twins", ONE_PROCESS))
    with pytest.raises(UserError, match="image 0 of the training split has 5 captions but the split only 0 other "
                                        "distinct text"):
        mine_captions(twins, twin_cache)


def test_a_teacher_giving_nonfinite_values_is_refused_before_its_cache_is_written(tiny_teacher, tmp_path):
    from modeling_mcad.teacher_cache import build_teacher_cache
    from modeling_mcad.teachers import MCADTeacher

    teacher_dir, split, _ = tiny_teacher
    teacher = MCADTeacher.from_pretrained(teacher_dir)
    with torch.no_grad():
        next(teacher.adapter.parameters()).fill_(float("nan"))
    with pytest.raises(UserError, match=r"^The teacher in \S+teacher gave non-finite values \(\{'adapted_image_"
                                        r"embeds': \d+.*\}\) for the teacher cache .*Train it again \(`train_mcad\.py "
                                        r"teachers --overwrite_output_dir`\)"):
        build_teacher_cache(teacher, teacher_dir, split, tmp_path, ONE_PROCESS)
    assert [path.name for path in (tmp_path / "cache").iterdir()] == []


# --- train_mcad.py: reruns ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A run folder after `cache distill` (tiny teacher and student, one epoch of 4 steps, checkpoints at 2 and 4)."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    run_script("cache", "distill", "--config", write_run(folder, checkpoint_every_steps=2))
    assert sorted(path.name for path in (folder / "checkpoints").iterdir()) == ["step_2", "step_4"]
    return folder


def copy_of(run: Path, folder: Path) -> Path:
    """A copy of the finished run in `folder`, with its config file pointing there; returns the config file."""
    shutil.copytree(run, folder, symlinks=True)
    return write_run(folder, checkpoint_every_steps=2)


def test_rerun_into_an_earlier_run(finished_run, tmp_path, capsys):
    config = copy_of(finished_run, tmp_path / "run")
    message = train_script_error(["distill", "--config", config], capsys, leaves_unchanged=tmp_path)
    assert re.fullmatch(r"\S+/run/student and \S+/run/checkpoints hold an earlier distill run, which this one would "
                        r"replace and mix with\. Pass --resume_from_checkpoint latest to continue it, "
                        r"--overwrite_output_dir to start over, or a new --output_dir to keep it\.", message)


def test_rerun_of_teachers_stage(finished_run, tmp_path, capsys, monkeypatch):
    """The same full command twice: the second refuses at its first stage, before it loads anything."""
    config = copy_of(finished_run, tmp_path / "run")

    def load_splits(*args):
        raise AssertionError("the teachers stage went on: it would train the teachers again")

    monkeypatch.setattr(train_mcad, "load_splits", load_splits)
    message = train_script_error(["--config", config], capsys, leaves_unchanged=tmp_path)
    assert re.fullmatch(r"\S+/run/teacher holds the teachers of an earlier run, which the teachers stage would "
                        r"replace\. Leave the teachers stage out to use them \(e\.g\. `train_mcad\.py cache distill "
                        r"evaluate`\), pass --overwrite_output_dir to train them again, or pass a new --output_dir to "
                        r"keep them\.", message)


def test_damaged_training_state_json(finished_run, tmp_path, capsys):
    config = copy_of(finished_run, tmp_path / "run")
    damaged = tmp_path / "run" / "checkpoints" / "step_4"
    (damaged / STATE_FILE).write_text('{"global_step": 4, "epoch": 1, "step_in')  # a disk that filled up
    message = train_script_error(["distill", "--config", config, "--resume_from_checkpoint", damaged],
                                 capsys, leaves_unchanged=tmp_path)
    assert re.fullmatch(rf"{re.escape(str(damaged / STATE_FILE))} is damaged \(JSONDecodeError: .*\)\. Resume from "
                        r"another checkpoint of \S+/run/checkpoints \(step_2\) or from 'latest', which passes over "
                        r"damaged ones, or start without --resume_from_checkpoint\.", message)


def test_cache_of_another_teacher_or_data(finished_run, tiny_teacher, tmp_path, capsys):
    """A cache folder replaced by the cache of another split (as a hand copy would): both its readers refuse it."""
    from modeling_mcad.teacher_cache import build_teacher_cache
    from modeling_mcad.teachers import MCADTeacher

    config = copy_of(finished_run, tmp_path / "run")
    [cache] = (tmp_path / "run" / "cache").iterdir()
    teacher_dir = tmp_path / "run" / "teacher"
    other_split = tiny_teacher[2]
    other = build_teacher_cache(MCADTeacher.from_pretrained(teacher_dir), teacher_dir, other_split, tmp_path / "other",
                                ONE_PROCESS)
    shutil.rmtree(cache)
    shutil.copytree(other, cache)
    shutil.rmtree(tmp_path / "other")
    expected = (rf"The teacher cache {re.escape(str(cache))} was built from another teacher, training data or teacher "
                r"precision than this run's \(data '\w+' there, '\w+' here; captions '\w+' there, '\w+' here; pairs "
                r"\d+ there, \d+ here.*\)\. Rebuild it with `train_mcad\.py cache --overwrite_output_dir` \(or pass a "
                r"new --output_dir to keep it\)\.")
    assert re.fullmatch(expected, train_script_error(["cache", "--config", config], capsys, leaves_unchanged=tmp_path))
    assert re.fullmatch(expected, train_script_error(["distill", "--config", config, "--overwrite_output_dir"],
                                                     capsys, leaves_unchanged=tmp_path))


def test_nonfinite_teacher_cache(finished_run, tmp_path, capsys):
    import datasets

    config = copy_of(finished_run, tmp_path / "run")
    [cache] = (tmp_path / "run" / "cache").iterdir()
    built = datasets.load_from_disk(str(cache))
    rows = built.to_dict()
    rows["teacher_text_embeds"][3][5] = float("nan")
    poisoned = tmp_path / "poisoned"
    datasets.Dataset.from_dict(rows, features=built.features).save_to_disk(str(poisoned))
    shutil.copy(cache / "cache_record.json", poisoned)
    shutil.rmtree(cache)
    poisoned.rename(cache)
    message = train_script_error(["distill", "--config", config, "--overwrite_output_dir"],
                                 capsys, leaves_unchanged=tmp_path)
    assert re.fullmatch(rf"The teacher cache {re.escape(str(cache))} holds non-finite values \(\{{'teacher_text_"
                        r"embeds': 1\}\), which the teacher did not write: the files are damaged\. Rebuild it with "
                        r"`train_mcad\.py cache --overwrite_output_dir`\.", message)


def test_a_rerun_with_overwrite_output_dir_replaces_the_earlier_run(finished_run, tmp_path):
    """
    The earlier run wrote checkpoints of steps 2 and 4; the new one, of 2 steps, writes steps 1 and 2 and keeps them
    (the earlier run's are removed first, not left to outrank them), and its student, log and summary replace the
    earlier ones.
    """
    config = copy_of(finished_run, tmp_path / "run")
    earlier_student = (tmp_path / "run" / "student" / "model.safetensors").read_bytes()
    run_script("distill", "--config", config, "--overwrite_output_dir", "--batch_size", 64,
               "--checkpoint_every_steps", 1)
    run = tmp_path / "run"
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["step_1", "step_2"]
    assert json.loads((run / "checkpoints" / "step_2" / STATE_FILE).read_text())["epoch"] == 1
    assert [json.loads(line)["step"] for line in (run / "distill_log.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((run / "distill_summary.json").read_text())["global_steps"] == 2
    assert (run / "student" / "model.safetensors").read_bytes() != earlier_student

