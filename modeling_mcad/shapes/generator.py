"""mcad-shapes: the built-in image-text retrieval benchmark, generated, never downloaded (DESIGN §6).

Each image shows one to three coloured shapes on a dark background, laid out in a row (left to right) or a column
(top to bottom), and has five paraphrased captions. Retrieval needs attribute binding ("a red circle and a blue
square" is not "a blue circle and a red square") and spatial relations under paraphrase: a caption names the
left/top object first ("a small red circle to the left of a big blue square", a *canonical* wording) or last ("the
large blue square is right of the little red circle", an *inverse* wording). Every image has at least two
wordings of each kind.

Scenes come in *families* of near-duplicates: a base scene, the same scene with its two related objects' colours
swapped, with their places swapped, and with one attribute (colour, shape or size) of one object changed. A gallery
therefore holds images that only binding or a relation tells apart, and bag-of-words matchers fail on it
(`matcher_embeddings`). Within a split no two images have the same description (while the palette allows it).

Columns of every split of `make_shapes`:

- `image` (`datasets.Image`): an RGB PNG of `image_size` × `image_size` pixels.
- `captions` (`list[str]`, five): the paraphrases.
- `canonical` (`list[bool]`): per caption, whether it names the objects in scene order (left/top first). A teacher's
  wording curriculum starts from these.
- `swapped_captions` (`list[str | None]`): per caption, the same wording with the colours of the two objects it
  relates (or, without relations, the first two it lists) swapped; None where that would still be true (one
  object; without relations, two objects of one shape).
- `flipped_captions` (`list[str | None]`): per caption, the same wording with the relation reversed ("left of" →
  "right of"); None where the caption states no relation. A distractor is never a true description of its image,
  except in a train split made with `caption_noise`, whose wrong captions get the distractors of their own text.
- `scene` (`str`): JSON `{"axis": "horizontal" | "vertical", "relations": bool, "objects": [{"shape", "colour",
  "size", "x", "y"}, ...]}`; objects in scene order (left to right, or top to bottom), `size` "small" / "large"
  (null with `num_sizes=1`), `x`, `y` the centre as a fraction of the image side.
- `family` (`int`): images with the same value are near-duplicates of one another.

`to_imagefolder` writes a split dictionary as a Hugging Face `imagefolder` (`<split>/metadata.jsonl` + PNG files).
"""

import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageDraw

from ..errors import UserError
from ..evaluation import flatten_captions
from ..utils import atomic_directory

logger = logging.getLogger(__name__)

# Palette and shape orders: a knob takes the first `num_colors` / `num_shapes`, the most distinct first.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 210),
    "orange": (245, 140, 30),
    "pink": (250, 140, 200),
    "cyan": (60, 215, 225),
    "white": (240, 240, 240),
    "brown": (135, 80, 40),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "heart")
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
# (canonical phrase, inverse phrase) per axis: "A <canonical> B" and "B <inverse> A" say the same thing.
RELATION_PHRASES = {
    "horizontal": (("to the left of", "to the right of"), ("left of", "right of"),
                   ("on the left of", "on the right of")),
    "vertical": (("above", "below"), ("over", "under")),
}
ORIENTATION_WORDS = {"left": "horizontal", "right": "horizontal", "above": "vertical", "below": "vertical",
                     "over": "vertical", "under": "vertical"}
RELATION_FRAMES = (
    "{first} {relation} {second}",
    "there is {first} {relation} {second}",
    "{first_the} is {relation} {second_the}",
    "a picture of {first} {relation} {second}",
    "an image of {first} {relation} {second}",
)
LIST_FRAMES = ("{objects}", "there is {objects}", "a picture of {objects}", "an image of {objects}",
               "a drawing of {objects}")
CAPTIONS_PER_IMAGE = 5
SPLITS = ("train", "validation", "test")
FEATURES = datasets.Features({
    "image": datasets.Image(),
    "captions": datasets.List(datasets.Value("string")),
    "canonical": datasets.List(datasets.Value("bool")),
    "swapped_captions": datasets.List(datasets.Value("string")),
    "flipped_captions": datasets.List(datasets.Value("string")),
    "scene": datasets.Value("string"),
    "family": datasets.Value("int64"),
})
MATCHERS = ("word_overlap", "colour_shape", "colour_shape_orientation")
_SUPERSAMPLING = 4  # shapes are drawn at 4× and downscaled: smooth edges at 32-64 px


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str | None  # "small" / "large"; None when the benchmark has one size

    def key(self) -> tuple:
        return self.size, self.colour, self.shape


