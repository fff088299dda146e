"""The Hub's dataset layouts, as published, on local replicas read by `datasets.load_dataset(folder)` as it reads a
downloaded repo: Flickr30K's Parquet export (one split, Karpathy's splits in a column), a Flickr8k-style copy (five
caption columns), COCO's Karpathy metadata (captions and image paths, images on disk), and the layouts that already
worked (a list column of another name, a `val` split)."""

import io
from pathlib import Path

import datasets
import pytest
import yaml

import train_mcad
from modeling_mcad.data import load_image_text_dataset
from modeling_mcad.errors import UserError

from .conftest import REPO_ROOT, random_images

IMAGE = datasets.Image()


def image_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def write_parquet(path: Path, rows: dict, features: datasets.Features) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))


def write_readme_configs(folder: Path, splits: list[str]) -> None:
    """The README `configs:` block the Hub's Parquet repos carry."""
    card = {"configs": [{"config_name": "default",
                         "data_files": [{"split": split, "path": f"data/{split}-*"} for split in splits]}]}
    (folder / "README.md").write_text(f"---\n{yaml.safe_dump(card)}---\n")


@pytest.fixture(scope="module")
def flickr30k(tmp_path_factory):
    """nlphuji/flickr30k's Parquet export: TEST/test/0000.parquet, every image in split `test`, a `split` column."""
    folder = tmp_path_factory.mktemp("flickr30k")
    karpathy = ["train"] * 5 + ["val"] * 2 + ["test"] * 3
    images = random_images(len(karpathy), seed=11)
    features = datasets.Features({
        "image": IMAGE, "caption": datasets.List(datasets.Value("string")),
        "sentids": datasets.List(datasets.Value("string")), "split": datasets.Value("string"),
        "img_id": datasets.Value("string"), "filename": datasets.Value("string")})
    rows = {"image": [{"bytes": image_bytes(image), "path": None} for image in images],
            "caption": [[f"image {i} caption {j}" for j in range(5)] for i in range(len(images))],
            "sentids": [[str(5 * i + j) for j in range(5)] for i in range(len(images))], "split": karpathy,
            "img_id": [str(i) for i in range(len(images))], "filename": [f"{i}.jpg" for i in range(len(images))]}
    write_parquet(folder / "TEST" / "test" / "0000.parquet", rows, features)
    return folder


def test_flickr30k_config_reads_karpathy_splits_from_a_column(flickr30k):
    """configs/flickr30k_clip_blip.yaml as shipped, but for the dataset's name and its revision (a local copy)."""
    values = yaml.safe_load((REPO_ROOT / "configs" / "flickr30k_clip_blip.yaml").read_text())
    assert values["dataset"] == "nlphuji/flickr30k" and values["dataset_options"]["data_dir"] == "TEST"
    values["dataset"] = str(flickr30k)
    values["dataset_options"] = {"data_dir": "TEST"}
    splits = train_mcad.load_splits(train_mcad.TrainConfig.from_sources(None, values), accelerator=None)
    assert {role: len(split) for role, split in splits.items()} == {"train": 5, "eval": 2, "test": 3}
    assert splits["eval"]["captions"][0] == [f"image 5 caption {j}" for j in range(5)]
    assert splits["test"].column_names == ["image", "captions"]
    assert train_mcad.split_label(train_mcad.TrainConfig.from_sources(None, values), "eval") == "test[split=val]"


def test_a_where_that_matches_nothing_or_names_no_column(flickr30k):
    with pytest.raises(UserError, match=r"no row matches where=\{'split': 'dev'\}; the columns hold "
                                        r"\{'split': \['test', 'train', 'val'\]\}"):
        load_image_text_dataset(flickr30k, split="test", caption_column="caption", where={"split": "dev"},
                                data_dir="TEST")
    with pytest.raises(UserError, match=r"has no column \['karpathy'\]; its columns are \['image', 'caption', "
                                        r"'sentids', 'split', 'img_id', 'filename'\]"):
        load_image_text_dataset(flickr30k, split="test", caption_column="caption", where={"karpathy": "train"},
                                data_dir="TEST")
    with pytest.raises(UserError, match=r"where\['split'\] must be a value or a non-empty list of values"):
        load_image_text_dataset(flickr30k, split="test", caption_column="caption", where={"split": []},
                                data_dir="TEST")
    both = load_image_text_dataset(flickr30k, split="test", caption_column="caption",
                                   where={"split": ["val", "test"]}, data_dir="TEST")
    assert len(both) == 5


