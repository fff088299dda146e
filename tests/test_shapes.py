import itertools
import json
import re
from collections import Counter

import datasets
import numpy as np
import pytest

from modeling_mcad.evaluation import retrieval_metrics
from modeling_mcad.shapes import (
    COLOURS,
    SHAPES,
    caption_grounding,
    caption_is_true,
    make_shapes,
    matcher_embeddings,
    to_imagefolder,
)

# An independent reading of the captions, from the words alone, to check them against the scene's coordinates.
SIZE = {"small": "small", "little": "small", "large": "large", "big": "large"}
OBJECT = re.compile(rf"(?:({'|'.join(SIZE)}) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})")
RELATION = {"left": ("x", True), "right": ("x", False), "above": ("y", True), "over": ("y", True),
            "below": ("y", False), "under": ("y", False)}


def read_caption(caption: str) -> tuple[list[tuple], tuple | None]:
    """(objects named, in order, as (size, colour, shape)), and (axis, first-is-before) for a relation, or None."""
    named = [(SIZE.get(size), colour, shape) for size, colour, shape in OBJECT.findall(caption)]
    relations = [RELATION[word] for word in caption.split() if word in RELATION]
    assert len(relations) <= 1, caption
    return named, relations[0] if relations else None


def is_true(caption: str, scene: dict) -> bool:
    named, relation = read_caption(caption)
    objects = scene["objects"]

    def fits(obj, said):
        return all(s is None or s == value for s, value in zip(said, (obj["size"], obj["colour"], obj["shape"])))

    candidates = [[i for i, obj in enumerate(objects) if fits(obj, said)] for said in named]
    for choice in itertools.product(*candidates):
        if len(set(choice)) < len(choice):
            continue
        if relation is None:
            return True
        axis, before = relation
        if (objects[choice[0]][axis] < objects[choice[1]][axis]) == before:
            return True
    return False


@pytest.fixture(scope="module")
def benchmark():
    return make_shapes(seed=0, image_size=64, train=0, validation=0, test=200)["test"]


KNOB_SETTINGS = {
    "default": {},
    "three_objects": {"min_objects": 3, "max_objects": 3},
    "one_to_three": {"min_objects": 1, "max_objects": 3},
    "no_relations": {"relations": False, "num_shapes": 2},
    "easy": {"num_colors": 3, "num_shapes": 3, "num_sizes": 1, "min_objects": 1, "max_objects": 1},
}


@pytest.mark.parametrize("knobs", KNOB_SETTINGS.values(), ids=KNOB_SETTINGS.keys())
def test_captions_are_true_and_distractors_false(knobs):
    split = make_shapes(seed=1, image_size=32, train=0, validation=0, test=60, **knobs)["test"]
    for row in split:
        scene = json.loads(row["scene"])
        assert len(row["captions"]) == 5 and len(set(row["captions"])) == 5
        for caption, canonical, swapped, flipped in zip(row["captions"], row["canonical"], row["swapped_captions"],
                                                        row["flipped_captions"]):
            assert is_true(caption, scene), (caption, scene)
            for distractor in (swapped, flipped):
                assert distractor is None or not is_true(distractor, scene), (distractor, scene)
            named, relation = read_caption(caption)
            if relation is not None:
                assert canonical == relation[1]  # canonical wordings say the first object is left / above
                assert swapped is not None and flipped is not None
            else:
                assert flipped is None
                axis = "x" if scene["axis"] == "horizontal" else "y"
                order = sorted(scene["objects"], key=lambda obj: obj[axis])
                in_order = [(obj["size"], obj["colour"], obj["shape"]) for obj in order]
                assert canonical == ([tuple(n[1:]) for n in named] == [o[1:] for o in in_order])
        if len(scene["objects"]) > 1:  # a curriculum starts from the canonical wordings, then all
            assert 2 <= sum(row["canonical"]) <= 3


def test_caption_truth_and_grounding_agree_with_an_independent_reading_across_a_family(benchmark):
    scenes, families = benchmark["scene"], benchmark["family"]
    outcomes = Counter()
    for captions, flipped, family in zip(benchmark["captions"], benchmark["flipped_captions"], families):
        siblings = [other for other, its_family in enumerate(families) if its_family == family]
        for caption in captions + [distractor for distractor in flipped if distractor is not None]:
            for other in siblings:  # a sibling may or may not fit another image's caption: both must be read right
                scene = json.loads(scenes[other])
                truth = is_true(caption, scene)
                assert caption_is_true(caption, scenes[other]) == truth, (caption, scene)
                outcomes[truth] += 1
                centres = caption_grounding(caption, scene)
                if not truth:
                    assert centres is None
                    continue
                named, relation = read_caption(caption)
                found = [next(o for o in scene["objects"] if (o["x"], o["y"]) == centre) for centre in centres]
                assert [(o["size"] if size else None, o["colour"], o["shape"]) for o, (size, _, _) in
                        zip(found, named)] == named  # the named objects, in naming order
                if relation is not None:
                    axis, before = relation
                    assert (found[0][axis] < found[1][axis]) == before
    assert outcomes[True] > 100 and outcomes[False] > 100
    with pytest.raises(ValueError, match="names no shape"):
        caption_is_true("a photo of a dog", scenes[0])