@dataclass(frozen=True)
class Scene:
    """What an image shows: objects in scene order along `axis`; with `relations`, captions relate them."""

    objects: tuple[ShapeObject, ...]
    axis: str
    relations: bool

    def key(self) -> tuple:
        """Equal for two scenes exactly when they have the same true captions."""
        objects = [obj.key() for obj in self.objects]
        if self.relations:
            return self.axis, tuple(objects)
        return None, tuple(sorted(objects, key=str))


@dataclass(frozen=True)
class Statement:
    """
    The meaning of a caption: objects named in order; with `relation` ("before": the first object is left
    of / above the second; "after": right of / below), the first two are related and any third is only said to be
    there.
    """

    named: tuple[tuple, ...]  # (size, colour, shape) per named object; size None when not said
    relation: str | None

    def is_true_of(self, scene: Scene) -> bool:
        return self.grounding(scene) is not None

    def grounding(self, scene: Scene) -> tuple[int, ...] | None:
        """The scene objects the named ones are, in naming order, where the statement is true of the scene."""
        matches = [[index for index, obj in enumerate(scene.objects) if _matches(obj.key(), named)]
                   for named in self.named]
        for choice in itertools.product(*matches):
            if len(set(choice)) < len(choice):
                continue
            if self.relation is None or (choice[0] < choice[1]) == (self.relation == "before"):
                return choice
        return None


def _matches(key: tuple, named: tuple) -> bool:
    return all(said is None or said == value for said, value in zip(named, key))


@dataclass(frozen=True)
class Wording:
    """How one caption says its statement: the frame, the objects in naming order, the relation phrase, the size
    synonyms; `swap_colours` / `flip` make the caption's distractors from the same wording."""

    frame: int
    order: tuple[int, ...]  # scene indices of the objects, in the order the caption names them
    phrase: int | None  # index into RELATION_PHRASES[axis]; None for a caption without a relation
    size_words: tuple[int, ...]  # per scene object, which synonym of its size word
    swap_colours: bool = False
    flip: bool = False

    @property
    def canonical(self) -> bool:
        """Whether the caption names objects in scene order: the related two, or for a list all of them."""
        named = self.order[:2] if self.phrase is not None else self.order
        return list(named) == sorted(named)

    def statement(self, scene: Scene) -> Statement:
        named = [scene.objects[index].key() for index in self.order]
        if self.swap_colours:
            (size0, colour0, shape0), (size1, colour1, shape1) = named[:2]
            named[:2] = [(size0, colour1, shape0), (size1, colour0, shape1)]
        relation = None
        if self.phrase is not None:
            before = self.order[0] < self.order[1]
            relation = "before" if before != self.flip else "after"
        return Statement(tuple(named), relation)

    def render(self, scene: Scene) -> str:
        statement = self.statement(scene)
        phrases = [_noun_phrase(named, self.size_words[index]) for named, index in zip(statement.named, self.order)]
        if self.phrase is None:
            listed = [f"{_article(phrase)} {phrase}" for phrase in phrases]
            objects = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]
            return LIST_FRAMES[self.frame].format(objects=objects)
        canonical_phrase, inverse_phrase = RELATION_PHRASES[scene.axis][self.phrase]
        caption = RELATION_FRAMES[self.frame].format(
            first=f"{_article(phrases[0])} {phrases[0]}", second=f"{_article(phrases[1])} {phrases[1]}",
            first_the=f"the {phrases[0]}", second_the=f"the {phrases[1]}",
            relation=canonical_phrase if statement.relation == "before" else inverse_phrase,
        )
        if len(phrases) > 2:
            caption += ", with " + " and ".join(f"{_article(phrase)} {phrase}" for phrase in phrases[2:])
        return caption


