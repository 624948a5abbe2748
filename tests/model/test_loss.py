"""lm_loss against its formulas, computed here by hand from log-softmax."""

import pytest
import torch

from flowtrain.model.loss import LossParts, lm_loss


def make(seed=0, shape=(3, 5), vocab=11):
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(*shape, vocab, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, shape, generator=gen)
    return logits, targets


def log_probs(logits):
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def test_plain_cross_entropy_is_mean_nll():
    logits, targets = make()
    parts = lm_loss(logits, targets)
    assert isinstance(parts, LossParts)
    nll = -log_probs(logits).gather(-1, targets[..., None]).squeeze(-1)
    assert parts.ce.dtype == torch.float32
    assert abs(parts.ce.item() - nll.mean().item()) < 1e-6
    assert parts.loss.item() == parts.ce.item()


@pytest.mark.parametrize("eps", [0.1, 0.35])
def test_label_smoothing_formula_excludes_ignored(eps):
    logits, targets = make(seed=1)
    targets[0, 1:4] = -100
    targets[2, 0] = -100
    lp = log_probs(logits)
    nll = -lp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    smooth = -lp.mean(dim=-1)
    per_token = (1 - eps) * nll + eps * smooth
    real = targets != -100
    expected = per_token[real].mean()
    got = lm_loss(logits, targets, label_smoothing=eps).ce
    assert abs(got.item() - expected.item()) < 1e-6


def test_custom_ignore_index():
    logits, targets = make(seed=2)
    targets[1] = 0  # token 0 is padding here
    lp = log_probs(logits)
    real = targets != 0
    expected = -lp.gather(-1, targets[..., None]).squeeze(-1)[real].mean()
    assert abs(lm_loss(logits, targets, ignore_index=0).ce.item() - expected.item()) < 1e-6


def test_z_loss_formula_and_total():
    logits, targets = make(seed=3)
    targets[2, 3] = -100
    real = targets != -100
    z_expected = (torch.logsumexp(logits, dim=-1) ** 2)[real].mean()
    parts = lm_loss(logits, targets, z_loss=1e-3)
    assert abs(parts.z.item() - z_expected.item()) < 1e-4 * z_expected.item()
    assert abs(parts.loss.item() - (parts.ce + 1e-3 * parts.z).item()) < 1e-6
    # The z term carries gradient only when it is weighted.
    assert parts.z.requires_grad is False  # inputs do not require grad here
    leaf = logits.clone().requires_grad_()
    assert lm_loss(leaf, targets, z_loss=1e-3).z.requires_grad
    assert not lm_loss(leaf, targets).z.requires_grad


def test_z_loss_gradient_matches_formula():
    logits, targets = make(seed=4)
    leaf = logits.clone().float().requires_grad_()
    lm_loss(leaf, targets, z_loss=0.5).loss.backward()
    ref = logits.clone().requires_grad_()
    lp = log_probs(ref)
    ce = -lp.gather(-1, targets[..., None]).mean()
    z = (torch.logsumexp(ref, dim=-1) ** 2).mean()
    (ce + 0.5 * z).backward()
    torch.testing.assert_close(leaf.grad.double(), ref.grad, atol=1e-5, rtol=1e-4)


def test_all_ignored_gives_zero_loss_that_backprops():
    logits, _ = make(seed=5)
    leaf = logits.clone().requires_grad_()
    targets = torch.full((3, 5), -100)
    parts = lm_loss(leaf, targets, label_smoothing=0.1, z_loss=1e-4)
    assert parts.loss.item() == 0.0 and parts.ce.item() == 0.0 and parts.z.item() == 0.0
    parts.loss.backward()
    assert torch.isfinite(leaf.grad).all() and (leaf.grad == 0).all()


def test_low_precision_logits_are_upcast():
    logits, targets = make(seed=6)
    bf16 = logits.to(torch.bfloat16)
    parts = lm_loss(bf16, targets)
    assert parts.loss.dtype == torch.float32
    expected = -log_probs(bf16.double()).gather(-1, targets[..., None]).mean()
    assert abs(parts.ce.item() - expected.item()) < 1e-5


def test_mismatched_shapes_fail():
    logits, targets = make()
    with pytest.raises(ValueError, match="same tokens"):
        lm_loss(logits, targets[:, :-1])
