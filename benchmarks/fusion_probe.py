"""Fusion stacks over the ablation's trained dual teacher (issue 8): can a cross-encoder learn relations here?

    python benchmarks/fusion_probe.py [--root outputs/ablation] [--steps 1200] [--canonical_steps 300]
        [--wording_ramp_steps 0] [--no_siblings] [--grounding 1.0] [--layers 4] [--lr 5e-4]

Needs the teachers and data of `python benchmarks/distill_table.py` (ROOT/teacher, ROOT/data). An experiment, not
a recipe that ships: it tests the structure BENCHMARKS.md proposed after ViLT and BLIP from scratch failed their
gate, ALBEF / BLIP's own: a fusion stack over aligned unimodal states.

- The dual teacher (CLIP) is frozen; its token states of every training image and text are computed once (cached
  in ROOT/fusion_probe_states.pt, ≈ 1.5 GB in float16).
- Fusion stack: [fusion token; text states → width; patch states → width + 2D sine-cosine positions] through a
  pre-norm transformer; m = head(f) + w · <v, t> (the CLIP similarity added, as BLIP adds ITC to ITM when it
  re-ranks), so at step 0 it scores as the dual teacher does.
- Loss: listwise — per image, CE over {caption, swap, flip, hardest in-batch caption, random caption}; per caption,
  CE over {its image, up to three family siblings it is false of (`--no_siblings`: none), hardest in-batch image}.
  Batches hold whole families.
- Curriculum: `--canonical_steps` of canonical captions only (left / top object named first; no flip distractors,
  which the relation word alone would tell), then inverse wordings for a share of images rising to 1 over
  `--wording_ramp_steps`.
- `--grounding λ`: an auxiliary loss — from each positive caption's shape-word states after layer
  `--grounding_layer`, regress where in the image that object is (`shapes.caption_grounding`).
- `--relation λ`: an auxiliary loss — from the relation word's state after that layer, in the caption and in its
  relation flip, predict whether the first-named object is left of / above the second (the canonical flag): the
  order half of the XOR, supervised where the relation word cannot give it away.

Prints, every `--eval_every` steps, validation accuracy of the true caption against its colour swap and its
relation flip (the flip split by canonical / inverse wording), of the true image against the family siblings the
caption is false of (canonical / inverse), and against a random caption.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from modeling_mcad.evaluation import binding_probe, flatten_captions  # noqa: E402
from modeling_mcad.shapes import ORIENTATION_WORDS, SHAPES, caption_grounding, caption_is_true  # noqa: E402
from modeling_mcad.teacher_training import (  # noqa: E402
    TrainingPairs,
    _prepare_cpu,
    _sincos_positions,
    encode_images,
    encode_texts,
)
from modeling_mcad.teachers import MCADTeacher  # noqa: E402


def false_siblings(captions: list[str], image_of: list[int], families: list[int], scenes: list[str]) -> list[list[int]]:
    """Per caption, the other images of its image's family that it is false of (`shapes.caption_is_true`)."""
    members: dict[int, list[int]] = {}
    for image, family in enumerate(families):
        members.setdefault(family, []).append(image)
    return [[other for other in members[families[image]]
             if other != image and not caption_is_true(caption, scenes[other])]
            for caption, image in zip(captions, image_of)]