def _noun_phrase(named: tuple, synonym: int) -> str:
    size, colour, shape = named
    return f"{SIZE_WORDS[size][synonym]} {colour} {shape}" if size else f"{colour} {shape}"


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


@dataclass(frozen=True)
class _Knobs:
    image_size: int
    min_objects: int
    max_objects: int
    relations: bool
    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    sizes: tuple[str | None, ...]
    family_size: int


def make_shapes(
    seed: int = 0,
    image_size: int = 64,
    train: int = 10_000,
    validation: int = 1000,
    test: int = 1000,
    min_objects: int = 2,
    max_objects: int = 2,
    relations: bool = True,
    num_colors: int = 8,
    num_shapes: int = 6,
    num_sizes: int = 2,
    family_size: int = 4,
    caption_noise: float = 0.0,
) -> datasets.DatasetDict:
    """
    Generate mcad-shapes: `train`, `validation` and `test` splits (columns: see the module docstring).

    The same arguments give the same bytes. The defaults are the benchmark (two related objects, eight colours,
    six shapes, two sizes); an easy demo takes e.g. `num_colors=3, num_shapes=3, num_sizes=1`, and
    `relations=False` or one object per image removes the spatial part.

    Args:
        seed (`int`): the random seed; each split draws from its own stream.
        image_size (`int`): the side of the square images, in pixels (at least 16).
        train, validation, test (`int`): images per split (0 leaves a split empty).
        min_objects, max_objects (`int`): objects per image, drawn uniformly in this range (1 to 3).
        relations (`bool`): captions relate two objects ("left of", "above"); without, they list the objects.
        num_colors (`int`): the first `num_colors` of `COLOURS` (at least the objects per image, at most 10).
        num_shapes (`int`): the first `num_shapes` of `SHAPES` (1 to 8).
        num_sizes (`int`): 2 ("small" / "large" objects, said in the captions) or 1 (one size, not said).
        family_size (`int`): images per family of near-duplicates (1 to 5; 1: no families).
        caption_noise (`float`): the fraction of the *train* split's captions made wrong the way web alt text is
            (`_corrupt_captions`); validation and test stay clean. 0 (the default) leaves every caption true.
    """
    if image_size < 16:
        raise UserError(f"image_size={image_size} is too small to draw shapes on; use at least 16 pixels.")
    if not 1 <= min_objects <= max_objects <= 3:
        raise UserError(f"Objects per image must satisfy 1 <= min_objects <= max_objects <= 3, "
                        f"got min_objects={min_objects}, max_objects={max_objects}.")
    if not max_objects <= num_colors <= len(COLOURS):
        raise UserError(f"num_colors={num_colors}: each object of a scene has its own colour, so use between "
                        f"max_objects={max_objects} and {len(COLOURS)} colours.")
    if not 1 <= num_shapes <= len(SHAPES):
        raise UserError(f"num_shapes={num_shapes}: use between 1 and {len(SHAPES)}.")
    if num_sizes not in (1, 2):
        raise UserError(f"num_sizes={num_sizes}: use 1 (one size) or 2 (small and large).")
    if not 1 <= family_size <= 5:
        raise UserError(f"family_size={family_size}: use between 1 and 5.")
    if not 0 <= caption_noise <= 1:
        raise UserError(f"caption_noise={caption_noise}: use a fraction between 0 and 1.")
    counts = {"train": train, "validation": validation, "test": test}
    for name, count in counts.items():
        if count < 0:
            raise UserError(f"{name}={count}: a split size cannot be negative.")
    knobs = _Knobs(image_size, min_objects, max_objects, relations, tuple(COLOURS)[:num_colors],
                   SHAPES[:num_shapes], ("small", "large") if num_sizes == 2 else (None,), family_size)
    return datasets.DatasetDict({
        name: _make_split(np.random.default_rng([seed, number]), counts[name], knobs,
                          # its own random stream: the images and the true captions are those of caption_noise=0
                          caption_noise if name == "train" else 0, np.random.default_rng([seed, len(SPLITS)]))
        for number, name in enumerate(SPLITS)
    })


