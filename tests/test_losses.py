"""JointLoss: terms per head, weights, options (pos_weight, focal, smoothing), ignore_index, low precision."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from multimodal.config import LossConfig
from multimodal.losses import JointLoss

B, C, T = 4, 5, 3


def outputs_and_targets(seed: int = 0, decoder: bool = True):
    g = torch.Generator().manual_seed(seed)
    outputs = {k: torch.randn(B, C, generator=g, requires_grad=True)
               for k in ("image_logits", "caption_logits", "fused_logits")}
    if decoder:
        outputs["decoder_logits"] = torch.randn(B, T, C + 1, generator=g, requires_grad=True)
    targets = (torch.rand(B, C, generator=g) > 0.5).float()
    label_seq = torch.tensor([[0, 2, C], [1, C, -100], [3, C, -100], [C, -100, -100]])
    return outputs, targets, label_seq


def test_terms_match_torch_and_are_weighted() -> None:
    outputs, targets, label_seq = outputs_and_targets()
    config = LossConfig(image_weight=0.5, caption_weight=0.25, fused_weight=2.0, decoder_weight=3.0)
    terms = JointLoss(config)(outputs, targets, label_seq)
    assert set(terms) == {"image_loss", "caption_loss", "fused_loss", "decoder_loss", "loss"}
    for head in ("image", "caption", "fused"):
        torch.testing.assert_close(terms[f"{head}_loss"],
                                   F.binary_cross_entropy_with_logits(outputs[f"{head}_logits"], targets))
    valid = label_seq != -100
    torch.testing.assert_close(terms["decoder_loss"],
                               F.cross_entropy(outputs["decoder_logits"][valid], label_seq[valid]))
    expected = 0.5 * terms["image_loss"] + 0.25 * terms["caption_loss"] + 2 * terms["fused_loss"] \
        + 3 * terms["decoder_loss"]
    torch.testing.assert_close(terms["loss"], expected)
    terms["loss"].backward()
    assert all(v.grad is not None for v in outputs.values())


def test_absent_heads_are_left_out() -> None:
    outputs, targets, _ = outputs_and_targets(decoder=False)
    del outputs["image_logits"]
    terms = JointLoss()(outputs, targets)
    assert set(terms) == {"caption_loss", "fused_loss", "loss"}
    with pytest.raises(ValueError, match="label_seq"):
        JointLoss()(outputs_and_targets()[0], targets)
    with pytest.raises(ValueError, match="no logits"):
        JointLoss()({}, targets)


def test_pos_weight_focal_and_smoothing() -> None:
    outputs, targets, label_seq = outputs_and_targets()
    logits = outputs["fused_logits"]
    pos_weight = (1.0, 2.0, 3.0, 4.0, 5.0)
    got = JointLoss(LossConfig(pos_weight=pos_weight)).bce(logits, targets)
    torch.testing.assert_close(got, F.binary_cross_entropy_with_logits(logits, targets,
                                                                       pos_weight=torch.tensor(pos_weight)))
    with pytest.raises(ValueError, match="pos_weight"):
        JointLoss(LossConfig(pos_weight=(1.0, 2.0))).bce(logits, targets)

    plain = JointLoss().bce(logits, targets)
    focal = JointLoss(LossConfig(focal_gamma=2.0)).bce(logits, targets)
    p = torch.sigmoid(logits)
    p_t = torch.where(targets.bool(), p, 1 - p)
    manual = (F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * (1 - p_t) ** 2).mean()
    torch.testing.assert_close(focal, manual)
    assert focal < plain

    confident = (targets * 2 - 1) * 20.0  # near-perfect logits
    assert JointLoss().bce(confident, targets) < 1e-6
    smoothed = JointLoss(LossConfig(label_smoothing=0.1))
    torch.testing.assert_close(smoothed.bce(logits, targets),
                               F.binary_cross_entropy_with_logits(logits, targets * 0.9 + 0.05))
    assert smoothed.bce(confident, targets) > 0.1
    valid = label_seq != -100
    torch.testing.assert_close(
        smoothed.sequence_ce(outputs["decoder_logits"], label_seq),
        F.cross_entropy(outputs["decoder_logits"][valid], label_seq[valid], label_smoothing=0.1))
    torch.testing.assert_close(JointLoss().sequence_ce(outputs["decoder_logits"], label_seq),
                               F.cross_entropy(outputs["decoder_logits"][valid], label_seq[valid]))


def test_sequence_without_targets_is_zero_not_nan() -> None:
    logits = torch.randn(2, 3, C + 1, requires_grad=True)
    loss = JointLoss().sequence_ce(logits, torch.full((2, 3), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_give_float32_finite_losses(dtype: torch.dtype) -> None:
    outputs, targets, label_seq = outputs_and_targets()
    extreme = {k: (v.detach() * 40).to(dtype).requires_grad_() for k, v in outputs.items()}  # saturating logits
    terms = JointLoss(LossConfig(focal_gamma=2.0, pos_weight=(2.0,) * C, label_smoothing=0.05))(
        extreme, targets.to(dtype), label_seq)
    for name, value in terms.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
    terms["loss"].backward()
    assert all(torch.isfinite(v.grad.float()).all() for v in extreme.values())


def test_under_cpu_autocast() -> None:
    linear = torch.nn.Linear(8, C)
    x = torch.randn(B, 8) * 100
    _, targets, _ = outputs_and_targets(decoder=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = linear(x)
        assert logits.dtype == torch.bfloat16
        terms = JointLoss()({"fused_logits": logits}, targets)
    assert terms["loss"].dtype == torch.float32 and torch.isfinite(terms["loss"])


def test_asymmetric_loss_replaces_the_bce_with_the_papers_formula() -> None:
    """``asl_gamma_neg``: positives -log p, negatives -p_m^gamma log(1 - p_m) with p_m = max(p - clip, 0), averaged
    over the elements (Ridnik et al. 2021, eq. 6 with gamma+ = 0); not combinable with the focal BCE."""
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 5) * 3, (torch.rand(6, 5) < 0.3).float()
    p = torch.sigmoid(logits)
    p_m = (p - 0.05).clamp(min=0)
    manual = -(targets * torch.log(p) + (1 - targets) * p_m.pow(4) * torch.log(1 - p_m)).mean()
    asl = JointLoss(LossConfig(asl_gamma_neg=4.0))
    torch.testing.assert_close(asl.bce(logits, targets), manual)
    assert asl.bce(logits, targets) < JointLoss().bce(logits, targets)  # easy negatives count for less
    easy_negative = torch.tensor([[-3.0]])  # p = 0.047 < clip: no loss, no gradient
    easy_negative.requires_grad_(True)
    loss = asl.bce(easy_negative, torch.zeros(1, 1))
    loss.backward()
    assert loss.item() == 0 and easy_negative.grad.abs().item() == 0
    with pytest.raises(ValueError, match="focal"):
        JointLoss(LossConfig(asl_gamma_neg=4.0, focal_gamma=1.0))
