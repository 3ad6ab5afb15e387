"""PE's mask regularisation: the mask, the blanked pixels, and the loss against a per-image, per-patch computation;
features shared by every token earn nothing."""

import math

import pytest
import torch

import models
from trainers.mask_regularization import blank_patches, masked_feature_loss, random_patch_mask


def test_the_mask_blanks_exactly_the_ratio_of_patches_and_varies_per_image():
    g = torch.Generator().manual_seed(0)
    mask = random_patch_mask(1024, (4, 6), 0.75, generator=g)
    assert mask.shape == (1024, 24) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [18] * 1024
    assert len({tuple(row.tolist()) for row in mask[:64]}) > 60  # a fresh draw per image
    per_patch = mask.float().mean(dim=0)  # each patch blanked 75% of the time (binomial std 1.4%)
    assert 0.68 < per_patch.min() and per_patch.max() < 0.82
    assert random_patch_mask(3, (2, 2), 0.01).sum(dim=1).tolist() == [1, 1, 1]  # never an empty mask


def test_blanking_zeroes_the_masked_patches_pixels_and_nothing_else():
    images = torch.rand(2, 3, 16, 24) + 0.5  # no zero pixel to begin with
    mask = torch.zeros(2, 6, dtype=torch.bool)  # a 2 x 3 grid of 8-px patches
    mask[0, 1] = mask[0, 5] = mask[1, 3] = True
    blanked = blank_patches(images, mask, 8)
    for b in range(2):
        for patch in range(6):
            row, col = divmod(patch, 3)
            region = blanked[b, :, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8]
            if mask[b, patch]:
                assert torch.all(region == 0), (b, patch)
            else:
                assert torch.equal(region, images[b, :, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8]), (b, patch)


def standardise(tokens: torch.Tensor) -> torch.Tensor:
    """(N, C): every channel centred and scaled over the N tokens (biased variance, eps 1e-5), in float64."""
    x = tokens.double()
    return (x - x.mean(dim=0)) / (x.var(dim=0, unbiased=False) + 1e-5).sqrt()


def test_the_loss_is_one_minus_the_cosine_at_blanked_patches_against_the_intact_image():
    torch.manual_seed(0)
    tower = models.create("pe_core_nano").visual
    images = torch.randn(8, 3, 32, 48)  # a 4 x 6 grid of 8-px patches
    intact = tower.patch_features(images).detach().requires_grad_(True)

    torch.manual_seed(5)
    loss = masked_feature_loss(tower.patch_features, images, intact, 8, fraction=0.25, ratio=0.5)
    loss.backward()

    # Independently: the same draw (seeded) ranked into a mask, then every blanked patch of every image, one by one.
    torch.manual_seed(5)
    noise = torch.rand(2, 24)  # fraction 0.25 of 8 images; 12 of 24 patches
    blanked_patches = noise.argsort(dim=1).argsort(dim=1) < 12
    terms = []
    for b in range(2):
        image = images[b].clone()
        for patch in blanked_patches[b].nonzero().flatten().tolist():
            row, col = divmod(patch, 6)
            image[:, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] = 0
        with torch.no_grad():
            features = standardise(tower.patch_features(image[None])[0])
        target = standardise(intact[b].detach())
        for patch in blanked_patches[b].nonzero().flatten().tolist():
            a, t = features[patch], target[patch]
            terms.append(1 - (a @ t / (a.norm() * t.norm())).item())
    assert len(terms) == 24
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert 0 < loss.item() < 2 and not math.isnan(loss.item())
    assert intact.grad is None  # the intact features are the target, not trained by this term
    assert tower.trunk.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # the masked pass is


def test_a_component_shared_by_every_token_earns_nothing():
    # Self-distillation collapses if agreeing on one large common direction pays; standardising over tokens
    # removes it: adding it to both sides leaves the loss unchanged.
    torch.manual_seed(0)
    tower = models.create("pe_core_nano").visual
    images = torch.randn(4, 3, 32, 32)
    intact = tower.patch_features(images).detach()
    shared = 50 * torch.randn(intact.shape[-1])

    def loss(offset):
        torch.manual_seed(3)
        return masked_feature_loss(lambda x: tower.patch_features(x) + offset, images, intact + offset, 8,
                                   fraction=1.0, ratio=0.5)

    with torch.no_grad():
        assert loss(shared).item() == pytest.approx(loss(0.0).item(), rel=1e-4)
        assert loss(0.0).item() > 0.05  # there is something left to learn
