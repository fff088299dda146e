"""benchmarks/transfer_table.py: the committed results resume a setting only where new seeds pair with them."""

import dataclasses
import json
import sys

import pytest
import torch

from .conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import transfer_table  # noqa: E402

from modeling_mcad.objectives import objective_settings  # noqa: E402

FUSION = "fusion teacher (re-ranks dual top-10)"
TEACHERS = {"dual teacher": {"rsum": 469.76, "binding_accuracy": 71.06}, FUSION: {"rsum": 473.84},
            "bag of words (colour_shape)": {"rsum": 425.16}}
STUDENTS = {"shapes": {"seed": 7, "train": 500}, "epochs": 128}


def finished(row: str, objective: str, seed: int, rsum: float) -> dict:
    """A `distill_run` result as the script reads it from a run folder."""
    metrics = {key: rsum / 10 for key in transfer_table.METRICS}
    return {"row": row, "seed": seed, "settings": dataclasses.asdict(objective_settings(objective)),
            **metrics, "rsum": rsum, "validation": {"rsum": rsum + 1}}


def recorded_entry(rows=(("contrastive", 400), ("mcad_feature", 410))) -> dict:
    results = [finished(row, row, seed, rsum + 3 * seed) for row, rsum in rows for seed in (0, 1)]
    # Through JSON, as the entry is committed and read back on another machine.
    return json.loads(json.dumps(transfer_table.summary("tiny", "teacher", STUDENTS, TEACHERS, {}, results)))


def test_recorded_seeds_come_back_as_the_results_they_were_made_from():
    recorded = transfer_table.recorded_results(recorded_entry(), STUDENTS, TEACHERS)
    assert sorted(recorded) == [("contrastive", 0), ("contrastive", 1), ("mcad_feature", 0), ("mcad_feature", 1)]
    again = transfer_table.summary("tiny", "teacher", STUDENTS, TEACHERS, {}, list(recorded.values()))
    assert again == recorded_entry()  # summarising the recorded results reproduces the entry
    assert again["paired_chosen_minus_row"]["contrastive"]["rsum"]["mean"] == pytest.approx(10.0)


@pytest.mark.parametrize("change", ["teachers", "students", "row settings"])
def test_recorded_seeds_are_refused_when_new_ones_could_not_be_paired_with_them(change):
    entry, students, teachers = recorded_entry(), STUDENTS, TEACHERS
    if change == "teachers":  # e.g. teachers retrained on another CPU, which came out different
        teachers = {**TEACHERS, "dual teacher": {"rsum": 467.6, "binding_accuracy": 71.6}}
    elif change == "students":
        students = {**STUDENTS, "epochs": 64}
    else:  # the row's preset changed since the seeds were trained
        entry["rows"]["mcad_feature"]["settings"]["alpha"] = 1.0
    with pytest.raises(SystemExit, match="could not be paired"):
        transfer_table.recorded_results(entry, students, teachers)


def test_recorded_seeds_from_before_a_knob_was_added_still_pair_when_it_is_at_its_default():
    entry = recorded_entry()
    for row in entry["rows"].values():  # as recorded before lambda_rank existed
        del row["settings"]["lambda_rank"]
    assert len(transfer_table.recorded_results(entry, STUDENTS, TEACHERS)) == 4
    entry["rows"]["mcad_feature"]["settings"]["lambda_rank"] = 1.0  # another objective than the row's now
    with pytest.raises(SystemExit, match="could not be paired"):
        transfer_table.recorded_results(entry, STUDENTS, TEACHERS)


def test_a_setting_without_recorded_entry_resumes_nothing():
    assert transfer_table.recorded_results({}, STUDENTS, TEACHERS) == {}


def test_a_row_is_refused_only_when_a_teacher_it_reads_has_changed():
    entry = recorded_entry((("contrastive", 400), ("clip_kd", 405), ("mcad_feature", 410)))
    other_fusion = {**TEACHERS, FUSION: {"rsum": 490.0}}  # e.g. the fusion teacher trained longer
    with pytest.raises(SystemExit, match="'mcad_feature' was trained with other teachers"):
        transfer_table.recorded_results(entry, STUDENTS, other_fusion)
    del entry["rows"]["mcad_feature"]  # the rows of the fusion teacher removed: the others pair with new seeds
    assert sorted(transfer_table.recorded_results(entry, STUDENTS, other_fusion)) == [
        ("clip_kd", 0), ("clip_kd", 1), ("contrastive", 0), ("contrastive", 1)]
    other_dual = {**other_fusion, "dual teacher": {"rsum": 467.6}}
    with pytest.raises(SystemExit, match="'clip_kd' was trained with other teachers"):
        transfer_table.recorded_results(entry, STUDENTS, other_dual)
    del entry["rows"]["clip_kd"]
    assert len(transfer_table.recorded_results(entry, STUDENTS, other_dual)) == 2  # contrastive reads no teacher
    other_words = {**TEACHERS, "bag of words (colour_shape)": {"rsum": 1.0}}  # not a teacher any row reads
    assert len(transfer_table.recorded_results(recorded_entry(), STUDENTS, other_words)) == 4


