"""Retrieval metrics (the Flickr30K / COCO protocol), the binding probe (DESIGN §9) and a model-agnostic evaluation.

- `retrieval_metrics(image_embeds, text_embeds, text_to_image)`: Recall@1/5/10 both ways, RSUM, median ranks.
  Also an `evaluate` metric module: `evaluate.load(RETRIEVAL_METRIC_PATH)` (offline), which calls this function.
- `binding_probe(split)` / `binding_accuracy(...)`: does a model prefer an image's true caption to the same caption
  with the colours swapped or the relation flipped? Chance is 50%.
- `evaluate_model(encode_images, encode_texts, split)`: both, for any pair of encoding callables (student, teacher,
  exported runtime...); `student_encoders` / `dual_teacher_encoders` make them; `embed_split` gives the embeddings.
- `rerank(...)`: ranks after a second model (the fusion teacher) re-orders each query's top k.
- `teacher_gates(teachers, split)`: the teachers' gates on any split grouped by image: the dual teacher above its
  floors, the fusion teacher as a re-ranker above the dual teacher (and on binding, where the split has distractors).
"""

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch

from .data import TextTable, encode_images, encode_texts
from .errors import UserError
from .utils import progress

RETRIEVAL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "i2t_median_rank",
                  "t2i_median_rank")
BINDING_KEYS = ("swap_accuracy", "flip_accuracy", "binding_accuracy")
RECALL_AT = (1, 5, 10)
# `evaluate.load(RETRIEVAL_METRIC_PATH)` loads `retrieval_metrics` as an evaluate metric module.
RETRIEVAL_METRIC_PATH = str(Path(__file__).resolve().parent / "metrics" / "retrieval")


def _as_tensor(name: str, value) -> torch.Tensor:
    tensor = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (count, dim) array, got shape {tuple(tensor.shape)}.")
    tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} has NaN or infinite values; check the model's outputs (e.g. fp16 overflow).")
    return tensor