def test_five_caption_columns(tmp_path):
    """A Flickr8k-style copy: train / validation / test Parquet splits, captions in caption_0 ... caption_4."""
    features = datasets.Features({"image": IMAGE, **{f"caption_{j}": datasets.Value("string") for j in range(5)}})
    for split, count in (("train", 4), ("validation", 2), ("test", 2)):
        images = random_images(count, seed=len(split))
        rows = {"image": [{"bytes": image_bytes(image), "path": None} for image in images]}
        rows |= {f"caption_{j}": [f"{split} {i} wording {j}" for i in range(count)] for j in range(5)}
        rows["caption_4"][0] = None  # a missing caption is left out
        write_parquet(tmp_path / "data" / f"{split}-00000-of-00001.parquet", rows, features)
    write_readme_configs(tmp_path, ["train", "validation", "test"])
    columns = [f"caption_{j}" for j in range(5)]
    loaded = load_image_text_dataset(tmp_path, split="validation", caption_column=columns)
    assert loaded["captions"] == [[f"validation 0 wording {j}" for j in range(4)],
                                  [f"validation 1 wording {j}" for j in range(5)]]
    _, config = train_mcad.parse_args(["--dataset", str(tmp_path), "--caption_column", str(columns).replace("'", ""),
                                       "--train_where", "{caption_0: train 1 wording 0}"])
    assert config.caption_column == columns and config.train_where == {"caption_0": "train 1 wording 0"}
    assert len(train_mcad.load_splits(config, accelerator=None)["train"]) == 1
    with pytest.raises(UserError, match=r"has no column \['caption_5'\]; its columns are \['image', 'caption_0'"):
        load_image_text_dataset(tmp_path, split="test", caption_column=[*columns, "caption_5"])
    with pytest.raises(UserError, match=r"has no split 'val'.*pass one of its splits"):
        load_image_text_dataset(tmp_path, split="val", caption_column=columns)


def test_coco_karpathy_metadata_with_images_on_disk(tmp_path):
    """yerevann/coco-karpathy: train / restval / validation / test, `sentences`, images by filepath and filename
    under COCO's own folders, which the user downloads; Karpathy's training set is train + restval."""
    images = tmp_path / "coco"
    features = datasets.Features({
        "filepath": datasets.Value("string"), "sentids": datasets.List(datasets.Value("int64")),
        "filename": datasets.Value("string"), "imgid": datasets.Value("int64"), "split": datasets.Value("string"),
        "sentences": datasets.List(datasets.Value("string")), "cocoid": datasets.Value("int64"),
        "url": datasets.Value("string")})
    number = 0
    for split, count, source in (("train", 3, "train2014"), ("restval", 2, "val2014"), ("validation", 2, "val2014"),
                                 ("test", 1, "val2014")):
        names = [f"COCO_{source}_{number + i:012d}.jpg" for i in range(count)]
        (images / source).mkdir(parents=True, exist_ok=True)
        for name, image in zip(names, random_images(count, seed=number)):
            image.save(images / source / name)
        rows = {"filepath": [source] * count, "sentids": [[number + i] for i in range(count)], "filename": names,
                "imgid": list(range(number, number + count)), "split": [split] * count,
                "sentences": [[f"{split} {i} a", f"{split} {i} b"] for i in range(count)],
                "cocoid": list(range(number, number + count)),
                "url": [f"http://images.cocodataset.org/{source}/{name}" for name in names]}
        write_parquet(tmp_path / "hub" / "data" / f"{split}-00000-of-00001.parquet", rows, features)
        number += count
    write_readme_configs(tmp_path / "hub", ["train", "restval", "validation", "test"])
    values = yaml.safe_load((REPO_ROOT / "configs" / "coco_karpathy_clip_blip.yaml").read_text())
    assert values["dataset"] == "yerevann/coco-karpathy"
    config = train_mcad.TrainConfig.from_sources(None, {**values, "dataset": str(tmp_path / "hub"),
                                                        "image_root": str(images)})
    splits = train_mcad.load_splits(config, accelerator=None)
    assert {role: len(split) for role, split in splits.items()} == {"train": 5, "eval": 2, "test": 1}
    assert splits["train"]["captions"][3] == ["restval 0 a", "restval 0 b"]
    assert splits["test"][0]["image"].size == random_images(1)[0].size
    (images / "val2014" / "COCO_val2014_000000000007.jpg").unlink()  # the test image, not downloaded
    with pytest.raises(UserError, match=r"row 0 \(.*COCO_val2014_000000000007\.jpg\): the file does not exist"):
        load_image_text_dataset(tmp_path / "hub", split="test", image_column=["filepath", "filename"],
                                image_root=images, caption_column="sentences")


