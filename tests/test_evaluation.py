import numpy as np
import pytest
import torch

from modeling_mcad.evaluation import (
    RETRIEVAL_KEYS,
    RETRIEVAL_METRIC_PATH,
    binding_accuracy,
    binding_probe,
    evaluate_model,
    rerank,
    retrieval_metrics,
    retrieval_ranks,
)
from modeling_mcad.shapes import make_shapes

# A hand-built gallery: 3 images (one-hot embeddings), 6 captions, two per image.
IMAGES = np.eye(3, dtype=np.float32)
CAPTIONS = np.array([
    [1.0, 0.0, 0.0],  # image 0; its scores against images: 1, 0, 0 -> rank 1
    [0.6, 0.8, 0.0],  # image 0; .6 < .8 (image 1) -> rank 2
    [0.8, 0.6, 0.0],  # image 1; .6 < .8 (image 0) -> rank 2
    [0.8, 0.0, 0.6],  # image 1; 0 < .8, .6 -> rank 3
    [0.0, 0.8, 0.6],  # image 2; .6 < .8 (image 1) -> rank 2
    [0.0, 0.8, 0.6],  # image 2; the same -> rank 2
], dtype=np.float32)
TEXT_TO_IMAGE = [0, 0, 1, 1, 2, 2]
# Image queries: image 0's best own caption scores 1, beaten by nothing -> rank 1. Image 1's best own caption scores
# .6 (caption 2); captions 1, 4 and 5 score .8 -> rank 4. Image 2's own captions score .6, and caption 3 (image 1's)
# ties at .6: a tie counts against the query -> rank 2.
EXPECTED_IMAGE_RANKS = [1, 4, 2]
EXPECTED_TEXT_RANKS = [1, 2, 2, 3, 2, 2]


def test_hand_built_gallery_gives_the_known_ranks_and_metrics():
    image_ranks, text_ranks = retrieval_ranks(IMAGES, CAPTIONS, TEXT_TO_IMAGE)
    assert image_ranks.tolist() == EXPECTED_IMAGE_RANKS
    assert text_ranks.tolist() == EXPECTED_TEXT_RANKS

    metrics = retrieval_metrics(IMAGES, CAPTIONS, TEXT_TO_IMAGE)
    assert tuple(metrics) == RETRIEVAL_KEYS
    assert metrics["i2t_r1"] == pytest.approx(100 / 3)
    assert metrics["i2t_r5"] == metrics["i2t_r10"] == 100.0
    assert metrics["t2i_r1"] == pytest.approx(100 / 6)
    assert metrics["t2i_r5"] == metrics["t2i_r10"] == 100.0
    assert metrics["rsum"] == pytest.approx(100 / 3 + 100 / 6 + 400)
    assert metrics["i2t_median_rank"] == 2.0
    assert metrics["t2i_median_rank"] == 2.0


def _ranks_by_sorting(images: np.ndarray, texts: np.ndarray, text_to_image: np.ndarray):
    """A reference without chunks or ties: sort every query's results and find the first right one."""
    scores = images @ texts.T
    image_ranks = [1 + min(np.flatnonzero(text_to_image[np.argsort(-row)] == i)) for i, row in enumerate(scores)]
    text_ranks = [1 + np.flatnonzero(np.argsort(-column) == text_to_image[j])[0] for j, column in enumerate(scores.T)]
    return np.array(image_ranks), np.array(text_ranks)


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_ranks_match_a_full_sort_for_any_chunk_size(chunk_size):
    rng = np.random.default_rng(0)
    images, texts = rng.standard_normal((40, 8)), rng.standard_normal((130, 8))
    text_to_image = np.concatenate([np.arange(40), rng.integers(0, 40, 90)])  # 1 to many captions per image
    expected = _ranks_by_sorting(images, texts, text_to_image)
    got = retrieval_ranks(images.astype(np.float32), texts.astype(np.float32), text_to_image, chunk_size=chunk_size)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_a_collapsed_model_ranks_last_not_first():
    images, texts = np.ones((12, 2), dtype=np.float32), np.ones((24, 2), dtype=np.float32)
    metrics = retrieval_metrics(images, texts, np.repeat(np.arange(12), 2))
    assert metrics["rsum"] == 0.0
    assert metrics["i2t_median_rank"] == 23.0  # the 22 other images' captions all tie above
    assert metrics["t2i_median_rank"] == 12.0


def test_torch_fp16_and_numpy_inputs_agree():
    as_torch = retrieval_metrics(torch.from_numpy(IMAGES).half(), torch.from_numpy(CAPTIONS).half(),
                                 torch.tensor(TEXT_TO_IMAGE))
    assert as_torch == retrieval_metrics(IMAGES, CAPTIONS, TEXT_TO_IMAGE)