def retrieval_ranks(image_embeds, text_embeds, text_to_image: Sequence[int],
                    chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """
    The 1-based rank of the first right answer for every image query and every text query (see
    `retrieval_metrics`). Ties count against the query: a result scoring the same as the right answer ranks above
    it, so a collapsed model (all scores equal) ranks last, not first.

    Returns:
        `(image_to_text_ranks, text_to_image_ranks)`: int64 arrays of length `images` and `texts`.
    """
    images, texts = _as_tensor("image_embeds", image_embeds), _as_tensor("text_embeds", text_embeds)
    if images.shape[1] != texts.shape[1]:
        raise ValueError(f"image_embeds and text_embeds differ in dimension ({images.shape[1]} vs {texts.shape[1]}).")
    owner = torch.as_tensor(np.asarray(text_to_image, dtype=np.int64))
    if owner.shape != (len(texts),):
        raise ValueError(f"text_to_image needs one image index per caption: {len(texts)} captions, "
                         f"got {tuple(owner.shape)} indices.")
    if len(owner) and (owner.min() < 0 or owner.max() >= len(images)):
        raise ValueError(f"text_to_image holds indices outside 0..{len(images) - 1}.")
    captions_per_image = torch.bincount(owner, minlength=len(images))
    if (captions_per_image == 0).any():
        missing = torch.nonzero(captions_per_image == 0).flatten()[:5].tolist()
        raise ValueError(f"Images {missing} have no caption in text_to_image; every image query needs at least one.")

    # Each image's own captions as a padded index table (images × most captions), `valid` marking the real entries.
    order = torch.argsort(owner, stable=True)
    starts = torch.cumsum(captions_per_image, 0) - captions_per_image
    offsets = torch.arange(int(captions_per_image.max()))[None, :]
    valid = offsets < captions_per_image[:, None]
    own_captions = order[starts[:, None] + torch.minimum(offsets, captions_per_image[:, None] - 1)]

    image_ranks = torch.empty(len(images), dtype=torch.int64)
    for start in range(0, len(images), chunk_size):
        stop = min(start + chunk_size, len(images))
        scores = images[start:stop] @ texts.T
        own_scores = scores.gather(1, own_captions[start:stop])
        best_own = own_scores.masked_fill(~valid[start:stop], -torch.inf).amax(dim=1, keepdim=True)
        # Captions scoring at least the best own one, less the own ones among them.
        at_or_above = (scores >= best_own).sum(dim=1) - ((own_scores >= best_own) & valid[start:stop]).sum(dim=1)
        image_ranks[start:stop] = 1 + at_or_above
    text_ranks = torch.empty(len(texts), dtype=torch.int64)
    for start in range(0, len(texts), chunk_size):
        stop = min(start + chunk_size, len(texts))
        scores = texts[start:stop] @ images.T
        own_score = scores.gather(1, owner[start:stop, None])
        text_ranks[start:stop] = (scores >= own_score).sum(dim=1)  # counts the own image: 1-based
    return image_ranks.numpy(), text_ranks.numpy()


def retrieval_metrics(image_embeds, text_embeds, text_to_image: Sequence[int],
                      chunk_size: int = 1024) -> dict[str, float]:
    """
    Image-text retrieval under the Flickr30K / COCO protocol: an image query is right at K if any of its captions is
    among the K best-scoring captions; a caption query is right at K if its image is among the K best images.

    Scores are dot products: pass L2-normalised embeddings for cosine similarity. The score matrix is computed in
    chunks of `chunk_size` queries, so 5k images × 25k captions needs about `chunk_size × 25k × 4` bytes at a time.

    Args:
        image_embeds (`torch.Tensor` or `np.ndarray` of shape `(images, dim)`).
        text_embeds (`torch.Tensor` or `np.ndarray` of shape `(texts, dim)`).
        text_to_image (sequence of `int`, length `texts`): the index of each caption's image; every image needs at
            least one caption.
        chunk_size (`int`): queries per block of the score matrix.

    Returns:
        `dict[str, float]` with `RETRIEVAL_KEYS`: `i2t_r1`, `i2t_r5`, `i2t_r10`, `t2i_r1`, `t2i_r5`, `t2i_r10`
        (percent, 0-100), `rsum` (their sum, 0-600), `i2t_median_rank`, `t2i_median_rank` (1-based).
    """
    return metrics_from_ranks(*retrieval_ranks(image_embeds, text_embeds, text_to_image, chunk_size))


def metrics_from_ranks(image_ranks: Sequence[int], text_ranks: Sequence[int]) -> dict[str, float]:
    """
    `RETRIEVAL_KEYS` from the 1-based rank of the first right answer of every image query and every text query
    (`retrieval_ranks`, or ranks after re-ranking).
    """
    image_ranks, text_ranks = np.asarray(image_ranks), np.asarray(text_ranks)
    metrics = {}
    for direction, ranks in (("i2t", image_ranks), ("t2i", text_ranks)):
        for k in RECALL_AT:
            metrics[f"{direction}_r{k}"] = 100.0 * float((ranks <= k).mean())
    metrics["rsum"] = sum(metrics[f"{direction}_r{k}"] for direction in ("i2t", "t2i") for k in RECALL_AT)
    metrics["i2t_median_rank"] = float(np.median(image_ranks))
    metrics["t2i_median_rank"] = float(np.median(text_ranks))
    return {key: metrics[key] for key in RETRIEVAL_KEYS}


def binding_accuracy(image_embeds, true_text_embeds, distractor_text_embeds,
                     image_index: Sequence[int] | None = None) -> float:
    """
    Percent of probes in which the true caption scores higher than its distractor against the probe's image (a tie
    counts one half, so chance and a collapsed model both give 50).

    Args:
        image_embeds (`(images, dim)`): L2-normalised image embeddings.
        true_text_embeds, distractor_text_embeds (`(probes, dim)`): per probe, the true caption and its distractor.
        image_index (sequence of `int`, *optional*): per probe, the index of its image (default: probe i is image i).
    """
    images = _as_tensor("image_embeds", image_embeds)
    true, distractor = _as_tensor("true_text_embeds", true_text_embeds), _as_tensor("distractor_text_embeds",
                                                                                   distractor_text_embeds)
    if true.shape != distractor.shape:
        raise ValueError(f"true_text_embeds {tuple(true.shape)} and distractor_text_embeds "
                         f"{tuple(distractor.shape)} must have the same shape: one distractor per true caption.")
    if len(true) == 0:
        raise ValueError("binding_accuracy got no probes.")
    index = torch.arange(len(true)) if image_index is None else torch.as_tensor(np.asarray(image_index, dtype=np.int64))
    if index.shape != (len(true),) or index.min() < 0 or index.max() >= len(images):
        raise ValueError(f"image_index needs one index in 0..{len(images) - 1} per probe ({len(true)} probes).")
    probe_images = images[index]
    margin = (probe_images * true).sum(dim=1) - (probe_images * distractor).sum(dim=1)
    return 100.0 * float(((margin > 0).double() + 0.5 * (margin == 0).double()).mean())


@dataclass
class BindingProbe:
    """Probes of a split: per probe, its image, the true caption, its distractor and the kind (`swap` / `flip`)."""

    image_index: list[int] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    distractors: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)