def test_layouts_that_already_worked(tmp_path):
    """A list column named alt_text, a split named `val`, one caption per row grouped by image."""
    images = random_images(3, seed=5)
    features = datasets.Features({"image": IMAGE, "alt_text": datasets.List(datasets.Value("string"))})
    write_parquet(tmp_path / "lists" / "data" / "val-00000-of-00001.parquet",
                  {"image": [{"bytes": image_bytes(image), "path": None} for image in images],
                   "alt_text": [["a", "b"], ["c"], ["d", "e", "f"]]}, features)
    write_readme_configs(tmp_path / "lists", ["val"])
    assert load_image_text_dataset(tmp_path / "lists", split="val", caption_column="alt_text")["captions"] == [
        ["a", "b"], ["c"], ["d", "e", "f"]]
    features = datasets.Features({"image": IMAGE, "caption": datasets.Value("string")})
    encoded = [{"bytes": image_bytes(image), "path": None} for image in images]
    write_parquet(tmp_path / "rows" / "data" / "train-00000-of-00001.parquet",
                  {"image": [encoded[0], encoded[1], encoded[0]], "caption": ["one", "two", "one again"]}, features)
    write_readme_configs(tmp_path / "rows", ["train"])
    assert load_image_text_dataset(tmp_path / "rows", caption_column="caption")["captions"] == [
        ["one", "one again"], ["two"]]


def test_dataset_options_may_not_repeat_an_option(tmp_path):
    config = train_mcad.TrainConfig.from_sources(None, {"dataset": str(tmp_path), "dataset_options": {"split": "x"}})
    with pytest.raises(UserError, match=r"dataset_options \['split'\] cannot go to datasets.load_dataset here: set "
                                        r"them with --train_split / --eval_split / --test_split\."):
        train_mcad.load_splits(config, accelerator=None)
    shapes = train_mcad.TrainConfig.from_sources(None, {"train_where": {"split": "train"}, "image_root": "x"})
    with pytest.raises(UserError, match="train_where, image_root apply to a dataset that is read"):
        train_mcad.load_splits(shapes, accelerator=None)


def test_odd_layout_options_are_refused_by_name(flickr30k, tmp_path, capsys):
    """Review cases: a one-item image_column list, where values of another type than the column's, where on a list
    column, a caption column listed twice, streaming or a misspelt load_dataset option, malformed YAML on a flag."""
    common = {"split": "test", "caption_column": "caption", "data_dir": "TEST"}
    assert len(load_image_text_dataset(flickr30k, image_column=["image"], where={"split": "val"}, **common)) == 2
    for where, message in (({"img_id": 5}, r"where\['img_id'\] must be .* of the column's type \(string\), got 5 "
                                           r"\(in YAML, quote a number"),
                           ({"split": True}, r"where\['split'\] must be"),
                           ({"sentids": "1"}, r"where\['sentids'\]: the column holds list<.*>, not plain values")):
        with pytest.raises(UserError, match=message):
            load_image_text_dataset(flickr30k, where=where, **common)
    with pytest.raises(UserError, match=r"caption_column=\['caption', 'caption'\] must name one column or a list of "
                                        r"distinct columns"):
        load_image_text_dataset(flickr30k, **{**common, "caption_column": ["caption", "caption"]})
    with pytest.raises(UserError, match=r"datasets could not load .* with \{'revison': 'main', 'data_dir': 'TEST'\} "
                                        r"\(.*doesn't have a 'revison' key"):
        load_image_text_dataset(flickr30k, revison="main", **common)
    streaming = train_mcad.TrainConfig.from_sources(None, {"dataset": str(flickr30k),
                                                           "dataset_options": {"streaming": True}})
    with pytest.raises(UserError, match=r"dataset_options \['streaming'\] cannot go .*set them with --streaming"):
        train_mcad.load_splits(streaming, accelerator=None)
    with pytest.raises(SystemExit) as exit:
        train_mcad.parse_args(["--train_where", "{split: train"])
    assert exit.value.code == 2
    assert "argument --train_where: '{split: train' is not a YAML value" in capsys.readouterr().err
