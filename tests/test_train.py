"""train_mcad.py: configuration, the distillation loop under Accelerate, checkpoints."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from datasets import load_from_disk
from safetensors.torch import load_file

import train_mcad
from modeling_mcad.configuration_mcad import PRESET_VOCABULARY
from modeling_mcad.errors import UserError
from modeling_mcad.teachers import MCADTeacher

from .conftest import REPO_ROOT, run_isolated, snapshot
from .test_teachers import tiny_blip, tiny_clip

# The tiny student without dropout, so runs on different process counts draw no different random numbers.
NO_DROPOUT_STUDENT = {
    "vision_config": {"model_type": "vit", "image_size": 32, "patch_size": 8, "hidden_size": 32,
                      "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    "text_config": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "intermediate_size": 64, "max_position_embeddings": 32, "vocab_size": len(PRESET_VOCABULARY),
                    "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    "projection_dim": 32,
}


# The same thread count everywhere: float sums depend on how work is split across threads.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def write_run(folder: Path, **overrides) -> Path:
    """A run folder holding a saved tiny teacher (CLIP + BLIP) and a config file; returns the config path."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "teacher").exists():
        torch.manual_seed(0)  # every run folder gets the same teacher
        (dual, dual_processor), (fusion, fusion_processor) = tiny_clip(), tiny_blip()
        MCADTeacher.from_teachers(dual, fusion, dual_processor=dual_processor,
                                  fusion_processor=fusion_processor).save_pretrained(folder / "teacher")
    config = {"output_dir": str(folder), "shapes": {"train": 128, "validation": 32, "test": 32, "image_size": 32},
              "student_preset": "tiny", "student_config": NO_DROPOUT_STUDENT, "epochs": 1, "batch_size": 32,
              "log_every_steps": 1, "warmup_steps": 2, "cpu_threads": 1, **overrides}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_script(*args, processes: int = 1, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
                if processes > 1 else [sys.executable])
    result = subprocess.run([*launcher, str(REPO_ROOT / "train_mcad.py"), *map(str, args)], capture_output=True,
                            text=True, timeout=timeout, env=ONE_THREAD)
    if check:
        assert result.returncode == 0, result.stderr[-5000:]
    return result


def losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "distill_log.jsonl").read_text().splitlines()]


# --- configuration --------------------------------------------------------------------------------------------------


def test_demo_config_file_is_the_embedded_default():
    values = yaml.safe_load((REPO_ROOT / "configs" / "demo.yaml").read_text())
    assert train_mcad.TrainConfig.from_sources(None, values) == train_mcad.TrainConfig()