def test_same_seed_same_bytes_other_seed_other_images():
    first = make_shapes(seed=5, image_size=32, train=6, validation=3, test=3)
    again = make_shapes(seed=5, image_size=32, train=6, validation=3, test=3)
    other = make_shapes(seed=6, image_size=32, train=6, validation=3, test=3)
    for name in ("train", "validation", "test"):
        raw = [d[name].cast_column("image", datasets.Image(decode=False)) for d in (first, again, other)]
        assert raw[0][:] == raw[1][:]
        assert [i["bytes"] for i in raw[0]["image"]] != [i["bytes"] for i in raw[2]["image"]]
    assert first["train"]["captions"] != first["test"]["captions"][:3]  # each split its own stream


def test_caption_noise_makes_that_share_of_training_captions_false_and_nothing_else():
    clean = make_shapes(seed=5, image_size=16, train=150, validation=20, test=20)
    noisy = make_shapes(seed=5, image_size=16, train=150, validation=20, test=20, caption_noise=0.4)
    for name in ("validation", "test"):  # clean splits, the same bytes
        assert noisy[name].cast_column("image", datasets.Image(decode=False))[:] == \
            clean[name].cast_column("image", datasets.Image(decode=False))[:]
    train, original = noisy["train"], clean["train"]
    assert train["scene"] == original["scene"] and train["family"] == original["family"]
    changed = false = undone = wrong_distractors = true_distractors = 0
    for row, before in zip(train, original):
        for place, (caption, true_caption) in enumerate(zip(row["captions"], before["captions"])):
            if caption != true_caption:
                changed += 1
                false += not caption_is_true(caption, row["scene"])
                assert not row["canonical"][place]
                # Its distractors are its own text's, as a rule-based miner makes them: for a colour swap or a
                # relation flip, undoing it gives back the true caption; the others are almost always false (both
                # rules on two objects of one shape and size can give a true statement).
                distractors = {row["swapped_captions"][place], row["flipped_captions"][place]}
                assert None not in distractors and caption not in distractors
                undone += true_caption in distractors
                wrong_distractors += sum(text != true_caption for text in distractors)
                true_distractors += sum(text != true_caption and caption_is_true(text, row["scene"])
                                        for text in distractors)
            else:
                assert row["swapped_captions"][place] == before["swapped_captions"][place]
                assert row["canonical"][place] == before["canonical"][place]
    assert 0.33 < changed / 750 < 0.47 and false / changed > 0.97  # another family's caption is rarely also true
    assert 0.55 < undone / changed < 0.78  # two of the three kinds of noise
    assert true_distractors / wrong_distractors < 0.03
    with pytest.raises(ValueError, match="caption_noise"):
        make_shapes(train=1, validation=0, test=0, caption_noise=1.5)


def test_images_show_the_scene(benchmark):
    """Each object's centre pixel has its colour (nearest palette colour), and the image has the asked size."""
    palette = np.array(list(COLOURS.values()))
    for row in benchmark.select(range(40)):
        image = np.asarray(row["image"])
        assert image.shape == (64, 64, 3)
        for obj in json.loads(row["scene"])["objects"]:
            pixel = image[int(obj["y"] * 64), int(obj["x"] * 64)].astype(int)
            assert list(COLOURS)[np.abs(palette - pixel).sum(axis=1).argmin()] == obj["colour"]


def _edit(base: list[dict], variant: list[dict]) -> str | None:
    """How a variant's objects differ from the base's: one kind of edit, or None when it is not one edit."""
    keys = ("size", "colour", "shape")
    b, v = ([tuple(obj[k] for k in keys) for obj in objects] for objects in (base, variant))
    changed = [i for i in range(len(b)) if b[i] != v[i]]
    if len(changed) == 1:
        differing = [k for k, before, after in zip(keys, b[changed[0]], v[changed[0]]) if before != after]
        return differing[0] if len(differing) == 1 else None
    if len(changed) == 2:
        i, j = changed
        if (v[i], v[j]) == (b[j], b[i]):
            return "places"
        if v[i] == (b[i][0], b[j][1], b[i][2]) and v[j] == (b[j][0], b[i][1], b[j][2]):
            return "colours"
    return None