def binding_probe(split, caption_column: str = "captions") -> BindingProbe:
    """
    The binding probe of an mcad-shapes split: for every image, each of its captions against the same wording with
    the colours swapped (`swapped_captions`) and with the relation flipped (`flipped_captions`), where one exists.
    """
    needed = (caption_column, "swapped_captions", "flipped_captions")
    missing = [name for name in needed if name not in split.column_names]
    if missing:
        raise UserError(f"The split has no column {missing}: the binding probe needs mcad-shapes distractor columns "
                        "(see modeling_mcad.shapes).")
    probe = BindingProbe()
    rows = zip(split[caption_column], split["swapped_captions"], split["flipped_captions"])
    for image, (captions, swapped, flipped) in enumerate(rows):
        for kind, distractors in (("swap", swapped), ("flip", flipped)):
            for caption, distractor in zip(captions, distractors):
                if distractor is not None:
                    probe.image_index.append(image)
                    probe.captions.append(caption)
                    probe.distractors.append(distractor)
                    probe.kinds.append(kind)
    return probe


def flatten_captions(split, caption_column: str = "captions") -> tuple[list[str], list[int]]:
    """All captions of a split grouped by image, in order, and each caption's image index (`text_to_image`)."""
    if caption_column not in split.column_names:
        raise UserError(f"The split has no column {caption_column!r} (it has {split.column_names}); "
                        "pass caption_column= naming its list-of-captions column.")
    captions, text_to_image = [], []
    for index, row in enumerate(split[caption_column]):
        row = [row] if isinstance(row, str) else list(row)
        captions += row
        text_to_image += [index] * len(row)
    return captions, text_to_image


def _encode(encode: Callable, items: Sequence, batch_size: int, desc: str, prepare=list) -> torch.Tensor:
    """`encode` over `items` in batches (each batch passed through `prepare` first), L2-normalised, with a bar."""
    embeds = [torch.as_tensor(encode(prepare(items[start : start + batch_size]))).detach().float().cpu()
              for start in progress(range(0, len(items), batch_size), desc=desc)]
    return torch.nn.functional.normalize(torch.cat(embeds), dim=-1)