def test_flags_override_the_config_file(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("epochs: 3\nobjective: clip_kd\n")
    stages, config = train_mcad.parse_args(
        ["distill", "--config", str(config_file), "--epochs", "5", "--objective_overrides", "{alpha: 0.5}",
         "--private"]
    )
    assert stages == ["distill"]
    assert (config.epochs, config.objective, config.objective_overrides, config.private) == (5, "clip_kd",
                                                                                             {"alpha": 0.5}, True)
    assert train_mcad.parse_args([])[0] == list(train_mcad.DEFAULT_STAGES)


def test_unknown_options_and_stages_are_named(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("epochs: 3\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['learning_rat'\].*fields of TrainConfig"):
        train_mcad.parse_args(["--config", str(config_file)])
    result = run_script("distil", check=False)
    assert result.returncode == 2 and "unknown stage(s) ['distil']" in result.stderr


def test_distill_batches_whole_families_with_canonical_captions_first(caplog):
    from modeling_mcad.data import flatten_pairs
    from modeling_mcad.shapes import make_shapes

    split = make_shapes(seed=0, train=48, validation=0, test=0, image_size=32)["train"]
    pairs = flatten_pairs(split)
    config = train_mcad.TrainConfig()  # the demo: family batches, canonical captions for 2 epochs
    sampler = train_mcad.training_sampler(config, split, pairs)
    columns = pairs.with_format(None)[:]
    drawn_per_epoch = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        drawn = list(sampler)
        families = [split["family"][columns["image_index"][pair]] for pair in drawn]
        assert families == sorted(families, key=families.index)  # each family's images one after the other
        drawn_per_epoch.append([columns["canonical"][pair] for pair in drawn])
    assert all(all(flags) for flags in drawn_per_epoch[:2])
    assert not all(drawn_per_epoch[2]) and not all(drawn_per_epoch[3])  # then every wording

    plain = split.select_columns(["image", "captions"])  # any other dataset: random batches, every wording
    with caplog.at_level("WARNING", logger="train_mcad"):
        sampler = train_mcad.training_sampler(config, plain, flatten_pairs(plain))
    assert "batch_groups='family' is not a column" in caplog.text and "canonical_epochs=2 needs" in caplog.text
    assert sampler.canonical_epochs == 0


def test_relation_flips_and_mined_captions_are_left_out_of_negclip_negatives_while_captions_are_canonical():
    # Two negatives per example, example by example: swap, flip, swap, flip, ...
    negatives = {"input_ids": torch.arange(12).view(6, 2), "attention_mask": torch.ones(6, 2)}
    columns = ["swapped_caption", "flipped_caption"]
    # The fusion teacher's scores of (caption, swap, flip) per example leave with their negatives.
    targets = {"teacher_image_embeds": torch.zeros(3, 4), "candidate_match_logits": torch.arange(9.0).view(3, 3)}
    kept, kept_targets = train_mcad.canonical_negatives(negatives, targets, columns)
    assert kept["input_ids"].tolist() == [[0, 1], [4, 5], [8, 9]] and kept["attention_mask"].shape == (3, 2)
    assert kept_targets["candidate_match_logits"].tolist() == [[0, 1], [3, 4], [6, 7]]
    assert kept_targets["teacher_image_embeds"] is targets["teacher_image_embeds"]
    assert train_mcad.canonical_negatives(negatives, None, columns)[1] is None
    assert train_mcad.canonical_negatives(negatives, targets, ["swapped_caption"]) == (negatives, targets)
    only_flips = {**targets, "candidate_match_logits": torch.arange(6.0).view(3, 2)}
    none_left, caption_only = train_mcad.canonical_negatives(negatives, only_flips, ["flipped_caption"])
    assert none_left is None and caption_only["candidate_match_logits"].tolist() == [[0], [2], [4]]
    mined, mined_targets = train_mcad.canonical_negatives(negatives, targets, ["mined_caption", "swapped_caption"])
    assert mined["input_ids"].tolist() == [[2, 3], [6, 7], [10, 11]]
    assert mined_targets["candidate_match_logits"].tolist() == [[0, 2], [3, 5], [6, 8]]


def test_the_cache_scores_the_negatives_only_for_a_ranking_objective():
    negatives = ["swapped_caption", "flipped_caption"]
    scored = {objective: train_mcad.ranked_negatives(train_mcad.TrainConfig(objective=objective,
                                                                              negative_captions=negatives))
              for objective in ("mcad_feature", "mcad_feature_rank", "mcad_feature_rank_filter")}
    assert scored == {"mcad_feature": None, "mcad_feature_rank": negatives, "mcad_feature_rank_filter": negatives}
    threshold = {"objective": "contrastive", "objective_overrides": {"match_threshold": 8.0}}
    assert train_mcad.ranked_negatives(train_mcad.TrainConfig(**threshold)) == []  # each caption's own score
    # With negatives named, the same scores as a ranking run's: one cache serves both.
    assert train_mcad.ranked_negatives(train_mcad.TrainConfig(**threshold, negative_captions=negatives)) == negatives


def test_a_clip_text_tower_pools_at_the_student_tokenizers_end_token(tmp_path):
    from .test_teachers import tiny_clip

    tokenizer = tiny_clip()[1].tokenizer
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    student, processor = train_mcad.build_student(train_mcad.TrainConfig(student_tokenizer=str(tmp_path / "tokenizer")))
    text_config = student.config.text_config
    assert text_config.model_type == "clip_text_model"  # the shapes preset
    assert (text_config.vocab_size, text_config.eos_token_id) == (len(tokenizer), tokenizer.eos_token_id)
    inputs = processor(text=["a red circle", "a blue square left of it"], padding=True, return_tensors="pt")
    with torch.no_grad():
        output = student.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    ends = (inputs["input_ids"] == tokenizer.eos_token_id).int().argmax(dim=1)
    assert ends.tolist() == (inputs["attention_mask"].sum(dim=1) - 1).tolist()  # the last real token of each text
    torch.testing.assert_close(output.pooler_output, output.last_hidden_state[torch.arange(2), ends])


# --- the loop -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("objective", [{}, {"objective": "mcad_feature_rank",
                                            "negative_captions": ["swapped_caption", "flipped_caption"],
                                            "objective_overrides": {"ranking_only_steps": 2}}],
                         ids=["default", "ranking"])