@pytest.mark.parametrize("images, texts, text_to_image, message", [
    (IMAGES, CAPTIONS[:, :2], TEXT_TO_IMAGE, "differ in dimension"),
    (IMAGES, CAPTIONS, TEXT_TO_IMAGE[:-1], "one image index per caption"),
    (IMAGES, CAPTIONS, [0, 0, 1, 1, 1, 3], "outside 0..2"),
    (IMAGES, CAPTIONS, [0, 0, 1, 1, 1, 1], r"Images \[2\] have no caption"),
    (IMAGES * np.nan, CAPTIONS, TEXT_TO_IMAGE, "image_embeds has NaN"),
    (IMAGES[0], CAPTIONS, TEXT_TO_IMAGE, "2-D"),
])
def test_bad_inputs_are_named(images, texts, text_to_image, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(images, texts, text_to_image)


def test_evaluate_module_loads_offline_and_calls_the_same_function(monkeypatch, tmp_path):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(RETRIEVAL_METRIC_PATH, cache_dir=str(tmp_path))
    assert metric.compute(text_embeds=CAPTIONS, text_to_image=TEXT_TO_IMAGE, image_embeds=IMAGES) == \
        retrieval_metrics(IMAGES, CAPTIONS, TEXT_TO_IMAGE)
    # Batches added one by one (as in a distributed evaluation loop) give the same result.
    for start in range(0, 6, 4):
        metric.add_batch(text_embeds=CAPTIONS[start : start + 4], text_to_image=TEXT_TO_IMAGE[start : start + 4])
    assert metric.compute(image_embeds=IMAGES)["i2t_median_rank"] == 2.0


def test_binding_accuracy_counts_wins_and_half_ties():
    images = np.eye(2, dtype=np.float32)
    true = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32)
    distractor = np.array([[0, 1], [1, 0], [1, 0], [0, 2]], dtype=np.float32)
    # probe 0: 1 > 0 win; probe 1: tie (half); probe 2 (image 1): 1 > 0 win; probe 3 (image 1): 1 < 2 loss
    assert binding_accuracy(images, true, distractor, image_index=[0, 0, 1, 1]) == pytest.approx(62.5)
    # Without image_index, probe i is image i: probe 0 wins as before; probe 1 against image 1 scores 0 vs 0, a tie.
    assert binding_accuracy(images, true[:2], distractor[:2]) == pytest.approx(75.0)
    with pytest.raises(ValueError, match="same shape"):
        binding_accuracy(images, true, distractor[:3])


@pytest.fixture(scope="module")
def gallery():
    return make_shapes(seed=3, image_size=32, train=0, validation=0, test=40)["test"]


def test_binding_probe_pairs_every_caption_with_its_swap_and_flip(gallery):
    probe = binding_probe(gallery)
    # Two related objects per image: every caption has both distractors.
    assert probe.kinds.count("swap") == probe.kinds.count("flip") == 5 * len(gallery)
    for image, caption, distractor in zip(probe.image_index, probe.captions, probe.distractors):
        assert caption in gallery[image]["captions"]
        assert distractor != caption
        assert distractor not in gallery[image]["captions"]
    with pytest.raises(ValueError, match="distractor columns"):
        binding_probe(gallery.remove_columns("swapped_captions"))


def test_evaluate_model_scores_an_oracle_perfectly_and_a_constant_model_at_chance(gallery):
    """An oracle that knows each image and caption gets every metric right; a model that outputs one vector for
    everything gets nothing right at retrieval and chance at binding."""
    image_ids = {image.tobytes(): index for index, image in enumerate(gallery["image"])}
    caption_ids = {caption: index for index, captions in enumerate(gallery["captions"]) for caption in captions}
    dim = len(gallery) + 1  # the last axis holds every caption that describes no image (the distractors)
    seen_batches = []

    def encode_images(images):
        seen_batches.append(len(images))
        assert all(image.mode == "RGB" for image in images)
        return torch.nn.functional.one_hot(torch.tensor([image_ids[image.tobytes()] for image in images]), dim)

    def encode_texts(texts):
        return torch.nn.functional.one_hot(torch.tensor([caption_ids.get(text, dim - 1) for text in texts]), dim)

    metrics = evaluate_model(encode_images, encode_texts, gallery, batch_size=16)
    assert metrics["rsum"] == 600.0
    assert metrics["swap_accuracy"] == metrics["flip_accuracy"] == metrics["binding_accuracy"] == 100.0
    assert seen_batches == [16, 16, 8]
    # Without distractor columns (any image-text dataset): retrieval metrics only.
    plain_split = gallery.remove_columns(["swapped_captions", "flipped_captions"])
    plain = evaluate_model(encode_images, encode_texts, plain_split)
    assert tuple(plain) == RETRIEVAL_KEYS and plain["rsum"] == 600.0

    constant = evaluate_model(lambda images: torch.ones(len(images), 4), lambda texts: torch.ones(len(texts), 4),
                              gallery, batch_size=16)
    assert constant["rsum"] == 0.0
    assert constant["swap_accuracy"] == constant["flip_accuracy"] == 50.0


def test_rerank_moves_the_first_right_answer_within_the_top_k_only():
    ranks = np.array([2, 7, 1])
    candidates = torch.tensor([[4, 5, 6], [1, 2, 3], [7, 8, 9]])
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1], [0.1, 0.2, 0.3]])
    is_right = torch.tensor([[False, True, False], [False, False, False], [True, False, False]])
    # Query 0: its right answer (2nd) scores best -> 1; query 1: none in its top k -> unchanged; query 2: -> 3rd.
    assert rerank(ranks, candidates, scores, is_right).tolist() == [1, 7, 3]
    with pytest.raises(ValueError, match="one shape"):
        rerank(ranks, candidates, scores[:, :2], is_right)