@torch.no_grad()
def embed_split(encode_images: Callable[[list], torch.Tensor], encode_texts: Callable[[list[str]], torch.Tensor],
                split, texts: Sequence[str], batch_size: int = 64,
                image_column: str = "image") -> tuple[torch.Tensor, torch.Tensor]:
    """
    L2-normalised embeddings of a split's images and of `texts`, on the CPU.

    Args:
        encode_images (`Callable[[list[PIL.Image.Image]], Tensor]`): RGB images -> `(batch, dim)` embeddings.
        encode_texts (`Callable[[list[str]], Tensor]`): texts -> `(batch, dim)` embeddings.
        split (`datasets.Dataset`): one row per image.
        texts (`Sequence[str]`): the texts to encode (e.g. the split's captions, `flatten_captions`).
        batch_size (`int`): images or texts per call of an encoder.
        image_column (`str`): the split's image column.
    """
    from .data import to_rgb

    if image_column not in split.column_names:
        raise UserError(f"The split has no column {image_column!r} (it has {split.column_names}); pass image_column=.")
    # Images are decoded batch by batch: a real gallery does not fit in memory decoded.
    image_embeds = _encode(encode_images, split, batch_size, "evaluating: images",
                           prepare=lambda rows: [to_rgb(image) for image in rows[image_column]])
    return image_embeds, _encode(encode_texts, texts, batch_size, "evaluating: texts")


@torch.no_grad()
def evaluate_model(
    encode_images: Callable[[list], torch.Tensor],
    encode_texts: Callable[[list[str]], torch.Tensor],
    split,
    batch_size: int = 64,
    image_column: str = "image",
    caption_column: str = "captions",
) -> dict[str, float]:
    """
    Retrieval metrics and (where the split has mcad-shapes distractor columns) binding accuracies of any model.

    Args:
        encode_images (`Callable[[list[PIL.Image.Image]], Tensor]`): RGB images -> `(batch, dim)` embeddings.
        encode_texts (`Callable[[list[str]], Tensor]`): captions -> `(batch, dim)` embeddings.
        split (`datasets.Dataset`): one row per image, an image column and a list-of-captions column.
        batch_size (`int`): images or captions per call of an encoder.
        image_column, caption_column (`str`): the column names.

    Returns:
        `RETRIEVAL_KEYS` and, with distractors, `swap_accuracy`, `flip_accuracy`, `binding_accuracy` (all probes).
        Embeddings are L2-normalised here, so the encoders may return raw projections.
    """
    captions, text_to_image = flatten_captions(split, caption_column)
    has_probe = {"swapped_captions", "flipped_captions"} <= set(split.column_names)
    probe = binding_probe(split, caption_column) if has_probe else BindingProbe()
    # Each distinct text is encoded once: the probe's true captions are the gallery's captions.
    rows = {text: row for row, text in enumerate(dict.fromkeys([*captions, *probe.distractors]))}
    image_embeds, text_embeds = embed_split(encode_images, encode_texts, split, list(rows), batch_size, image_column)

    def embeds_of(texts: Sequence[str]) -> torch.Tensor:
        return text_embeds[torch.tensor([rows[text] for text in texts], dtype=torch.long)]

    metrics = retrieval_metrics(image_embeds, embeds_of(captions), text_to_image)
    kinds, image_index = np.asarray(probe.kinds), torch.as_tensor(probe.image_index, dtype=torch.long)
    true, distractor = embeds_of(probe.captions), embeds_of(probe.distractors)
    for key, selected in (("swap_accuracy", kinds == "swap"), ("flip_accuracy", kinds == "flip"),
                          ("binding_accuracy", kinds != "")):
        if selected.any():
            selected = torch.from_numpy(selected)
            metrics[key] = binding_accuracy(image_embeds, true[selected], distractor[selected], image_index[selected])
    return metrics