def test_gallery_holds_families_of_near_duplicates_with_distinct_descriptions(benchmark):
    scenes = [json.loads(scene) for scene in benchmark["scene"]]
    descriptions = [(s["axis"], tuple((o["size"], o["colour"], o["shape"]) for o in s["objects"])) for s in scenes]
    assert len(set(descriptions)) == len(descriptions)  # no two test images share their true captions

    families: dict[int, list[dict]] = {}
    for family, scene in zip(benchmark["family"], scenes):
        families.setdefault(family, []).append(scene)
    edits = Counter()
    for members in families.values():
        base = members[0]
        for variant in members[1:]:
            same_axis = variant["axis"] == base["axis"]
            edit = _edit(base["objects"], variant["objects"])
            assert same_axis and edit is not None, (base, variant)
            edits[edit] += 1
    # Binding (colours swapped) and relation (places swapped) twins are in nearly every family, attribute edits too.
    assert edits["colours"] >= 0.8 * len(families) and edits["places"] >= 0.5 * len(families)
    assert edits["colour"] and edits["shape"] and edits["size"]
    assert all(len(members) == 4 for members in families.values())


def test_knobs_limit_words_and_objects():
    split = make_shapes(seed=2, image_size=32, train=0, validation=0, test=40, num_colors=3, num_shapes=2,
                        num_sizes=1, min_objects=1, max_objects=3, relations=False)["test"]
    words = {word for captions in split["captions"] for caption in captions for word in re.findall(r"[a-z]+", caption)}
    assert words & set(COLOURS) == set(list(COLOURS)[:3])
    assert words & set(SHAPES) == set(SHAPES[:2])
    assert not words & set(SIZE) and not words & set(RELATION)
    counts = Counter(len(json.loads(scene)["objects"]) for scene in split["scene"])
    assert set(counts) == {1, 2, 3}
    assert all(flipped is None for row in split["flipped_captions"] for flipped in row)


@pytest.mark.parametrize("knobs, message", [
    ({"min_objects": 2, "max_objects": 4}, "max_objects"),
    ({"num_colors": 2, "max_objects": 3, "min_objects": 3}, "own colour"),
    ({"num_shapes": 9}, "num_shapes"),
    ({"num_sizes": 3}, "num_sizes"),
    ({"image_size": 8}, "too small"),
    ({"test": -1}, "negative"),
])
def test_bad_knobs_are_named(knobs, message):
    with pytest.raises(ValueError, match=message):
        make_shapes(train=0, validation=0, **{"test": 1, **knobs})


def test_imagefolder_reads_back_offline(tmp_path):
    generated = make_shapes(seed=4, image_size=32, train=5, validation=3, test=2)
    folder = to_imagefolder(generated, tmp_path / "shapes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]  # no temporary folder left behind
    loaded = datasets.load_dataset("imagefolder", data_dir=str(folder))
    assert set(loaded) == {"train", "validation", "test"}
    for name, split in generated.items():
        assert len(loaded[name]) == len(split)
        for column in ("captions", "canonical", "swapped_captions", "flipped_captions", "scene", "family"):
            assert loaded[name][column] == split[column], column
        for ours, theirs in zip(split["image"], loaded[name]["image"]):
            assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    # Empty splits are left out: a metadata.jsonl without images would turn the folder into a JSON dataset.
    only_test = to_imagefolder(make_shapes(image_size=32, train=0, validation=0, test=2), tmp_path / "only_test")
    assert set(datasets.load_dataset("imagefolder", data_dir=str(only_test))) == {"test"}


def test_bag_of_words_matchers_fail_on_the_benchmark_but_not_on_distinct_bags(benchmark):
    """On the gallery, colour/shape bags cannot tell a family apart. Positive control: when every image has its own
    bag of colour and shape words (one object, one size, no families), the same matcher is perfect."""
    for matcher in ("word_overlap", "colour_shape", "colour_shape_orientation"):
        metrics = retrieval_metrics(*matcher_embeddings(benchmark, matcher))
        assert metrics["t2i_r1"] < 60 and metrics["i2t_r1"] < 60, (matcher, metrics)

    distinct = make_shapes(seed=0, image_size=16, train=0, validation=0, test=30, min_objects=1, max_objects=1,
                           num_colors=8, num_shapes=6, num_sizes=1, family_size=1)["test"]
    metrics = retrieval_metrics(*matcher_embeddings(distinct, "colour_shape"))
    assert metrics["i2t_r1"] == metrics["t2i_r1"] == 100.0
    with pytest.raises(ValueError, match="Unknown matcher"):
        matcher_embeddings(distinct, "colours")


def test_module_docstring_documents_every_column():
    import modeling_mcad.shapes.generator as shapes

    for column in make_shapes(train=0, validation=0, test=1)["test"].column_names:
        assert f"`{column}`" in shapes.__doc__