def test_two_processes_give_the_losses_of_one(tmp_path, objective):
    """
    Embeddings are gathered with gradients: 2 processes × B/2 train exactly like 1 process × B; with hard negatives
    too, each process's own laid out pair by pair and matched to the gathered teacher scores, and through a ranking
    warm-up (its first 2 steps on L_rank alone, which leaves L_feat's projections a zero gradient under DDP).
    """
    config = write_run(tmp_path / "run", **objective)
    result = run_script("cache", "distill", "--config", config, processes=2)
    assert "num_processes=2" in result.stderr
    summary = json.loads((tmp_path / "run" / "distill_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["samples_per_process"] == [64, 64]
    two_processes = losses(tmp_path / "run")
    if "objective_overrides" in objective:
        log = [json.loads(line) for line in (tmp_path / "run" / "distill_log.jsonl").read_text().splitlines()]
        assert [row["loss"] == row["ranking"] for row in log] == [True, True, False, False]
    sharded_cache = next((tmp_path / "run" / "cache").iterdir())
    sharded_cache.rename(tmp_path / "sharded_cache")
    (tmp_path / "run" / "distill_log.jsonl").unlink()

    run_script("cache", "distill", "--config", config, "--overwrite_output_dir")
    assert len(two_processes) == 4
    assert losses(tmp_path / "run") == pytest.approx(two_processes, rel=1e-5)  # after three optimizer steps too
    # The cache built by two processes, each on its share of the images, is the one-process cache.
    single, sharded = (load_from_disk(str(path)) for path in (sharded_cache, tmp_path / "sharded_cache"))
    assert single.column_names == sharded.column_names and single["pair_index"] == sharded["pair_index"]
    # Absolute tolerances: float16 rounding of embeddings (|x| ≤ 1) and of match logits (|m| up to about 16).
    tolerances = {"teacher_image_embeds": 2e-3, "adapted_text_embeds": 2e-3}
    if "negative_captions" in objective:
        tolerances["candidate_match_logits"] = 2e-2
    for column, tolerance in tolerances.items():
        torch.testing.assert_close(torch.tensor(single[column]), torch.tensor(sharded[column]), atol=tolerance,
                                   rtol=0)


def test_a_ranking_objective_distils_the_fusion_teachers_scores_of_each_captions_negatives(tmp_path):
    negatives = ["swapped_caption", "flipped_caption"]
    # The first epoch draws canonical captions and leaves relation flips out, with their scores; the second has both.
    # Margin 0: a caption the (untrained) fusion teacher scores at most as high as one of its negatives is corrected.
    config = write_run(tmp_path / "run", objective="mcad_feature_rank", negative_captions=negatives, epochs=2,
                       canonical_epochs=1, objective_overrides={"correction_margin": 0.0})
    run_script("cache", "distill", "--config", config)
    log = [json.loads(line) for line in (tmp_path / "run" / "distill_log.jsonl").read_text().splitlines()]
    assert len(log) == 8 and all(row["ranking"] > 0 for row in log)
    assert any(row["corrected_fraction"] > 0 for row in log) and all(row["corrected_fraction"] < 1 for row in log)
    assert len(list((tmp_path / "run" / "cache").iterdir())) == 1  # the cache with the negatives' scores
    # A ranking warm-up as long as the run would never train the rest: refused before anything is replaced.
    refused = run_script("distill", "--config", config, "--overwrite_output_dir", "--objective_overrides",
                         "{ranking_only_steps: 8}", check=False)
    assert refused.returncode == 2 and "ranking_only_steps=8 is not below the run's 8 optimizer steps" in refused.stderr
    assert len((tmp_path / "run" / "distill_log.jsonl").read_text().splitlines()) == 8

    refused = run_script("cache", "--config", write_run(tmp_path / "none", objective="mcad_feature_rank"),
                         check=False)
    assert refused.returncode == 2 and "--negative_captions names none" in refused.stderr
    assert not (tmp_path / "none" / "cache").exists()


def test_mined_captions_join_the_negatives_from_the_plain_cache(tmp_path):
    # The cache stage builds the plain cache, mines each caption's negative from it, then scores the candidates.
    config = write_run(tmp_path / "run", objective="mcad_feature_rank",
                       negative_captions=["swapped_caption", "mined_caption"])
    run_script("cache", "distill", "--config", config)
    log = [json.loads(line) for line in (tmp_path / "run" / "distill_log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(row["ranking"] > 0 for row in log)
    cache = tmp_path / "run" / "cache"
    (mined,) = cache.glob("*.mined_captions.json")
    plain = cache / mined.name.split(".")[0]
    (scored,) = {folder for folder in cache.iterdir() if folder.is_dir()} - {plain}
    assert len(load_from_disk(str(plain)).column_names) == 5  # the targets and the pair index: no scores
    assert len(load_from_disk(str(scored))[0]["candidate_match_logits"]) == 3  # caption, swap, mined
    # A NegCLIP run reads the same mined captions, and scores nothing.
    run_script("distill", "--config", config, "--objective", "contrastive", "--overwrite_output_dir")
    assert len(list(cache.iterdir())) == 3
    assert len((tmp_path / "run" / "distill_log.jsonl").read_text().splitlines()) == 4

    fresh = write_run(tmp_path / "fresh", objective="contrastive", negative_captions=["mined_caption"])
    refused = run_script("distill", "--config", fresh, check=False)
    assert refused.returncode == 2 and "no captions were mined" in refused.stderr


def test_a_correcting_objective_needs_negatives_to_correct_to():
    correcting = {"objective": "contrastive", "objective_overrides": {"correction_margin": 0.1}}
    with pytest.raises(UserError, match="--negative_captions names none"):
        train_mcad.ranked_negatives(train_mcad.TrainConfig(**correcting))
    negatives = ["swapped_caption"]
    assert train_mcad.ranked_negatives(train_mcad.TrainConfig(**correcting, negative_captions=negatives)) == negatives


def test_max_steps_and_an_incomplete_accumulation_count_the_steps_accelerate_takes(tmp_path):
    """128 images in batches of 32: 4 batches a pass. Accumulating 3, Accelerate also steps on a pass's last, lone
    batch (2 steps a pass, 4 in 2 epochs, the schedule's length); max_steps 5 runs into a second pass and stops."""
    config = write_run(tmp_path / "run", objective="contrastive", epochs=2, gradient_accumulation_steps=3)
    run_script("distill", "--config", config)
    summary = json.loads((tmp_path / "run" / "distill_summary.json").read_text())
    assert summary["global_steps"] == 4 and len(losses(tmp_path / "run")) == 4
    rates = [json.loads(line)["lr"] for line in (tmp_path / "run" / "distill_log.jsonl").read_text().splitlines()]
    assert all(later < earlier for earlier, later in zip(rates[1:], rates[2:]))  # one cosine to the 4th step

    run_script("distill", "--config", config, "--gradient_accumulation_steps", 1, "--max_steps", 5,
               "--overwrite_output_dir")
    summary = json.loads((tmp_path / "run" / "distill_summary.json").read_text())
    assert summary["global_steps"] == 5 and summary["samples_per_process"] == [5 * 32]


@pytest.mark.slow
def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path):
    config = write_run(tmp_path / "run", objective="contrastive", learning_rate=1e25, epochs=3,
                       max_nonfinite_steps=3, warmup_steps=0)
    result = run_script("distill", "--config", config, check=False)
    assert result.returncode != 0
    assert "non-finite loss at step" in result.stderr and "skipped" in result.stderr
    assert "3 non-finite losses in a row" in result.stderr and "Lower --learning_rate" in result.stderr


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_student(tmp_path):
    """
    SIGKILL once the checkpoint of step 14 (of 48) or a later one is written and the log holds a step after it,
    resume from 'latest': the newest checkpoints survived, the run resumes from the newest, logs every step once and
    ends with the reference run's losses and weights.
    """
    overrides = {"epochs": 6, "checkpoint_every_steps": 2, "batch_size": 16, "student_config": None}
    reference = write_run(tmp_path / "reference", **overrides)
    run_script("cache", "distill", "--config", reference)

    interrupted = write_run(tmp_path / "interrupted", **overrides)
    run_script("cache", "--config", interrupted)
    # Past the first keep_checkpoints (2) checkpoints: a pruning that deleted the newest would never get there.
    kill_after = 14
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "train_mcad.py"), "distill", "--config",
                                str(interrupted)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=ONE_THREAD)
    checkpoints = tmp_path / "interrupted" / "checkpoints"

    log = tmp_path / "interrupted" / "distill_log.jsonl"

    def steps() -> list[int]:
        return sorted(int(p.name.split("_")[1]) for p in checkpoints.glob("step_*")) if checkpoints.exists() else []

    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        # One log row per step: the run has logged a step its newest checkpoint does not hold.
        if steps() and max(steps()) >= kill_after and len(log.read_text().splitlines()) > max(steps()):
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "interrupted" / "student").exists()
    kept = steps()  # the two newest (a third when the kill came before the pruning)
    assert kept[-1] >= kill_after and kept[-2] == kept[-1] - 2 and len(kept) <= 3, kept

    result = run_script("distill", "--config", interrupted, "--resume_from_checkpoint", "latest")
    assert f"resumed from {checkpoints / f'step_{kept[-1]}'} " in result.stderr
    assert losses(tmp_path / "interrupted") == pytest.approx(losses(tmp_path / "reference"), rel=1e-5)
    # TensorBoard, too, shows each step once: the resumed run purges what the killed one logged after its checkpoint.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "interrupted" / "logs" / "distill")).Reload()
    steps_logged = [event.step for event in events.Scalars("loss")]
    assert steps_logged == sorted(set(steps_logged)) and len(steps_logged) == len(losses(tmp_path / "reference"))
    expected = load_file(tmp_path / "reference" / "student" / "model.safetensors")
    resumed = load_file(tmp_path / "interrupted" / "student" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_smoke_config_runs_every_stage_and_saves_a_loadable_student(tmp_path):
    output = tmp_path / "smoke"
    result = run_script("--config", REPO_ROOT / "configs" / "smoke.yaml", "--output_dir", output)
    assert "num_processes=1" in result.stderr
    # Every stage shows its progress, and the run ends with each stage's time and output.
    for bar in ("dual teacher:", "fusion teacher:", "adapter fit:", "teacher cache:", "distill (mcad_feature):",
                "evaluating: images:"):
        assert bar in result.stderr, bar
    for stage, written in (("teachers", output / "teacher"), ("cache", output / "cache"),
                           ("distill", output / "student"), ("evaluate", output / "results.md")):
        assert f"| {stage} | " in result.stdout and str(written) in result.stdout
    # The same command again, in another folder, gives the same results to the last digit.
    again = tmp_path / "again"
    run_script("--config", REPO_ROOT / "configs" / "smoke.yaml", "--output_dir", again)
    assert (again / "results.json").read_text() == (output / "results.json").read_text()
    results = json.loads((output / "results.json").read_text())
    assert {"dual teacher", "fusion teacher (re-ranks dual top-10)", "student (mcad_feature)"} <= set(results)
    assert all(0 <= results["student (mcad_feature)"][key] <= 100 for key in ("i2t_r1", "t2i_r10", "swap_accuracy"))
    assert "| student (mcad_feature) |" in result.stdout  # the printed table
    report = json.loads((output / "teacher_report.json").read_text())
    assert set(report["gates"]["validation"]) >= {"dual_beats_matchers", "fusion_beats_dual_binding", "passed"}
    loaded = run_isolated(
        f"""
        import json
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(output / 'student')!r}, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained({str(output / 'student')!r}, trust_remote_code=True)
        print(json.dumps({{"model": type(model).__name__, "processor": type(processor).__name__}}))
        """,
        tmp_path,
    )
    assert loaded == {"model": "MCADModel", "processor": "MCADProcessor"}


def own_photos(folder: Path, images: dict[str, int], seed: int = 0) -> Path:
    """
    An imagefolder of a user's own photos, nothing of mcad-shapes in it: counts of coloured blobs on a backdrop,
    captioned in other words ("three teal lanterns against a dusk sky", "a lone ochre kite ..."), several wordings
    per image, no scene graph, no distractors.
    """
    import random

    from PIL import Image, ImageDraw

    colours = {"teal": (0, 128, 128), "ochre": (204, 119, 34), "crimson": (220, 20, 60), "lilac": (200, 162, 200)}
    things = ["lanterns", "kites", "mugs", "pebbles"]
    backdrops = {"a dusk sky": (40, 40, 90), "sand": (230, 210, 160), "snow": (245, 245, 245)}
    counts = ["a lone", "two", "three", "4"]
    rng = random.Random(seed)
    for split, count in images.items():
        (folder / split).mkdir(parents=True)
        rows = []
        for index in range(count):
            colour, thing, backdrop = rng.choice(list(colours)), rng.choice(things), rng.choice(list(backdrops))
            number = rng.randrange(4)
            image = Image.new("RGB", (40, 40), backdrops[backdrop])
            draw = ImageDraw.Draw(image)
            for blob in range(number + 1):
                x, y = rng.randrange(30), rng.randrange(30)
                draw.ellipse([x, y, x + 8 + 2 * things.index(thing), y + 8], fill=colours[colour])
            image.save(folder / split / f"{index}.jpg")
            singular = thing[:-1] if number == 0 else thing
            rows.append({"file_name": f"{index}.jpg", "captions": [
                f"{counts[number]} {colour} {singular} against {backdrop}",
                f"photo: {singular} ({colour}) x{number + 1}, on {backdrop}",
            ]})
        (folder / split / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return folder


@pytest.mark.slow
def test_own_photos_that_are_not_mcad_shapes_run_through_every_stage(tmp_path):
    """The default teachers on a user's own data: the teachers stage trains both from scratch with the generic
    recipe (the fusion teacher by matching against negatives the dual teacher mines), reports the gates measured on
    the user's validation split, and every later stage runs; a failed gate is in the report, not hidden."""
    photos = own_photos(tmp_path / "photos", {"train": 64, "validation": 16, "test": 16})
    output = tmp_path / "run"
    result = run_script("teachers", "cache", "distill", "evaluate", "export", "push", "--config",
                        REPO_ROOT / "configs" / "smoke.yaml", "--dataset", photos, "--output_dir", output,
                        "--batch_size", 16, "--fusion_teacher_training", "{epochs: 2, batch_size: 16}",
                        "--batch_groups", "null", "--canonical_epochs", 0, "--repo_id", "you/own-photos",
                        "--dry_run", tmp_path / "hub")
    assert "the fusion teacher trains with train_fusion_teacher" in result.stderr
    report = json.loads((output / "teacher_report.json").read_text())
    gates = report["gates"]["validation"]
    assert set(gates) == {"dual_beats_matchers", "reranking_beats_dual", "passed"}
    assert gates["passed"] == (gates["dual_beats_matchers"] and gates["reranking_beats_dual"])
    assert "gates: dual_beats_matchers " in result.stdout and "chance (random embeddings)" in report["validation_rows"]
    results = json.loads((output / "results.json").read_text())
    assert list(results) == ["dual teacher", "fusion teacher (re-ranks dual top-10)", "chance (random embeddings)",
                             "student (mcad_feature)"]
    assert results["student (mcad_feature)"]["rsum"] > 0 and "swap_accuracy" not in results["dual teacher"]
    assert (tmp_path / "hub" / "model.safetensors").is_file() and (tmp_path / "hub" / "README.md").is_file()


def test_push_publishes_the_teacher_and_another_run_distils_from_it(exported_student, tmp_path):
    """The modified teacher as a Hub citizen: push writes it (code, processors, adapter, report, card) beside the
    student; it loads where the package is absent; another run distils from the published folder."""
    run, smoke = tmp_path / "run", REPO_ROOT / "configs" / "smoke.yaml"
    run_script("teachers", "--config", smoke, "--output_dir", run)
    shutil.copytree(exported_student[0], run / "export")  # push needs an export; any student's will do here
    teacher_before = snapshot(run / "teacher")
    run_script("push", "--config", smoke, "--output_dir", run, "--repo_id", "mcad-tests/student",
               "--teacher_repo_id", "mcad-tests/teacher", "--dry_run", tmp_path / "hub")
    published = tmp_path / "hub-teacher"
    assert snapshot(run / "teacher") == teacher_before  # the card and report go to the published copy only
    assert {"README.md", "teacher_report.json", "teachers.py", "fusion_model.py", "cross_encoders.py",
            "model.safetensors", "dual_processor/processor_config.json"} <= set(snapshot(published))
    assert "README.md" in snapshot(tmp_path / "hub") and "teachers.py" not in snapshot(tmp_path / "hub")
    card = (published / "README.md").read_text()
    report = json.loads((run / "teacher_report.json").read_text())
    assert "--teacher mcad-tests/teacher" in card and 'from_pretrained("mcad-tests/teacher", trust_remote_code=True)' \
        in card
    assert "`clip`" in card and "`mcad_fusion`" in card and "`one_sided` objective" in card
    for gate, passed in report["gates"]["validation"].items():
        if gate not in ("passed", "fusion_binding_above_90"):  # the second is an aim, shown as such
            assert f"| {gate} | {'yes' if passed else 'no'} |" in card
    assert f"| dual teacher | {report['validation_rows']['dual teacher']['rsum']:.1f} |" in card

    pixels = torch.rand(2, 3, 32, 32)
    torch.save(pixels, tmp_path / "pixels.pt")
    loaded = run_isolated(
        f"""
        import json, torch
        from transformers import AutoModel
        teacher = AutoModel.from_pretrained({str(published)!r}, trust_remote_code=True)
        images = teacher.encode_images(torch.load({str(tmp_path / "pixels.pt")!r}))
        print(json.dumps({{"fusion": type(teacher.fusion).__name__, "images": images.tolist()}}))
        """,
        tmp_path,
    )
    assert loaded["fusion"] == "MCADFusionCrossEncoder"
    torch.testing.assert_close(torch.tensor(loaded["images"]),
                               MCADTeacher.from_pretrained(run / "teacher").encode_images(pixels))

    other = tmp_path / "other"
    run_script("cache", "distill", "--config", smoke, "--output_dir", other, "--teacher", published)
    assert (other / "student" / "model.safetensors").is_file() and not (other / "teacher").exists()


def test_a_run_folder_linked_to_shared_data_and_cache_distils_from_that_cache(tmp_path):
    # benchmarks/distill_table.py: teachers, data and cache once in a root, one linked run folder per student.
    root = tmp_path / "root"
    run_script("cache", "--config", write_run(root))
    run = tmp_path / "run"
    run.mkdir()
    for shared in ("data", "teacher", "cache"):
        (run / shared).symlink_to(root / shared, target_is_directory=True)
    result = run_script("distill", "--config", write_run(run), check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((root / "cache").iterdir())) == 1  # read, not built again
    assert (run / "student" / "model.safetensors").exists()