def rerank(ranks: np.ndarray, candidates: torch.Tensor, scores: torch.Tensor, is_right: torch.Tensor) -> np.ndarray:
    """
    Ranks after re-ranking each query's top-k candidates by a second score: within the top k, the first right
    answer's rank is its place in the re-ranked list; a query with no right answer in its top k keeps its rank.

    Args:
        ranks (`np.ndarray` of shape `(queries,)`): 1-based ranks of the first right answer before re-ranking.
        candidates (`torch.LongTensor` of shape `(queries, k)`): each query's top k, best first (only their count is
            read here; `is_right` and `scores` follow their order).
        scores (`torch.Tensor` of shape `(queries, k)`): the re-ranker's score of each candidate (higher is better).
        is_right (`torch.BoolTensor` of shape `(queries, k)`): whether each candidate is a right answer.
    """
    if not (candidates.shape == scores.shape == is_right.shape):
        raise ValueError(f"candidates {tuple(candidates.shape)}, scores {tuple(scores.shape)} and is_right "
                         f"{tuple(is_right.shape)} must have one shape, (queries, k).")
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    right_in_order = torch.gather(is_right, 1, order)
    has_right = right_in_order.any(dim=1)
    first_right = right_in_order.float().argmax(dim=1) + 1
    reranked = np.array(ranks, copy=True)
    reranked[has_right.numpy()] = first_right[has_right].numpy()
    return reranked


def _match_logits(teachers, pixel_values: torch.Tensor, table: TextTable, pairs: torch.Tensor) -> torch.Tensor:
    """The fusion teacher's match logit of every (image, text row) pair, each image and each text encoded once."""
    texts, text_position = torch.unique(pairs[:, 1], return_inverse=True)
    input_ids, attention_mask = table.rows(texts)
    output = teachers.fuse(pixel_values, input_ids, attention_mask, pairs=torch.stack([pairs[:, 0], text_position], 1))
    return output.match_logits.float().cpu()


def _margin_accuracy(margin: torch.Tensor) -> float:
    """Percent of probes whose true caption scores above its distractor (a tie counts one half)."""
    return 100.0 * float(((margin > 0).double() + 0.5 * (margin == 0).double()).mean())


