"""The gates of the mcad-shapes teachers (DESIGN §6): a teacher that fails its gate teaches nothing.

`teacher_gates(teachers, split)` measures, on an mcad-shapes split (select on validation, report on test): the dual
teacher against the bag-of-words matchers, the fusion teacher against the dual teacher on binding accuracy, and the
fusion teacher as a re-ranker of the dual teacher's top k.
"""

import time
from collections.abc import Sequence

import datasets
import numpy as np
import torch

from ..data import TextTable, encode_images, encode_texts
from ..evaluation import binding_probe, flatten_captions, metrics_from_ranks, rerank, retrieval_metrics, retrieval_ranks
from .generator import matcher_embeddings

GATE_MATCHERS = ("colour_shape", "colour_shape_orientation")


def _match_logits(teachers, pixel_values: torch.Tensor, table: TextTable, pairs: torch.Tensor) -> torch.Tensor:
    """The fusion teacher's match logit of every (image, text row) pair, each image and each text encoded once."""
    texts, text_position = torch.unique(pairs[:, 1], return_inverse=True)
    input_ids, attention_mask = table.rows(texts)
    output = teachers.fuse(pixel_values, input_ids, attention_mask, pairs=torch.stack([pairs[:, 0], text_position], 1))
    return output.match_logits.float().cpu()