def _corrupt_captions(columns: dict, said: list[tuple["Scene", list["Wording"]]], fraction: float,
                      rng: np.random.Generator) -> None:
    """
    Replace each caption of `columns`, with probability `fraction`, as web alt text goes wrong, one of three ways
    alike: its colours swapped, its relation flipped (its own distractors; where it has none, as the third way), or
    the caption of an image of another family (a near-duplicate's could be true). A replaced caption is not
    canonical, and its distractors are made from its own text by the same rules, as a rule-based negative miner that
    cannot know the caption is wrong would make them: the swap of a colour-swapped caption, or the flip of a flipped
    one, is the true caption. `said` holds each image's scene and the wordings of its captions. A split of one family
    has no other family's captions to borrow: those draws leave the caption as it is.
    """
    captions, swapped, flipped = columns["captions"], columns["swapped_captions"], columns["flipped_captions"]
    families = np.array(columns["family"])
    originals = [(list(row), list(swaps), list(flips)) for row, swaps, flips in zip(captions, swapped, flipped)]
    for image, row in enumerate(captions):
        scene, wordings = said[image]
        others = np.flatnonzero(families != families[image])
        for place in np.flatnonzero(rng.random(len(row)) < fraction):
            kind, wording = rng.integers(3), wordings[place]
            if kind < 2 and (swapped, flipped)[kind][image][place] is not None:
                wrong = replace(wording, swap_colours=kind == 0, flip=kind == 1).render(scene)
                both = replace(wording, swap_colours=True, flip=True).render(scene)
                # The rule undone gives the true caption; the other rule, where it applies, both changes.
                swaps, flips = (row[place], both), (both, row[place])
                swapped[image][place] = swaps[kind] if swapped[image][place] is not None else None
                flipped[image][place] = flips[kind] if flipped[image][place] is not None else None
                row[place] = wrong
            elif len(others):
                other = others[rng.integers(len(others))]
                borrowed = rng.integers(len(originals[other][0]))
                row[place], swapped[image][place], flipped[image][place] = (
                    texts[borrowed] for texts in originals[other])
            else:
                continue
            columns["canonical"][image][place] = False


def shapes_splits(data_dir: str | os.PathLike, seed: int = 0, **settings) -> datasets.DatasetDict:
    """
    `make_shapes(seed, **settings)`, kept on disk: generated into `data_dir/mcad-shapes-<fingerprint of the
    settings>` on first use (atomically), read from there afterwards. With several processes, let the main process
    call it first (e.g. inside `accelerator.main_process_first()`).
    """
    key = json.dumps({"seed": seed, **settings}, sort_keys=True, default=str)
    folder = Path(data_dir) / f"mcad-shapes-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if not folder.exists():
        with atomic_directory(folder) as temporary:
            make_shapes(seed=seed, **settings).save_to_disk(str(temporary))
    return datasets.load_from_disk(str(folder))


def _make_split(rng: np.random.Generator, count: int, knobs: _Knobs, caption_noise: float = 0,
                noise_rng: np.random.Generator | None = None) -> datasets.Dataset:
    columns = {name: [] for name in FEATURES}
    seen: set[tuple] = set()
    described: set[tuple] = set()
    family = 0
    said = []  # (scene, wordings) per image: the noise makes its distractors from the same wordings
    while len(columns["image"]) < count:
        for scene in _family(rng, knobs, seen)[: count - len(columns["image"])]:
            said.append((scene, _add_example(columns, rng, scene, family, knobs.image_size)))
            described.add(scene.key())
        family += 1
    if len(described) < count:
        logger.warning("mcad-shapes: the palette has fewer than %d distinct scenes, so the split repeats "
                       "descriptions; raise num_colors / num_shapes / num_sizes or lower the split size.", count)
    if caption_noise:
        _corrupt_captions(columns, said, caption_noise, noise_rng)
    return datasets.Dataset.from_dict(columns, features=FEATURES)


def _family(rng: np.random.Generator, knobs: _Knobs, seen: set[tuple], attempts: int = 50) -> list[Scene]:
    """A base scene and up to `family_size - 1` variants, each differing from the base in one edit, none seen
    before in the split (unless the palette has run out of new scenes: then the base may repeat one)."""
    for _ in range(attempts):
        base = _random_scene(rng, knobs)
        if base.key() not in seen:
            break
    family = [base]
    seen.add(base.key())
    for edit in _edits(rng, base, knobs):
        if len(family) == knobs.family_size:
            break
        variant = edit(rng, base, knobs)
        if variant is not None and variant.key() not in seen:
            family.append(variant)
            seen.add(variant.key())
    return family