def chance_embeddings(split, seed: int = 0, dim: int = 64) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Random image and caption embeddings of a split (and each caption's image): retrieval at chance, the floor
    of a split about whose images nothing else is known."""
    captions, text_to_image = flatten_captions(split)
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((len(split), dim), dtype=np.float32),
            rng.standard_normal((len(captions), dim), dtype=np.float32), text_to_image)


@torch.no_grad()
def teacher_gates(teachers, split, top_k: int = 10, floors: Mapping[str, tuple] | None = None, batch_size: int = 256,
                  seed: int = 0) -> dict:
    """
    The teachers' gates on a split grouped by image (DESIGN §6.5): a teacher that fails its gate teaches nothing.
    Select and tune on the validation split; report the test split.

    Measures:
    - `dual`: the dual teacher's retrieval metrics (`RETRIEVAL_KEYS`), and its binding accuracies (swap, flip, all)
      where the split has the distractor columns of the binding probe (`swapped_captions`, `flipped_captions`).
    - `fusion`: the fusion teacher's binding accuracies there: its match logit for the true caption against the
      distractor.
    - `reranked`: retrieval metrics after the fusion teacher re-ranks the dual teacher's top `top_k` (image→text: an
      image's k best captions; text→image: a caption's k best images). R@K for K ≥ k cannot change.
    - `floors`: the retrieval metrics of the baselines the dual teacher must beat.
    - `gates`: `dual_beats_matchers` (dual RSUM above every floor's), `reranking_beats_dual` (re-ranked RSUM above the
      dual teacher's), with distractors `fusion_beats_dual_binding` (fusion binding accuracy above the dual
      teacher's); `passed` (all of them); with distractors also `fusion_binding_above_90` (the aim, not a gate).
    - `rows`: the same figures as table rows (model name -> metrics), for a results table.
    - `candidates`: the dual teacher's top k per query, best first (`"i2t"`: images × k caption positions, `"t2i"`:
      captions × k images), and `candidate_logits`: the fusion teacher's match logits of those pairs, as tensors.

    Args:
        teachers ([`MCADTeacher`] or [`TeacherModels`]): anything with `processors` (`"dual"`, `"fusion"`),
            `encode_images`, `encode_texts` and `fuse`.
        split (`datasets.Dataset`): `image` and `captions` per image (and the distractor columns, for binding).
        top_k (`int`): candidates the fusion teacher re-ranks per query.
        floors (`Mapping[str, tuple]`, *optional*): row name -> `(image_embeds, text_embeds, text_to_image)` of each
            baseline (mcad-shapes: its bag-of-words matchers); default: random embeddings (`chance_embeddings`).
        batch_size (`int`): images or texts per dual-teacher call.
        seed (`int`): the default floor's seed.
    """
    start = time.perf_counter()
    processors = teachers.processors
    captions, text_to_image = flatten_captions(split)
    probe = binding_probe(split) if {"swapped_captions", "flipped_captions"} <= set(split.column_names) else None
    texts = list(dict.fromkeys([*captions, *(probe.distractors if probe else [])]))
    row = {text: index for index, text in enumerate(texts)}
    images = split.cast_column("image", datasets.Image(decode=False))[:]["image"]
    dual_pixels, fusion_pixels = (encode_images(images, processors[name], batch_size) for name in ("dual", "fusion"))
    dual_table, fusion_table = (encode_texts(texts, processors[name]) for name in ("dual", "fusion"))

    image_embeds = torch.cat([teachers.encode_images(chunk).cpu() for chunk in dual_pixels.split(batch_size)])
    text_embeds = torch.cat([teachers.encode_texts(*dual_table.rows(rows)).cpu()
                             for rows in torch.arange(len(texts)).split(batch_size)])
    caption_rows = torch.tensor([row[caption] for caption in captions], dtype=torch.long)
    owner = torch.tensor(text_to_image, dtype=torch.long)

    # Every pair the fusion teacher is asked about, scored once: the probe's and the dual teacher's top k both ways.
    similarity = image_embeds @ text_embeds[caption_rows].t()
    k_texts, k_images = min(top_k, len(captions)), min(top_k, len(split))
    text_candidates = similarity.topk(k_texts, dim=1).indices  # images × k caption positions
    image_candidates = similarity.topk(k_images, dim=0).indices.t()  # captions × k images
    pair_sets = {
        "i2t": torch.stack([torch.arange(len(split)).repeat_interleave(k_texts),
                            caption_rows[text_candidates].flatten()], dim=1),
        "t2i": torch.stack([image_candidates.flatten(), caption_rows.repeat_interleave(k_images)], dim=1),
    }
    if probe:
        probe_images = torch.tensor(probe.image_index, dtype=torch.long)
        true_rows = torch.tensor([row[caption] for caption in probe.captions], dtype=torch.long)
        distractor_rows = torch.tensor([row[distractor] for distractor in probe.distractors], dtype=torch.long)
        pair_sets["true"] = torch.stack([probe_images, true_rows], dim=1)
        pair_sets["distractor"] = torch.stack([probe_images, distractor_rows], dim=1)
    unique_pairs, position = torch.unique(torch.cat(list(pair_sets.values())), dim=0, return_inverse=True)
    logits = _match_logits(teachers, fusion_pixels, fusion_table, unique_pairs)[position]
    logits = dict(zip(pair_sets, logits.split([len(pairs) for pairs in pair_sets.values()])))

    dual = retrieval_metrics(image_embeds, text_embeds[caption_rows], text_to_image)
    fusion = {}
    if probe:
        kinds = np.asarray(probe.kinds)
        dual_margin = ((image_embeds[probe_images] * text_embeds[true_rows]).sum(dim=1)
                       - (image_embeds[probe_images] * text_embeds[distractor_rows]).sum(dim=1))
        fusion_margin = logits["true"] - logits["distractor"]
        for key, selected in (("swap_accuracy", kinds == "swap"), ("flip_accuracy", kinds == "flip"),
                              ("binding_accuracy", kinds != "")):
            if selected.any():
                dual[key] = _margin_accuracy(dual_margin[torch.from_numpy(selected)])
                fusion[key] = _margin_accuracy(fusion_margin[torch.from_numpy(selected)])

    candidates = {"i2t": text_candidates, "t2i": image_candidates}
    candidate_logits = {"i2t": logits["i2t"].view(len(split), k_texts),
                        "t2i": logits["t2i"].view(len(captions), k_images)}
    image_ranks, text_ranks = retrieval_ranks(image_embeds, text_embeds[caption_rows], text_to_image)
    reranked = metrics_from_ranks(
        rerank(image_ranks, text_candidates, candidate_logits["i2t"],
               owner[text_candidates] == torch.arange(len(split))[:, None]),
        rerank(text_ranks, image_candidates, candidate_logits["t2i"], image_candidates == owner[:, None]),
    )
    floors = floors if floors is not None else {"chance (random embeddings)": chance_embeddings(split, seed=seed)}
    floor_metrics = {name: retrieval_metrics(*embeddings) for name, embeddings in floors.items()}

    gates = {"dual_beats_matchers": all(dual["rsum"] > metrics["rsum"] for metrics in floor_metrics.values())}
    if probe:
        gates["fusion_beats_dual_binding"] = fusion.get("binding_accuracy", 0.0) > dual.get("binding_accuracy", 100.0)
    gates["reranking_beats_dual"] = reranked["rsum"] > dual["rsum"]
    gates["passed"] = all(gates.values())
    if probe:
        gates["fusion_binding_above_90"] = fusion.get("binding_accuracy", 0.0) > 90.0
    rows = {"dual teacher": dual, f"fusion teacher (re-ranks dual top-{top_k})": {**reranked, **fusion},
            **floor_metrics}
    return {"dual": dual, "fusion": fusion, "reranked": reranked, "floors": floor_metrics, "gates": gates,
            "rows": rows, "top_k": top_k, "candidates": candidates, "candidate_logits": candidate_logits,
            "seconds": time.perf_counter() - start}


def student_encoders(student, processor, device="cpu") -> tuple[Callable, Callable]:
    """(encode_images, encode_texts) callables of a student and its processor, for `evaluate_model`."""

    @torch.no_grad()
    def encode_images(images):
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        return student.get_image_features(pixel_values).pooler_output

    @torch.no_grad()
    def encode_texts(texts):
        inputs = processor(text=texts, return_tensors="pt", padding=True, truncation=True).to(device)
        return student.get_text_features(**inputs).pooler_output

    return encode_images, encode_texts


def dual_teacher_encoders(teacher) -> tuple[Callable, Callable]:
    """(encode_images, encode_texts) callables of a teacher's dual teacher (an `MCADTeacher` or `TeacherModels`)."""
    processor = teacher.processors["dual"]

    def encode_images(images):
        return teacher.encode_images(processor.image_processor(images, return_tensors="pt")["pixel_values"])

    def encode_texts(texts):
        inputs = processor.tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
        return teacher.encode_texts(inputs["input_ids"], inputs["attention_mask"])

    return encode_images, encode_texts


def load_retrieval_metric(**kwargs):
    """`evaluate.load` of the retrieval metric module (offline, from this package)."""
    import evaluate

    return evaluate.load(RETRIEVAL_METRIC_PATH, **kwargs)


__all__ = ["BINDING_KEYS", "RETRIEVAL_KEYS", "RETRIEVAL_METRIC_PATH", "BindingProbe", "binding_accuracy",
           "binding_probe", "chance_embeddings", "dual_teacher_encoders", "embed_split", "evaluate_model",
           "flatten_captions", "load_retrieval_metric", "metrics_from_ranks", "rerank", "retrieval_metrics",
           "retrieval_ranks", "student_encoders", "teacher_gates"]