@torch.no_grad()
def teacher_gates(
    teachers,
    split: datasets.Dataset,
    top_k: int = 10,
    matchers: Sequence[str] = GATE_MATCHERS,
    batch_size: int = 256,
    seed: int = 0,
) -> dict:
    """
    The teachers' gates on an mcad-shapes split (DESIGN §6): a teacher that fails its gate teaches nothing. Select
    and tune on the validation split; report the test split.

    Measures:
    - `dual`: the dual teacher's retrieval metrics (`RETRIEVAL_KEYS`) and binding accuracies (swap, flip, all).
    - `fusion`: the fusion teacher's binding accuracies: its match logit for the true caption against the distractor.
    - `reranked`: retrieval metrics after the fusion teacher re-ranks the dual teacher's top `top_k` (image→text: an
      image's k best captions; text→image: a caption's k best images). R@K for K ≥ k cannot change.
    - `matchers`: each bag-of-words matcher's retrieval metrics (`shapes.matcher_embeddings`).
    - `gates`: `dual_beats_matchers` (dual RSUM above every matcher's), `fusion_beats_dual_binding` (fusion binding
      accuracy above the dual teacher's), `reranking_beats_dual` (re-ranked RSUM above the dual teacher's),
      `passed` (all three), and `fusion_binding_above_90` (the aim, not a gate).
    - `rows`: the same figures as table rows (model name -> metrics), for a results table.

    Args:
        teachers ([`MCADTeacher`] or [`TeacherModels`]): anything with `processors` (`"dual"`, `"fusion"`),
            `encode_images`, `encode_texts` and `fuse`.
        split (`datasets.Dataset`): an mcad-shapes split (`image`, `captions`, `swapped_captions`,
            `flipped_captions`, `scene`).
        top_k (`int`): candidates the fusion teacher re-ranks per query.
        matchers (sequence of `str`): the bag-of-words matchers the dual teacher must beat.
        batch_size (`int`): images or texts per dual-teacher call.
        seed (`int`): the matchers' tie-breaking seed.
    """
    start = time.perf_counter()
    processors = teachers.processors
    captions, text_to_image = flatten_captions(split)
    probe = binding_probe(split)
    texts = list(dict.fromkeys([*captions, *probe.distractors]))
    row = {text: index for index, text in enumerate(texts)}
    images = split.cast_column("image", datasets.Image(decode=False))[:]["image"]
    dual_pixels, fusion_pixels = (encode_images(images, processors[name], batch_size) for name in ("dual", "fusion"))
    dual_table, fusion_table = (encode_texts(texts, processors[name]) for name in ("dual", "fusion"))

    image_embeds = torch.cat([teachers.encode_images(chunk).cpu() for chunk in dual_pixels.split(batch_size)])
    text_embeds = torch.cat([teachers.encode_texts(*dual_table.rows(rows)).cpu()
                             for rows in torch.arange(len(texts)).split(batch_size)])
    caption_rows = torch.tensor([row[caption] for caption in captions], dtype=torch.long)
    true_rows = torch.tensor([row[caption] for caption in probe.captions], dtype=torch.long)
    distractor_rows = torch.tensor([row[distractor] for distractor in probe.distractors], dtype=torch.long)
    probe_images = torch.tensor(probe.image_index, dtype=torch.long)
    owner = torch.tensor(text_to_image, dtype=torch.long)

    # Every pair the fusion teacher is asked about, scored once: the probe's and the dual teacher's top k both ways.
    similarity = image_embeds @ text_embeds[caption_rows].t()
    k_texts, k_images = min(top_k, len(captions)), min(top_k, len(split))
    text_candidates = similarity.topk(k_texts, dim=1).indices  # images × k caption positions
    image_candidates = similarity.topk(k_images, dim=0).indices.t()  # captions × k images
    pair_sets = {
        "true": torch.stack([probe_images, true_rows], dim=1),
        "distractor": torch.stack([probe_images, distractor_rows], dim=1),
        "i2t": torch.stack([torch.arange(len(split)).repeat_interleave(k_texts),
                            caption_rows[text_candidates].flatten()], dim=1),
        "t2i": torch.stack([image_candidates.flatten(), caption_rows.repeat_interleave(k_images)], dim=1),
    }
    unique_pairs, position = torch.unique(torch.cat(list(pair_sets.values())), dim=0, return_inverse=True)
    logits = _match_logits(teachers, fusion_pixels, fusion_table, unique_pairs)[position]
    logits = dict(zip(pair_sets, logits.split([len(pairs) for pairs in pair_sets.values()])))

    dual = retrieval_metrics(image_embeds, text_embeds[caption_rows], text_to_image)
    kinds = np.asarray(probe.kinds)
    dual_margin = ((image_embeds[probe_images] * text_embeds[true_rows]).sum(dim=1)
                   - (image_embeds[probe_images] * text_embeds[distractor_rows]).sum(dim=1))
    fusion_margin = logits["true"] - logits["distractor"]
    fusion = {}
    for key, selected in (("swap_accuracy", kinds == "swap"), ("flip_accuracy", kinds == "flip"),
                          ("binding_accuracy", kinds != "")):
        if selected.any():
            dual[key] = _margin_accuracy(dual_margin[torch.from_numpy(selected)])
            fusion[key] = _margin_accuracy(fusion_margin[torch.from_numpy(selected)])

    image_ranks, text_ranks = retrieval_ranks(image_embeds, text_embeds[caption_rows], text_to_image)
    reranked = metrics_from_ranks(
        rerank(image_ranks, text_candidates, logits["i2t"].view(len(split), k_texts),
               owner[text_candidates] == torch.arange(len(split))[:, None]),
        rerank(text_ranks, image_candidates, logits["t2i"].view(len(captions), k_images),
               image_candidates == owner[:, None]),
    )
    matcher_metrics = {name: retrieval_metrics(*matcher_embeddings(split, name, seed=seed)) for name in matchers}

    gates = {
        "dual_beats_matchers": all(dual["rsum"] > metrics["rsum"] for metrics in matcher_metrics.values()),
        "fusion_beats_dual_binding": fusion.get("binding_accuracy", 0.0) > dual.get("binding_accuracy", 100.0),
        "reranking_beats_dual": reranked["rsum"] > dual["rsum"],
    }
    gates["passed"] = all(gates.values())
    gates["fusion_binding_above_90"] = fusion.get("binding_accuracy", 0.0) > 90.0
    rows = {"dual teacher": dual, f"fusion teacher (re-ranks dual top-{top_k})": {**reranked, **fusion}}
    rows.update({f"bag of words ({name})": metrics for name, metrics in matcher_metrics.items()})
    return {"dual": dual, "fusion": fusion, "reranked": reranked, "matchers": matcher_metrics, "gates": gates,
            "rows": rows, "top_k": top_k, "seconds": time.perf_counter() - start}


def _margin_accuracy(margin: torch.Tensor) -> float:
    """Percent of probes whose true caption scores above its distractor (a tie counts one half)."""
    return 100.0 * float(((margin > 0).double() + 0.5 * (margin == 0).double()).mean())




__all__ = ["GATE_MATCHERS", "teacher_gates"]