def test_the_mcad_variant_is_chosen_on_the_seeds_every_variant_ran():
    # mcad_feature leads on seeds 0 and 1; mcad_feature_rank's extra seeds 2 and 3 would lift its mean past it.
    results = [finished("mcad_feature", "mcad_feature", seed, 410) for seed in (0, 1)]
    results += [finished("mcad_feature_rank", "mcad_feature_rank", seed, rsum)
                for seed, rsum in ((0, 405), (1, 405), (2, 430), (3, 430))]
    entry = transfer_table.summary("tiny", "teacher", STUDENTS, TEACHERS, {}, results)
    assert entry["chosen"] == "mcad_feature"
    assert entry["paired_chosen_minus_row"]["mcad_feature_rank"]["rsum"] == {"mean": 5.0, "standard_error": 0.0,
                                                                           "seeds": 2}


def test_the_wide_setting_is_tiny_with_a_wider_student_whose_seeds_never_pair_with_tinys(tmp_path):
    from modeling_mcad import MCADConfig, MCADModel

    tiny = transfer_table.student_base(tmp_path, "tiny", tmp_path)
    wide = transfer_table.student_base(tmp_path, "tiny_wide", tmp_path)
    assert {key: value for key, value in wide.items() if key != "student_config"} == tiny
    tiny_students = json.loads(json.dumps(transfer_table.student_settings(tiny)))
    entry = {**recorded_entry(), "students": tiny_students}
    assert len(transfer_table.recorded_results(entry, transfer_table.student_settings(tiny), TEACHERS)) == 4
    with pytest.raises(SystemExit, match="students' settings"):  # tiny's recorded seeds are not the wide student's
        transfer_table.recorded_results(entry, transfer_table.student_settings(wide), TEACHERS)
    config, shapes = MCADConfig(**wide["student_config"]), MCADConfig.from_preset("shapes")
    assert config.vision_config.num_hidden_layers > shapes.vision_config.num_hidden_layers
    assert config.text_config.num_hidden_layers > shapes.text_config.num_hidden_layers
    model = MCADModel(config).eval()
    pixels = torch.rand(2, 3, config.vision_config.image_size, config.vision_config.image_size)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels).pooler_output
    assert features.shape == (2, config.projection_dim) and config.projection_dim > shapes.projection_dim


def test_each_setting_of_the_section_shows_the_command_that_wrote_it():
    tiny = {**recorded_entry(), "command": "python benchmarks/transfer_table.py --settings tiny --seeds 0 1"}
    wide = {**recorded_entry(), "description": "wide", "command": "python benchmarks/transfer_table.py --settings "
            "tiny_wide --rows contrastive"}
    text = transfer_table.markdown({"settings": {"tiny": tiny, "tiny_wide": wide}})
    tiny_part, wide_part = text.split("### `tiny_wide`")
    assert tiny["command"] in tiny_part.split("### `tiny`")[1] and wide["command"] not in tiny_part
    assert wide["command"] in wide_part and tiny["command"] not in wide_part


def test_results_keep_the_settings_order_and_any_setting_no_longer_defined():
    entries = {"noisy": 1, "renamed": 2, "tiny": 3}
    assert list(transfer_table.in_settings_order(entries)) == ["tiny", "noisy", "renamed"]


def test_the_label_audit_counts_what_the_correction_filter_and_agreeing_ranking_do_to_each_kind_of_caption():
    true, swapped, flipped, borrowed = transfer_table.CAPTION_KINDS
    kinds = [true, swapped, flipped, borrowed, true]
    caption = torch.tensor([0, 3, 6, 9, 13])
    negatives = torch.tensor([[1, 2], [4, 5], [7, 8], [10, 11], [14, 15]])
    true_caption = torch.tensor([0, 4, 8, 12, 13])
    logits = torch.tensor([
        [12.0, 11.0, 11.5],  # right, and the teacher agrees
        [11.0, 11.5, 10.0],  # wrong; its swap (the truth) scores 0.5 above: corrected, then ranked first
        [11.0, 10.0, 11.05],  # wrong; the truth scores within the margin: kept as it is, not ranked
        [2.0, 2.5, 1.0],  # another image's: corrected to its own distractor, still below the filter
        [11.0, 11.2, 9.0],  # right, but the teacher prefers a distractor: corrected away from the truth
    ])
    audit = transfer_table.label_audit(kinds, caption, negatives, true_caption, logits)
    assert audit == {
        true: {"pairs": 2, "corrected": 1, "true_after_correction": 1, "kept": 2, "ranked": 2},
        swapped: {"pairs": 1, "corrected": 1, "true_after_correction": 1, "kept": 1, "ranked": 1},
        flipped: {"pairs": 1, "corrected": 0, "true_after_correction": 0, "kept": 1, "ranked": 0},
        borrowed: {"pairs": 1, "corrected": 1, "true_after_correction": 0, "kept": 0, "ranked": 0},
    }
