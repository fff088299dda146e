"""The shapes fusion teacher against its gate, step by step (issue 8): which structure learns relations here?

    python benchmarks/fusion_probe.py [--root outputs/ablation] [--steps 700] [--canonical_steps 200] \
        [--readout relation|none] [--grounding 1.0] [--relation 1.0] [--no_siblings] [--layers 4] [--width 128] \
        [--lr 5e-4] [--train_images 10000]

Needs the dual teacher and data of `python benchmarks/distill_table.py` (ROOT/teacher, ROOT/data). Trains an
`MCADFusionModel` over that dual teacher with `teacher_training.train_fusion_stack` (the recipe the teachers stage
runs; see its docstring) and prints, every `--eval_every` steps, on the validation split: accuracy of the true
caption against its colour swap and its relation flip (the flip split by canonical / inverse wording), of the true
image against the family siblings the caption is false of (canonical / inverse), against a random caption, and of
the relation head's object order read at the relation word. `--readout none` drops the relation readout from the
match logit (the additive head of BENCHMARKS.md's second round).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from modeling_mcad.evaluation import binding_probe, flatten_captions  # noqa: E402
from modeling_mcad.fusion_teacher import MCADFusionModel  # noqa: E402
from modeling_mcad.teacher_training import (  # noqa: E402
    encode_images,
    encode_texts,
    false_siblings,
    first_relation_token,
    fuse_cached,
    fusion_stack_states,
    train_fusion_stack,
)
from modeling_mcad.teachers import MCADTeacher  # noqa: E402


def accuracy(margins: np.ndarray) -> float:
    return round(100 * float((margins > 0).mean()), 1)


class ValidationProbe:
    """Scores a fusion model on the validation split: binding, family siblings, random captions, object order."""

    def __init__(self, model: MCADFusionModel, validation: datasets.Dataset, processor):
        probe = binding_probe(validation)
        row_of = {text: index for index, text in enumerate(dict.fromkeys(probe.captions + probe.distractors))}
        columns = validation.with_format(None)[:]
        canonical_of = {caption: flag for captions, flags in zip(columns["captions"], columns["canonical"])
                        for caption, flag in zip(captions, flags)}
        captions, image_of = flatten_captions(validation)
        siblings = [(image, other, row_of.setdefault(caption, len(row_of)), canonical_of[caption])
                    for caption, image, false_of in zip(captions, image_of, false_siblings(
                        captions, image_of, columns["family"], columns["scene"]))
                    for other in false_of]
        table = encode_texts(list(row_of), processor)
        pixels = encode_images(validation.cast_column("image", datasets.Image(decode=False))[:]["image"], processor)
        self.states = fusion_stack_states(model, pixels, table)
        self.relation_token = first_relation_token(table.input_ids, processor.tokenizer)
        self.image = torch.tensor(probe.image_index)
        self.caption = torch.tensor([row_of[c] for c in probe.captions])
        self.distractor = torch.tensor([row_of[c] for c in probe.distractors])
        self.random = self.caption[torch.roll(torch.arange(len(self.caption)), 97)]
        self.kinds, self.canonical = np.array(probe.kinds), np.array([canonical_of[c] for c in probe.captions])
        self.sibling_image, self.sibling_other, self.sibling_caption, canonical = (torch.tensor(c)
                                                                                   for c in zip(*siblings))
        self.sibling_canonical = canonical.numpy()

    @torch.no_grad()
    def __call__(self, model: MCADFusionModel) -> dict:
        def outputs(image_rows, text_rows):
            return [fuse_cached(model, self.states, i, t) for i, t in zip(image_rows.split(2048),
                                                                         text_rows.split(2048))]

        def logits(image_rows, text_rows):
            return torch.cat([output.match_logits for output in outputs(image_rows, text_rows)]).numpy()

        true = logits(self.image, self.caption)
        margin = true - logits(self.image, self.distractor)
        siblings = logits(self.sibling_image, self.sibling_caption) - logits(self.sibling_other, self.sibling_caption)
        flips = self.kinds == "flip"
        flip_captions = self.caption[flips]
        states = torch.cat([output.relation_states[torch.arange(len(output.relation_states)),
                                                   self.relation_token[rows]]
                            for output, rows in zip(outputs(self.image[flips], flip_captions),
                                                    flip_captions.split(2048))])
        order = model.relation_head(states).squeeze(-1).numpy()
        canonical = self.canonical[flips]
        return {"swap": accuracy(margin[self.kinds == "swap"]), "flip": accuracy(margin[flips]),
                "flip_canonical": accuracy(margin[flips & self.canonical]),
                "flip_inverse": accuracy(margin[flips & ~self.canonical]),
                "siblings_canonical": accuracy(siblings[self.sibling_canonical]),
                "siblings_inverse": accuracy(siblings[~self.sibling_canonical]),
                "random": accuracy(true - logits(self.image, self.random)),
                "order_at_relation_word": accuracy(np.where(canonical, order, -order))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="outputs/ablation")
    parser.add_argument("--train_images", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--canonical_steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--relation_layer", type=int, default=None, help="default: half the depth")
    parser.add_argument("--readout", choices=("relation", "none"), default="relation")
    parser.add_argument("--grounding", type=float, default=1.0)
    parser.add_argument("--relation", type=float, default=1.0)
    parser.add_argument("--no_siblings", action="store_true")
    parser.add_argument("--eval_every", type=int, default=100)
    args = parser.parse_args()
    print(json.dumps(vars(args)), flush=True)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    started = time.perf_counter()
    root = Path(args.root)
    teacher = MCADTeacher.from_pretrained(root / "teacher")
    processor = teacher.processors["dual"]
    data = datasets.load_from_disk(str(next((root / "data").iterdir())))
    train = data["train"].select(range(args.train_images))
    model = MCADFusionModel.from_dual_teacher(teacher.dual.float(), hidden_size=args.width,
                                              num_hidden_layers=args.layers, relation_layer=args.relation_layer,
                                              relation_readout=args.readout == "relation")
    probe = ValidationProbe(model, data["validation"], processor)

    def report(step: int, model: MCADFusionModel) -> None:
        if step % args.eval_every == 0:
            model.eval()
            print(json.dumps({"step": step, **probe(model), "seconds": round(time.perf_counter() - started)}),
                  flush=True)
            model.train()
            model.unimodal.eval()

    print(json.dumps({"step": 0, **probe(model)}), flush=True)
    history = train_fusion_stack(model, processor, train, steps=args.steps, canonical_steps=args.canonical_steps,
                                 lr=args.lr, batch_size=args.batch_size, grounding=args.grounding,
                                 relation=args.relation, siblings=not args.no_siblings, on_step=report)
    print(f"loss {np.mean(history.losses[:50]):.3f} -> {np.mean(history.losses[-50:]):.3f}, "
          f"{history.seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
