"""The trainable side of distillation: the student and the objective's projections W in one module.

One module, so that Accelerate prepares, checkpoints (safetensors) and, across processes, synchronises both.
Its forward gathers the embeddings of every process *with gradients* before any B×B matrix is formed: each
process then computes the loss of the whole global batch, and the gradients that reach its own embeddings are
the true ones (the all-gather's backward sums the replicas' gradients; DDP's mean divides them again).
"""

import torch
import torch.distributed as dist
from torch import nn

from .modeling_mcad import MCADModel
from .objectives import MCADLoss, MCADLossOutput


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every process along dim 0; gradients flow back to each process's slice."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()), dim=0)


class DistillationModule(nn.Module):
    """
    The student and its objective, trained together.

    Args:
        student ([`MCADModel`]): the student.
        objective ([`MCADLoss`]): the loss, holding the training-only projections W of L_feat.
    """

    def __init__(self, student: MCADModel, objective: MCADLoss):
        super().__init__()
        self.student = student
        self.objective = objective

    def forward(
        self,
        student_inputs: dict[str, torch.Tensor],
        teacher_targets: dict[str, torch.Tensor] | None = None,
        negative_inputs: dict[str, torch.Tensor] | None = None,
        ranking_only: bool = False,
    ) -> MCADLossOutput:
        """
        Args:
            student_inputs: the student processor's `pixel_values`, `input_ids`, `attention_mask` (this process's
                share of the global batch).
            teacher_targets: the teacher targets (the keyword arguments of `MCADLoss.forward`) of the whole global
                batch, in the order of the gathered student embeddings (from the cache or the online teacher): cheap
                to have on every process, unlike the student's embeddings they need no gradients.
            negative_inputs: tokenized hard-negative captions for NegCLIP (`input_ids`, `attention_mask`).
            ranking_only: train on L_rank alone (a ranking warm-up step; see `MCADLoss.forward`).
        """
        output = self.student(**student_inputs)
        image_embeds = gather_with_grad(output.image_embeds.float())
        text_embeds = gather_with_grad(output.text_embeds.float())
        negatives = None
        if negative_inputs is not None:
            negatives = self.student(**negative_inputs).text_embeds
            negatives = gather_with_grad(negatives.float())
        return self.objective(image_embeds, text_embeds, self.student.logit_scale, negative_text_embeds=negatives,
                              ranking_only=ranking_only, **(teacher_targets or {}))
