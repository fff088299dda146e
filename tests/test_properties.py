"""Property tests (hypothesis) of the retrieval metrics and the processor."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from modeling_mcad import MCADProcessor
from modeling_mcad.evaluation import retrieval_metrics

RECALLS = ("r1", "r5", "r10")


@st.composite
def galleries(draw):
    """Random embeddings of 2-12 images with 1-5 captions each."""
    captions_per_image = draw(st.lists(st.integers(1, 5), min_size=2, max_size=12))
    dim = draw(st.integers(2, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    image_embeds = rng.normal(size=(len(captions_per_image), dim))
    text_embeds = rng.normal(size=(sum(captions_per_image), dim))
    text_to_image = [image for image, count in enumerate(captions_per_image) for _ in range(count)]
    return image_embeds.astype(np.float32), text_embeds.astype(np.float32), text_to_image


@settings(max_examples=60, deadline=None)
@given(galleries())
def test_recall_is_monotone_in_k_and_rsum_is_their_sum(gallery):
    metrics = retrieval_metrics(*gallery)
    for direction in ("i2t", "t2i"):
        values = [metrics[f"{direction}_{r}"] for r in RECALLS]
        assert 0 <= values[0] <= values[1] <= values[2] <= 100
    assert np.isclose(metrics["rsum"], sum(metrics[f"{d}_{r}"] for d in ("i2t", "t2i") for r in RECALLS))


@settings(max_examples=60, deadline=None)
@given(galleries(), st.randoms(use_true_random=False))
def test_the_order_of_captions_changes_nothing(gallery, random):
    image_embeds, text_embeds, text_to_image = gallery
    order = list(range(len(text_to_image)))
    random.shuffle(order)
    shuffled = retrieval_metrics(image_embeds, text_embeds[order], [text_to_image[i] for i in order])
    assert shuffled == retrieval_metrics(image_embeds, text_embeds, text_to_image)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=2, max_size=20))
def test_perfect_embeddings_score_100(captions_per_image):
    image_embeds = torch.eye(len(captions_per_image))
    text_to_image = [image for image, count in enumerate(captions_per_image) for _ in range(count)]
    metrics = retrieval_metrics(image_embeds, image_embeds[text_to_image], text_to_image)
    assert all(metrics[f"{d}_{r}"] == 100 for d in ("i2t", "t2i") for r in RECALLS)
    assert metrics["rsum"] == 600 and metrics["i2t_median_rank"] == metrics["t2i_median_rank"] == 1


PROCESSOR = MCADProcessor.from_preset("tiny")
LIMIT = PROCESSOR.tokenizer.model_max_length


@settings(max_examples=80, deadline=None)
@given(st.lists(st.text(max_size=200), min_size=1, max_size=4))
def test_truncated_text_always_fits_and_is_framed_by_special_tokens(texts):
    encoding = PROCESSOR(text=texts, padding=True, truncation=True, return_tensors="pt")
    ids, mask = encoding["input_ids"], encoding["attention_mask"]
    assert ids.shape[0] == len(texts) and ids.shape[1] <= LIMIT
    tokenizer = PROCESSOR.tokenizer
    for row, length in zip(ids, mask.sum(dim=1)):
        assert row[0] == tokenizer.cls_token_id and row[length - 1] == tokenizer.sep_token_id
        assert (row[length:] == tokenizer.pad_token_id).all()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(max_size=200), min_size=1, max_size=4))
def test_untruncated_text_is_either_encoded_whole_or_refused_by_name(texts):
    lengths = [len(PROCESSOR.tokenizer(text)["input_ids"]) for text in texts]
    try:
        encoding = PROCESSOR(text=texts, padding=True)
    except ValueError as error:
        first_too_long = next(i for i, n in enumerate(lengths) if n > LIMIT)
        assert f"text[{first_too_long}] is {lengths[first_too_long]} tokens long" in str(error)
    else:
        assert max(lengths) <= LIMIT
        assert [sum(mask) for mask in encoding["attention_mask"]] == lengths


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["RGB", "L", "LA", "RGBA", "P", "CMYK", "I;16", "1"]), st.integers(1, 80), st.integers(1, 80))
def test_any_image_mode_and_size_becomes_three_channels_of_the_model_size(mode, width, height):
    image = Image.new(mode, (width, height))
    pixel_values = PROCESSOR(images=[image], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32) and torch.isfinite(pixel_values).all()
