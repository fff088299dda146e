"""Image-text retrieval (Flickr30K / COCO protocol) as an `evaluate` metric module.

    import evaluate
    from modeling_mcad.evaluation import RETRIEVAL_METRIC_PATH

    retrieval = evaluate.load(RETRIEVAL_METRIC_PATH)
    retrieval.compute(text_embeds=text_embeds, text_to_image=text_to_image, image_embeds=image_embeds)

It calls `modeling_mcad.evaluation.retrieval_metrics`: one implementation, documented there.
"""

import datasets
import evaluate
import numpy as np

from modeling_mcad.evaluation import retrieval_metrics

_DESCRIPTION = """
Recall@1/5/10 for image->text and text->image retrieval, their sum (RSUM) and the median ranks. An image query is
right at K if any of its captions is among the K best-scoring captions; a caption query if its image is among the K
best images. Scores are dot products of the given (L2-normalised) embeddings; ties count against the query.
"""

_KWARGS_DESCRIPTION = """
Args:
    text_embeds (`list` of float lists, shape (texts, dim)): one embedding per caption (added with `add_batch` or
        passed to `compute`).
    text_to_image (`list[int]`, length texts): the index of each caption's image in `image_embeds`.
    image_embeds (array of shape (images, dim)): the gallery, passed to `compute`.
    chunk_size (`int`, *optional*, defaults to 1024): queries per block of the score matrix.
Returns:
    i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10 (percent), rsum, i2t_median_rank, t2i_median_rank.
Examples:
    >>> retrieval = evaluate.load(RETRIEVAL_METRIC_PATH)
    >>> retrieval.compute(text_embeds=[[1.0, 0.0], [0.0, 1.0]], text_to_image=[0, 1],
    ...                   image_embeds=[[1.0, 0.0], [0.0, 1.0]])["rsum"]
    600.0
"""

_CITATION = """
@inproceedings{young2014flickr30k,
  title={From image descriptions to visual denotations},
  author={Young, Peter and Lai, Alice and Hodosh, Micah and Hockenmaier, Julia},
  booktitle={TACL},
  year={2014}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Retrieval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "text_embeds": datasets.Sequence(datasets.Value("float32")),
                "text_to_image": datasets.Value("int64"),
            }),
        )

    def _compute(self, text_embeds, text_to_image, image_embeds, chunk_size=1024):
        return retrieval_metrics(np.asarray(image_embeds, dtype=np.float32), np.asarray(text_embeds, dtype=np.float32),
                                 text_to_image, chunk_size=chunk_size)
