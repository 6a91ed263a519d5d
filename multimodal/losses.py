"""The joint training loss: binary cross-entropy on every classification head plus the label decoder's sequence
cross-entropy, each term reported on its own."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import AsymmetricLossMultiLabel

from .config import LossConfig

IGNORE_INDEX = -100
HEADS = ("image", "caption", "fused")


class JointLoss(nn.Module):
    """Weighted sum of BCE-with-logits on the ``image``/``caption``/``fused`` logits and cross-entropy on the
    ``decoder`` logits; a term whose output is absent is simply left out.

    Every term is computed in float32 from the logits (``.float()`` first, never sigmoid-then-BCE), so it is safe
    under fp16/bf16 autocast. Options (`LossConfig`): ``pos_weight`` [C] weighs the positives of each class;
    ``focal_gamma > 0`` multiplies each BCE element by ``(1 - p_t) ** gamma`` (focal loss, Lin et al. 2017) to
    down-weight easy negatives; ``label_smoothing`` moves the BCE targets to ``eps / 2`` and ``1 - eps / 2`` and is
    passed to the decoder's cross-entropy. ``asl_gamma_neg > 0`` replaces the BCE by timm's asymmetric loss
    (`timm.loss.AsymmetricLossMultiLabel`, Ridnik et al. 2021: easy negatives down-weighted by ``p_m ** gamma_neg``
    and those below ``asl_clip`` discarded), a mean over the elements like the BCE; it is not combined with the
    focal, ``pos_weight`` or smoothing options.
    """

    def __init__(self, config: LossConfig = LossConfig()):
        super().__init__()
        self.config = config
        self.weights = {"image": config.image_weight, "caption": config.caption_weight,
                        "fused": config.fused_weight, "decoder": config.decoder_weight}
        pos_weight = None if config.pos_weight is None else torch.tensor(config.pos_weight, dtype=torch.float32)
        self.register_buffer("pos_weight", pos_weight, persistent=False)
        self.asymmetric = None
        if config.asl_gamma_neg > 0:
            if config.focal_gamma > 0 or config.pos_weight is not None or config.label_smoothing > 0:
                raise ValueError("the asymmetric loss replaces the BCE: it is not combined with focal_gamma, "
                                 "pos_weight or label_smoothing")
            self.asymmetric = AsymmetricLossMultiLabel(gamma_neg=config.asl_gamma_neg,
                                                       gamma_pos=config.asl_gamma_pos, clip=config.asl_clip,
                                                       reduction="mean")

    def bce(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean (focal) BCE over [B, C] elements."""
        logits, targets = logits.float(), targets.float()
        if self.asymmetric is not None:
            return self.asymmetric(logits, targets)
        if self.pos_weight is not None and self.pos_weight.numel() != logits.shape[-1]:
            raise ValueError(f"pos_weight has {self.pos_weight.numel()} values but the logits {logits.shape[-1]} "
                             "classes")
        eps = self.config.label_smoothing
        smoothed = targets * (1.0 - eps) + 0.5 * eps if eps > 0 else targets
        pos_weight = None if self.pos_weight is None else self.pos_weight.to(logits.device)
        loss = F.binary_cross_entropy_with_logits(logits, smoothed, pos_weight=pos_weight, reduction="none")
        if self.config.focal_gamma > 0:
            p = torch.sigmoid(logits)
            p_t = p * targets + (1.0 - p) * (1.0 - targets)  # probability of the true outcome
            loss = loss * (1.0 - p_t).pow(self.config.focal_gamma)
        return loss.mean()

    def sequence_ce(self, logits: torch.Tensor, label_seq: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the decoder steps that are not ``-100``; logits [B, T, C + 1], label_seq [B, T]."""
        logits = logits.float().flatten(0, 1)  # [B * T, C + 1]
        target = label_seq.flatten()  # [B * T]
        # The mean over the steps that count, as reduction="mean" takes it, but 0 instead of NaN when none counts
        # (the graph, and DDP, stay intact), and without asking the device which case it is: that would make the
        # host wait for it on every step.
        total = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX,
                                label_smoothing=self.config.label_smoothing, reduction="sum")
        return total / (target != IGNORE_INDEX).sum().clamp(min=1)

    def forward(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor,
                label_seq: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Args:
            outputs: the model's `forward` result.
            targets: multi-hot [B, C].
            label_seq: [B, T] decoder targets, needed when ``outputs`` has ``decoder_logits``.

        Returns:
            ``{"<head>_loss": ..., "decoder_loss": ..., "loss": weighted sum}`` (float32 scalars).
        """
        terms = {}
        for head in HEADS:
            if f"{head}_logits" in outputs:
                terms[head] = self.bce(outputs[f"{head}_logits"], targets)
        if "decoder_logits" in outputs:
            if label_seq is None:
                raise ValueError("outputs has decoder_logits: pass label_seq to the loss")
            terms["decoder"] = self.sequence_ce(outputs["decoder_logits"], label_seq)
        if not terms:
            raise ValueError(f"no logits to compute a loss on; outputs has {sorted(outputs)}")
        result = {f"{name}_loss": value for name, value in terms.items()}
        result["loss"] = sum(self.weights[name] * value for name, value in terms.items())
        return result