def _random_scene(rng: np.random.Generator, knobs: _Knobs) -> Scene:
    count = int(rng.integers(knobs.min_objects, knobs.max_objects + 1))
    colours = rng.choice(len(knobs.colours), size=count, replace=False)
    objects = tuple(
        ShapeObject(shape=knobs.shapes[int(rng.integers(len(knobs.shapes)))], colour=knobs.colours[int(colour)],
                    size=knobs.sizes[int(rng.integers(len(knobs.sizes)))])
        for colour in colours
    )
    axis = ("horizontal", "vertical")[int(rng.integers(2))]
    return Scene(objects, axis, knobs.relations and count > 1)


def _edits(rng: np.random.Generator, scene: Scene, knobs: _Knobs):
    """Variant makers in the order a family uses them: the binding and relation edits first, then random one-attribute
    edits (more than a family needs: some may give an already seen scene)."""
    if len(scene.objects) > 1:
        yield _swap_colours
        if scene.relations:
            yield _swap_places
    attribute_edits = [_recolour, _reshape] + ([_resize] if len(knobs.sizes) > 1 else [])
    for _ in range(4 * knobs.family_size):
        yield attribute_edits[int(rng.integers(len(attribute_edits)))]


def _two_objects(rng: np.random.Generator, scene: Scene) -> tuple[int, int]:
    first, second = sorted(rng.choice(len(scene.objects), size=2, replace=False).tolist())
    return first, second


def _with_objects(scene: Scene, changes: dict[int, ShapeObject]) -> Scene:
    return replace(scene, objects=tuple(changes.get(index, obj) for index, obj in enumerate(scene.objects)))


def _swap_colours(rng, scene: Scene, knobs: _Knobs) -> Scene:
    first, second = _two_objects(rng, scene)
    a, b = scene.objects[first], scene.objects[second]
    return _with_objects(scene, {first: replace(a, colour=b.colour), second: replace(b, colour=a.colour)})


def _swap_places(rng, scene: Scene, knobs: _Knobs) -> Scene:
    first, second = _two_objects(rng, scene)
    return _with_objects(scene, {first: scene.objects[second], second: scene.objects[first]})


def _recolour(rng, scene: Scene, knobs: _Knobs) -> Scene | None:
    unused = [colour for colour in knobs.colours if colour not in {obj.colour for obj in scene.objects}]
    if not unused:
        return None
    index = int(rng.integers(len(scene.objects)))
    return _with_objects(scene, {index: replace(scene.objects[index], colour=unused[int(rng.integers(len(unused)))])})


def _reshape(rng, scene: Scene, knobs: _Knobs) -> Scene | None:
    index = int(rng.integers(len(scene.objects)))
    others = [shape for shape in knobs.shapes if shape != scene.objects[index].shape]
    if not others:
        return None
    return _with_objects(scene, {index: replace(scene.objects[index], shape=others[int(rng.integers(len(others)))])})


def _resize(rng, scene: Scene, knobs: _Knobs) -> Scene:
    index = int(rng.integers(len(scene.objects)))
    obj = scene.objects[index]
    return _with_objects(scene, {index: replace(obj, size="small" if obj.size == "large" else "large")})


def _wordings(rng: np.random.Generator, scene: Scene) -> list[Wording]:
    """Five wordings in five different frames, at least two canonical and (with two or more objects) two inverse."""
    count = len(scene.objects)
    canonical = [True] * CAPTIONS_PER_IMAGE
    if count > 1:
        canonical = [True, True, False, False, bool(rng.integers(2))]
        rng.shuffle(canonical)
    frames = rng.permutation(CAPTIONS_PER_IMAGE)
    phrases = len(RELATION_PHRASES[scene.axis])
    wordings = []
    for frame, in_order in zip(frames, canonical):
        if scene.relations:
            pair = _two_objects(rng, scene)
            rest = [index for index in range(count) if index not in pair]
            order = (pair if in_order else pair[::-1]) + tuple(rest)
            phrase = int(rng.integers(phrases))
        else:
            order, phrase = tuple(range(count)) if in_order else tuple(reversed(range(count))), None
        wordings.append(Wording(int(frame), tuple(order), phrase, tuple(rng.integers(2, size=count).tolist())))
    return wordings