@torch.no_grad()
def image_states(dual, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch states (float16) and v, the L2-normalised image embeddings."""
    states = torch.cat([dual.vision_model(pixel_values=chunk).last_hidden_state for chunk in pixel_values.split(256)])
    embeds = dual.visual_projection(dual.vision_model.post_layernorm(states[:, 0]))
    return states.half(), F.normalize(embeds, dim=-1)


@torch.no_grad()
def text_states(dual, table) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token states (float16), the attention mask and t, the L2-normalised text embeddings."""
    states, embeds = [], []
    for start in range(0, len(table.input_ids), 1024):
        output = dual.text_model(input_ids=table.input_ids[start : start + 1024],
                                 attention_mask=table.attention_mask[start : start + 1024])
        states.append(output.last_hidden_state.half())
        embeds.append(F.normalize(dual.text_projection(output.pooler_output), dim=-1))
    return torch.cat(states), table.attention_mask.bool(), torch.cat(embeds)


class FusionStack(nn.Module):
    def __init__(self, dual_width: int, grid: int, width: int, layers: int, max_length: int):
        super().__init__()
        self.image_projection = nn.Sequential(nn.LayerNorm(dual_width), nn.Linear(dual_width, width))
        self.text_projection = nn.Sequential(nn.LayerNorm(dual_width), nn.Linear(dual_width, width))
        self.register_buffer("patch_positions", _sincos_positions(grid, width))
        self.text_positions = nn.Parameter(torch.randn(max_length, width) * 0.02)
        self.modality = nn.Parameter(torch.randn(2, width) * 0.02)
        self.fusion_token = nn.Parameter(torch.randn(width) * 0.02)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(width, width // 32, 4 * width, dropout=0.0,
                                                               activation="gelu", batch_first=True, norm_first=True)
                                    for _ in range(layers))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 1))
        self.contrastive_weight = nn.Parameter(torch.tensor(10.0))
        self.grounding_head = nn.Linear(width, 2)
        self.relation_head = nn.Linear(width, 1)

    def forward(self, images, texts, mask, image_embeds, text_embeds, grounding_layer: int = 0):
        """Match logits of pairs (images[p], texts[p]) and the text positions' states after layer `grounding_layer`."""
        pairs, length = texts.shape[:2]
        sequence = torch.cat([
            self.fusion_token.expand(pairs, 1, -1),
            self.text_projection(texts.float()) + self.modality[0] + self.text_positions[:length],
            self.image_projection(images.float()) + self.patch_positions + self.modality[1],
        ], dim=1)
        padding = torch.cat([torch.zeros(pairs, 1, dtype=torch.bool), ~mask,
                             torch.zeros(pairs, images.shape[1], dtype=torch.bool)], dim=1)
        text_middle = None
        for depth, layer in enumerate(self.layers, start=1):
            sequence = layer(sequence, src_key_padding_mask=padding)
            if depth == grounding_layer:
                text_middle = sequence[:, 1 : 1 + length]
        logits = self.head(sequence[:, 0]).squeeze(-1) + self.contrastive_weight * (image_embeds * text_embeds).sum(-1)
        return logits, text_middle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="outputs/ablation")
    parser.add_argument("--train_images", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--canonical_steps", type=int, default=300)
    parser.add_argument("--wording_ramp_steps", type=int, default=0)
    parser.add_argument("--no_siblings", action="store_true")
    parser.add_argument("--grounding", type=float, default=1.0)
    parser.add_argument("--grounding_layer", type=int, default=2)
    parser.add_argument("--relation", type=float, default=0.0)
    parser.add_argument("--eval_every", type=int, default=150)
    args = parser.parse_args()
    print(json.dumps(vars(args)), flush=True)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    started = time.perf_counter()
    root = Path(args.root)
    teacher = MCADTeacher.from_pretrained(root / "teacher")
    dual, processor = teacher.dual.float().eval(), teacher.processors["dual"]
    _prepare_cpu(dual)
    data = datasets.load_from_disk(str(next((root / "data").iterdir())))
    train, validation = data["train"].select(range(args.train_images)), data["validation"]
    pairs = TrainingPairs.from_split(train, {"dual": processor})
    cache = root / "fusion_probe_states.pt"
    if cache.exists():
        images, image_embeds, texts, masks, text_embeds = torch.load(cache, weights_only=True)
    else:
        images, image_embeds = image_states(dual, pairs.pixel_values["dual"])
        texts, masks, text_embeds = text_states(dual, pairs.tables["dual"])
        torch.save((images, image_embeds, texts, masks, text_embeds), cache)

    # Per pair: the family siblings its caption is false of, and where its named objects are (shape-word tokens).
    scenes = train["scene"]
    captions = [pairs.texts[row] for row in pairs.caption_row.tolist()]
    siblings = torch.full((len(pairs), 3), -1, dtype=torch.long)
    if not args.no_siblings:
        for pair, false_of in enumerate(false_siblings(captions, pairs.image_index.tolist(), pairs.family.tolist(),
                                                       scenes)):
            siblings[pair, : len(false_of[:3])] = torch.tensor(false_of[:3], dtype=torch.long)
    shape_ids = set(processor.tokenizer.convert_tokens_to_ids(list(SHAPES)))
    token_of, centre, grounded = (torch.zeros(len(pairs), 3, dtype=torch.long), torch.zeros(len(pairs), 3, 2),
                                  torch.zeros(len(pairs), 3, dtype=torch.bool))
    for pair, (image, row) in enumerate(zip(pairs.image_index.tolist(), pairs.caption_row.tolist())):
        tokens = [t for t, token in enumerate(pairs.tables["dual"].input_ids[row].tolist()) if token in shape_ids]
        for named, ((x, y), token) in enumerate(zip(caption_grounding(captions[pair], scenes[image]), tokens)):
            token_of[pair, named], centre[pair, named], grounded[pair, named] = token, torch.tensor([x, y]), True
    centre = (centre - 0.5) * 4  # about unit variance
    relation_ids = set(processor.tokenizer.convert_tokens_to_ids(list(ORIENTATION_WORDS)))
    relation_token = torch.tensor([next((t for t, token in enumerate(ids) if token in relation_ids), 0)
                                   for ids in pairs.tables["dual"].input_ids.tolist()])
    print(f"states and targets ready, {time.perf_counter() - started:.0f} s", flush=True)

    # Validation: the binding probe, and each caption's image against the siblings it is false of.
    probe = binding_probe(validation)
    row_of = {text: index for index, text in enumerate(dict.fromkeys(probe.captions + probe.distractors))}
    columns = validation.with_format(None)[:]
    canonical_of = {caption: flag for captions, flags in zip(columns["captions"], columns["canonical"])
                    for caption, flag in zip(captions, flags)}
    val_captions, val_image_of = flatten_captions(validation)
    sibling_pairs = [  # (image, sibling, caption row, canonical)
        (image, other, row_of.setdefault(caption, len(row_of)), canonical_of[caption])
        for caption, image, false_of in zip(val_captions, val_image_of, false_siblings(
            val_captions, val_image_of, columns["family"], columns["scene"]))
        for other in false_of]
    val_images, val_image_embeds = image_states(dual, encode_images(
        validation.cast_column("image", datasets.Image(decode=False))[:]["image"], processor))
    val_texts, val_masks, val_text_embeds = text_states(dual, encode_texts(list(row_of), processor))
    probe_image = torch.tensor(probe.image_index)
    probe_caption = torch.tensor([row_of[c] for c in probe.captions])
    probe_distractor = torch.tensor([row_of[c] for c in probe.distractors])
    probe_random = probe_caption[torch.roll(torch.arange(len(probe_caption)), 97)]
    kinds, probe_canonical = np.array(probe.kinds), np.array([canonical_of[c] for c in probe.captions])
    sibling_image, sibling_other, sibling_caption, sibling_canonical = (torch.tensor(c) for c in zip(*sibling_pairs))
    sibling_canonical = sibling_canonical.numpy()

    model = FusionStack(images.shape[-1], dual.config.vision_config.image_size // dual.config.vision_config.patch_size,
                        args.width, args.layers, texts.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1, (s + 1) / 50) * 0.5 * (
        1 + math.cos(math.pi * min(s, args.steps) / args.steps)))

    def score(image_table, image_embed_table, text_table, mask_table, text_embed_table, image_rows, text_rows,
              grounding_layer=0):
        length = int(mask_table[text_rows].sum(1).max())
        return model(image_table[image_rows], text_table[text_rows, :length], mask_table[text_rows, :length],
                     image_embed_table[image_rows], text_embed_table[text_rows], grounding_layer)

    @torch.no_grad()
    def evaluate(step: int) -> None:
        model.eval()
        tables = (val_images, val_image_embeds, val_texts, val_masks, val_text_embeds)

        def logits(image_rows, text_rows):
            return torch.cat([score(*tables, i, t)[0] for i, t in zip(image_rows.split(2048), text_rows.split(2048))])

        true = logits(probe_image, probe_caption)
        margin = (true - logits(probe_image, probe_distractor)).numpy()
        sibling_margin = (logits(sibling_image, sibling_caption) - logits(sibling_other, sibling_caption)).numpy()

        def accuracy(values):
            return round(100 * float((values > 0).mean()), 1)

        flips = kinds == "flip"
        print(json.dumps({
            "step": step, "swap": accuracy(margin[kinds == "swap"]), "flip": accuracy(margin[flips]),
            "flip_canonical": accuracy(margin[flips & probe_canonical]),
            "flip_inverse": accuracy(margin[flips & ~probe_canonical]),
            "siblings_canonical": accuracy(sibling_margin[sibling_canonical]),
            "siblings_inverse": accuracy(sibling_margin[~sibling_canonical]),
            "random": accuracy((true - logits(probe_image, probe_random)).numpy()),
            "seconds": round(time.perf_counter() - started)}), flush=True)
        model.train()

    evaluate(0)
    generator = torch.Generator().manual_seed(0)
    step, losses = 0, []
    while step < args.steps:
        canonical_phase = step < args.canonical_steps
        ramped = (step - args.canonical_steps + 50) / max(args.wording_ramp_steps, 1)
        share = 0.0 if canonical_phase else min(1.0, ramped)
        for index in pairs.epoch_batches(step, args.batch_size, 0, share, group_families=True):
            image, caption = pairs.image_index[index], pairs.caption_row[index]
            swapped, flipped = pairs.swapped_row[index], pairs.flipped_row[index]
            similarity = image_embeds[image] @ text_embeds[caption].t()
            similarity[caption[:, None] == caption[None, :]] = -9
            mined_text, mined_image = caption[similarity.argmax(1)], image[similarity.argmax(0)]
            random_text = caption[torch.randint(len(caption), (len(caption),), generator=generator)]
            candidates = torch.stack([caption, torch.where(swapped >= 0, swapped, random_text),
                                      torch.where(flipped >= 0, flipped, mined_text), mined_text, random_text], 1)
            valid = torch.ones_like(candidates, dtype=torch.bool)
            valid[:, 1], valid[:, 2] = swapped >= 0, (flipped >= 0) & (not canonical_phase)
            sibling = siblings[index]
            image_candidates = torch.cat([torch.where(sibling >= 0, sibling, image[:, None]), mined_image[:, None]], 1)
            image_valid = torch.cat([torch.ones(len(index), 1, dtype=torch.bool), sibling >= 0,
                                     torch.ones(len(index), 1, dtype=torch.bool)], 1)
            logits, positions = score(images, image_embeds, texts, masks, text_embeds,
                                      torch.cat([image.repeat_interleave(5), image_candidates.flatten()]),
                                      torch.cat([candidates.flatten(), caption.repeat_interleave(4)]),
                                      args.grounding_layer if args.grounding or args.relation else 0)
            text_logits = logits[: 5 * len(index)].view(-1, 5).masked_fill(~valid, -1e4)
            image_logits = torch.cat([text_logits[:, :1], logits[5 * len(index) :].view(-1, 4)], 1)
            target = torch.zeros(len(index), dtype=torch.long)
            loss = (F.cross_entropy(text_logits, target)
                    + F.cross_entropy(image_logits.masked_fill(~image_valid, -1e4), target))
            rows = torch.arange(len(index))
            if args.grounding:
                positives = positions[: 5 * len(index) : 5]
                predicted = model.grounding_head(positives[rows[:, None], token_of[index]])
                loss = loss + args.grounding * ((predicted - centre[index]) ** 2).sum(-1)[grounded[index]].mean()
            if args.relation:
                # Whether the first-named object is left of / above the second, read at the relation word of the
                # caption and of its flip (the same objects, the other word): the image decides, not the word.
                related = flipped >= 0
                for column, texts_of in ((0, caption), (2, flipped.clamp(min=0))):
                    states = positions[column : 5 * len(index) : 5][rows, relation_token[texts_of]]
                    predicted = model.relation_head(states).squeeze(-1)
                    target = pairs.canonical[index].float()
                    loss = loss + args.relation * F.binary_cross_entropy_with_logits(predicted[related],
                                                                                     target[related]) / 2
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            step += 1
            if step % 50 == 0:
                print(f"step {step} loss {np.mean(losses[-50:]):.4f}", flush=True)
            if step % args.eval_every == 0:
                evaluate(step)
            if step >= args.steps or canonical_phase != (step < args.canonical_steps) or (
                    not canonical_phase and share < 1 and step % 50 == 0):
                break


if __name__ == "__main__":
    main()