def _distractor(scene: Scene, wording: Wording, **change) -> str | None:
    """The wording with a change that should make it false; None when it does not (then it is no distractor)."""
    if len(wording.order) < 2 or (change.get("flip") and wording.phrase is None):
        return None
    changed = replace(wording, **change)
    return None if changed.statement(scene).is_true_of(scene) else changed.render(scene)


def _add_example(columns: dict, rng: np.random.Generator, scene: Scene, family: int,
                 image_size: int) -> list[Wording]:
    """Draw one image of `scene` with its captions and distractors into `columns`; returns the captions' wordings."""
    layout = _layout(rng, scene)
    wordings = _wordings(rng, scene)
    columns["image"].append({"bytes": _render(rng, scene, layout, image_size), "path": None})
    columns["captions"].append([wording.render(scene) for wording in wordings])
    columns["canonical"].append([wording.canonical for wording in wordings])
    columns["swapped_captions"].append([_distractor(scene, wording, swap_colours=True) for wording in wordings])
    columns["flipped_captions"].append([_distractor(scene, wording, flip=True) for wording in wordings])
    columns["scene"].append(json.dumps({
        "axis": scene.axis,
        "relations": scene.relations,
        "objects": [{"shape": obj.shape, "colour": obj.colour, "size": obj.size, "x": round(x, 4), "y": round(y, 4)}
                    for obj, (x, y, _) in zip(scene.objects, layout)],
    }))
    columns["family"].append(family)
    return wordings


# --- drawing ---------------------------------------------------------------------------------------------------


def _layout(rng: np.random.Generator, scene: Scene) -> list[tuple[float, float, float]]:
    """(x, y, side) per object, as fractions of the image side: each object in its own slot along the axis (so the
    scene order is the reading order), jittered within it and a little across it."""
    count = len(scene.objects)
    slot = 1.0 / count
    large = min(0.8 * slot, 0.42)
    layout = []
    for index, obj in enumerate(scene.objects):
        side = large if obj.size != "small" else 0.6 * large
        along = (index + 0.5) * slot + rng.uniform(-1, 1) * 0.4 * (slot - side)
        across = 0.5 + rng.uniform(-1, 1) * min(0.12, 0.5 - side / 2 - 0.02)
        layout.append((along, across, side) if scene.axis == "horizontal" else (across, along, side))
    return layout


def _render(rng: np.random.Generator, scene: Scene, layout, image_size: int) -> bytes:
    canvas_size = image_size * _SUPERSAMPLING
    background = int(rng.integers(15, 70))
    canvas = Image.new("RGB", (canvas_size, canvas_size), (background,) * 3)
    draw = ImageDraw.Draw(canvas)
    for obj, (x, y, side) in zip(scene.objects, layout):
        colour = np.clip(np.array(COLOURS[obj.colour]) + rng.integers(-15, 16, size=3), 0, 255)
        _draw_shape(draw, obj.shape, x * canvas_size, y * canvas_size, side * canvas_size / 2, tuple(colour.tolist()))
    image = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _regular_polygon(x: float, y: float, radius: float, corners: int, rotation: float = -math.pi / 2) -> list:
    return [(x + radius * math.cos(rotation + 2 * math.pi * k / corners),
             y + radius * math.sin(rotation + 2 * math.pi * k / corners)) for k in range(corners)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, radius: float, colour: tuple) -> None:
    if shape == "circle":
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
    elif shape == "square":
        side = 0.85 * radius
        draw.rectangle((x - side, y - side, x + side, y + side), fill=colour)
    elif shape == "triangle":
        draw.polygon(_regular_polygon(x, y + 0.2 * radius, 1.15 * radius, 3), fill=colour)
    elif shape == "star":
        outer = _regular_polygon(x, y, radius, 5)
        inner = _regular_polygon(x, y, 0.42 * radius, 5, rotation=-math.pi / 2 + math.pi / 5)
        draw.polygon([point for pair in zip(outer, inner) for point in pair], fill=colour)
    elif shape == "cross":
        arm = radius / 3
        draw.rectangle((x - radius, y - arm, x + radius, y + arm), fill=colour)
        draw.rectangle((x - arm, y - radius, x + arm, y + radius), fill=colour)
    elif shape == "diamond":
        draw.polygon(_regular_polygon(x, y, radius, 4), fill=colour)
    elif shape == "hexagon":
        draw.polygon(_regular_polygon(x, y, radius, 6, 0.0), fill=colour)
    elif shape == "heart":
        # The classic parametric heart, scaled into the object's box.
        points = [(16 * math.sin(t) ** 3,
                   -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
                  for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
        draw.polygon([(x + radius * px / 17, y + radius * (py + 2) / 17) for px, py in points], fill=colour)
    else:
        raise ValueError(f"Unknown shape {shape!r}; use one of {SHAPES}.")


# --- imagefolder ---------------------------------------------------------------------------------------------------


def to_imagefolder(dataset_dict: datasets.DatasetDict, directory: str | os.PathLike) -> Path:
    """
    Write splits as a Hugging Face `imagefolder`: `<directory>/<split>/<index>.png` and `<split>/metadata.jsonl`
    (`file_name` plus every other column), readable offline with
    `datasets.load_dataset("imagefolder", data_dir=directory)` or `load_image_text_dataset(directory)`. Empty
    splits are left out. The folder is written atomically (a temporary folder, then one rename). Returns the
    folder.
    """
    directory = Path(directory)
    with atomic_directory(directory) as temporary:
        for name, split in dataset_dict.items():
            if len(split) == 0:  # a metadata.jsonl without images would make datasets read the folder as JSON
                continue
            split_dir = temporary / name
            split_dir.mkdir()
            encoded = split.cast_column("image", datasets.Image(decode=False))
            width = len(str(max(len(split) - 1, 0)))
            with open(split_dir / "metadata.jsonl", "w", encoding="utf-8") as metadata:
                for index, row in enumerate(encoded):
                    file_name = f"{index:0{width}d}.png"
                    image = row.pop("image")
                    (split_dir / file_name).write_bytes(image["bytes"] or Path(image["path"]).read_bytes())
                    metadata.write(json.dumps({"file_name": file_name, **row}) + "\n")
    return directory


# --- bag-of-words matchers -----------------------------------------------------------------------------------------


def matcher_embeddings(split: datasets.Dataset, matcher: str = "colour_shape",
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """
    Embeddings of a matcher that sees each image's scene perfectly but reads text as a bag of words: the floor a
    model must beat for the benchmark to say anything (DESIGN §6). Feed them to `retrieval_metrics`.

    - `word_overlap`: the words of a caption against the words of the image's reference description (every
      object, the relation in its canonical wording).
    - `colour_shape`: colour and shape words against the image's colours and shapes: no binding, no relation.
    - `colour_shape_orientation`: the same plus the relation's axis (left/right → horizontal, above/below/over/
      under → vertical), but not its direction.

    Vectors are word counts, L2-normalised (cosine similarity). Equal scores are broken at random (`seed`) by a
    tiny random component: otherwise a rank would depend on the gallery order.

    Returns:
        `(image_embeds, text_embeds, text_to_image)`: float32 arrays of shape `(images, dim)` and
        `(captions, dim)`, and each caption's image index.
    """
    if matcher not in MATCHERS:
        raise ValueError(f"Unknown matcher {matcher!r}; use one of {MATCHERS}.")
    captions, text_to_image = flatten_captions(split)
    image_bags = [_scene_words(json.loads(scene), matcher) for scene in split["scene"]]
    text_bags = [_text_words(caption, matcher) for caption in captions]
    vocabulary = {word: index for index, word in enumerate(sorted(set().union(*image_bags, *text_bags)))}
    rng = np.random.default_rng(seed)

    def embed(bags: Sequence[list[str]]) -> np.ndarray:
        counts = np.zeros((len(bags), len(vocabulary)), dtype=np.float64)
        for row, bag in enumerate(bags):
            for word in bag:
                counts[row, vocabulary[word]] += 1
        counts /= np.maximum(np.linalg.norm(counts, axis=1, keepdims=True), 1e-12)
        tie_breaker = 1e-3 * rng.standard_normal((len(bags), 8))
        return np.concatenate([counts, tie_breaker], axis=1).astype(np.float32)

    return embed(image_bags), embed(text_bags), text_to_image


def _parse_scene(scene: dict) -> Scene:
    return Scene(tuple(ShapeObject(obj["shape"], obj["colour"], obj["size"]) for obj in scene["objects"]),
                 scene["axis"], scene["relations"])


def reference_caption(scene: dict) -> str:
    """The canonical description of a scene (its JSON `scene` column, parsed): every object, the relation first."""
    parsed = _parse_scene(scene)
    count = len(parsed.objects)
    return Wording(0, tuple(range(count)), 0 if parsed.relations else None, (0,) * count).render(parsed)


# Relation words: True where the first-named object is left of / above the second (the canonical phrases).
_RELATION_WORDS = {word: canonical for phrases in RELATION_PHRASES.values() for pair in phrases
                   for canonical, phrase in zip((True, False), pair) for word in phrase.split()
                   if word in ORIENTATION_WORDS}
_SIZE_OF_WORD = {word: size for size, words in SIZE_WORDS.items() for word in words}


def caption_is_true(caption: str, scene: str | dict) -> bool:
    """
    Whether an mcad-shapes caption (or distractor) is a true description of a scene, e.g. of another image of its
    family: the named objects, each with its size, colour and shape, are there (distinct), and the first two stand
    in the stated relation. Reads the grammar `make_shapes` writes.

    Args:
        caption (`str`): a caption in mcad-shapes' grammar.
        scene (`str` or `dict`): the image's `scene` column (JSON), or it parsed.
    """
    return caption_grounding(caption, scene) is not None


def caption_grounding(caption: str, scene: str | dict) -> list[tuple[float, float]] | None:
    """
    Where the objects a true caption names are: their centres `(x, y)` (fractions of the image side), in the order
    the caption names them (its shape words' order); None if the caption is false of the scene.

    Args:
        caption (`str`): a caption in mcad-shapes' grammar.
        scene (`str` or `dict`): the image's `scene` column (JSON), or it parsed.
    """
    scene = json.loads(scene) if isinstance(scene, str) else scene
    objects = _caption_statement(caption).grounding(_parse_scene(scene))
    if objects is None:
        return None
    return [(scene["objects"][index]["x"], scene["objects"][index]["y"]) for index in objects]


def _caption_statement(caption: str) -> Statement:
    named, relation, size, colour = [], None, None, None
    for word in _words(caption):
        if word in _SIZE_OF_WORD:
            size = _SIZE_OF_WORD[word]
        elif word in COLOURS:
            colour = word
        elif word in SHAPES:
            named.append((size, colour, word))
            size = colour = None
        elif word in _RELATION_WORDS and relation is None:
            relation = "before" if _RELATION_WORDS[word] else "after"
    if not named:
        raise ValueError(f"The caption {caption!r} names no shape: only mcad-shapes captions can be read.")
    return Statement(tuple(named), relation)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _scene_words(scene: dict, matcher: str) -> list[str]:
    if matcher == "word_overlap":
        return sorted(set(_words(reference_caption(scene))))
    words = [word for obj in scene["objects"] for word in (obj["colour"], obj["shape"])]
    if matcher == "colour_shape_orientation" and scene["relations"]:
        words.append(scene["axis"])
    return words


def _text_words(caption: str, matcher: str) -> list[str]:
    words = _words(caption)
    if matcher == "word_overlap":
        return sorted(set(words))
    kept = [word for word in words if word in COLOURS or word in SHAPES]
    if matcher == "colour_shape_orientation":
        kept += sorted({ORIENTATION_WORDS[word] for word in words if word in ORIENTATION_WORDS})
    return kept


__all__ = ["COLOURS", "MATCHERS", "ORIENTATION_WORDS", "SHAPES", "caption_grounding", "caption_is_true", "make_shapes",
           "matcher_embeddings", "reference_caption", "shapes_splits", "to_imagefolder"]
