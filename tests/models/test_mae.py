"""MAE details that change numbers, pinned against hand-built tensors and the reference's formulas."""

import math

import numpy as np
import pytest
import timm
import torch

import models
from models.mae import mae_loss, patchify, random_masking, unpatchify
from models.pos_embed import sincos_2d_pos_embed


def _tiny_mae(**kw):
    cfg = dict(img_size=32, patch_size=8, depth=2, decoder_depth=2)  # 16 patches
    cfg.update(kw)
    return models.create("mae_vit_tiny_patch16", **cfg)


# -- patchify ------------------------------------------------------------------------------------------------------
def test_patchify_layout_is_row_col_channel():
    p, side, chans = 4, 8, 3
    imgs = torch.zeros(1, chans, side, side)
    for ch in range(chans):
        for r in range(side):
            for c in range(side):
                imgs[0, ch, r, c] = 1000 * r + 10 * c + ch  # value encodes (row, col, channel)
    x = patchify(imgs, p)
    assert x.shape == (1, 4, p * p * chans)
    for gi in range(2):
        for gj in range(2):
            patch = x[0, gi * 2 + gj]  # patches in row-major order
            for pr in range(p):
                for pc in range(p):
                    for ch in range(chans):
                        expected = 1000 * (gi * p + pr) + 10 * (gj * p + pc) + ch
                        assert patch[(pr * p + pc) * chans + ch] == expected


def test_unpatchify_is_exact_inverse():
    imgs = torch.randn(2, 3, 32, 32)
    assert torch.equal(unpatchify(patchify(imgs, 8), 8), imgs)
    tokens = torch.randn(2, 16, 8 * 8 * 3)
    assert torch.equal(patchify(unpatchify(tokens, 8), 8), tokens)
    one_channel = torch.randn(1, 1, 16, 16)
    assert torch.equal(unpatchify(patchify(one_channel, 4), 4, in_chans=1), one_channel)


def test_patchify_rejects_bad_shapes():
    with pytest.raises(ValueError, match="square"):
        patchify(torch.zeros(1, 3, 32, 16), 8)
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.zeros(1, 3, 30, 30), 8)


# -- random_masking ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length,ratio,keep", [(196, 0.75, 49), (256, 0.75, 64), (16, 0.75, 4), (10, 0.75, 2)])
def test_keep_count_truncates(length, ratio, keep):
    x = torch.randn(3, length, 4)
    kept, mask, _ = random_masking(x, ratio)
    assert kept.shape == (3, keep, 4)
    assert mask.sum(1).tolist() == [length - keep] * 3


def test_masking_under_given_noise():
    torch.manual_seed(0)
    n, length, d, ratio = 2, 12, 3, 0.75
    x = torch.randn(n, length, d)
    noise = torch.rand(n, length)
    kept, mask, ids_restore = random_masking(x, ratio, noise)
    for b in range(n):
        order = sorted(range(length), key=lambda i: noise[b, i].item())  # smallest noise kept first
        keep_ids = order[:3]
        assert torch.equal(kept[b], x[b, keep_ids])
        assert mask[b].tolist() == [0.0 if i in keep_ids else 1.0 for i in range(length)]
        shuffled = x[b, order]
        assert torch.equal(shuffled[ids_restore[b]], x[b])  # ids_restore undoes the shuffle
    assert mask.dtype == torch.float32


def test_masking_noise_default_is_torch_rand():
    x = torch.randn(2, 16, 4)
    torch.manual_seed(3)
    noise = torch.rand(2, 16)
    torch.manual_seed(3)
    _, mask_default, _ = random_masking(x, 0.75)
    _, mask_given, _ = random_masking(x, 0.75, noise)
    assert torch.equal(mask_default, mask_given)


# -- loss ----------------------------------------------------------------------------------------------------------
def test_loss_hand_values():
    pred = torch.zeros(1, 2, 3)
    target = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 9.0]]])
    mask = torch.tensor([[0.0, 1.0]])  # only patch 1 is removed
    assert mae_loss(pred, target, mask, norm_pix_loss=False).item() == pytest.approx((16 + 25 + 81) / 3)
    # norm-pix on [4, 5, 9]: mean 6, unbiased var 14/2 = 7, eps inside the sqrt
    expected = (4 + 1 + 9) / (7 + 1e-6) / 3
    assert mae_loss(pred, target, mask, norm_pix_loss=True).item() == pytest.approx(expected, rel=1e-6)


def test_norm_pix_eps_is_inside_the_sqrt():
    # [0, 0, 0.003]: mean 0.001, unbiased var 3e-6; with eps inside, sqrt(4e-6) = 0.002 -> [-0.5, -0.5, 1]
    target = torch.tensor([[[0.0, 0.0, 0.003]]], dtype=torch.float64)
    loss = mae_loss(torch.zeros(1, 1, 3), target, torch.ones(1, 1), norm_pix_loss=True)
    assert loss.item() == pytest.approx((0.25 + 0.25 + 1) / 3, rel=1e-4)


def test_norm_pix_loss_matches_numpy():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(2, 5, 12)), rng.normal(size=(2, 5, 12)) * 3 + 1
    mask = np.array([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=np.float64)
    t = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    expected = (((pred - t) ** 2).mean(-1) * mask).sum() / mask.sum()
    got = mae_loss(torch.tensor(pred), torch.tensor(target), torch.tensor(mask), norm_pix_loss=True)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_loss_ignores_kept_patches():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    mask = torch.tensor([[1.0, 0, 0, 1, 0, 1], [0, 1, 0, 0, 1, 1]])
    base = mae_loss(pred, target, mask, True)
    changed_kept = pred + 10 * (1 - mask).unsqueeze(-1)
    assert mae_loss(changed_kept, target, mask, True).item() == pytest.approx(base.item(), rel=1e-6)
    changed_removed = pred + 10 * mask.unsqueeze(-1)
    assert mae_loss(changed_removed, target, mask, True).item() > base.item() + 1


def test_loss_without_removed_patches_is_zero_with_grad():
    pred = torch.randn(2, 4, 3, requires_grad=True)
    loss = mae_loss(pred, torch.randn(2, 4, 3), torch.zeros(2, 4), True)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


# -- model ---------------------------------------------------------------------------------------------------------
def test_forward_shapes_and_mask_ratio_zero():
    torch.manual_seed(0)
    model = _tiny_mae()
    imgs = torch.randn(2, 3, 32, 32)
    loss, pred, mask = model(imgs)
    assert pred.shape == (2, 16, 8 * 8 * 3) and mask.shape == (2, 16)
    assert mask.sum(1).tolist() == [12, 12]
    assert torch.isfinite(loss)
    loss0, _, mask0 = model(imgs, mask_ratio=0.0)
    assert mask0.sum() == 0 and loss0.item() == 0.0
    loss0.backward()  # a step without masking stays finite
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_encoder_never_sees_mask_tokens():
    model = models.create("mae_vit_tiny_patch16", depth=2, decoder_depth=1)  # 224 px: 196 patches
    lengths = []
    hooks = [b.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1])) for b in model.encoder.blocks]
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    assert lengths == [49 + 1, 49 + 1]


def test_decoder_input_is_projected_encoder_tokens():
    torch.manual_seed(0)
    model = _tiny_mae()
    captured = {}
    model.encoder.norm.register_forward_hook(lambda m, a, out: captured.__setitem__("latent", out))
    model.decoder_blocks[0].register_forward_pre_hook(lambda m, args: captured.__setitem__("dec_in", args[0]))
    noise = torch.rand(2, 16)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32), noise=noise)
    latent, dec_in = captured["latent"], captured["dec_in"]
    assert latent.shape == (2, 1 + 4, 192) and dec_in.shape == (2, 1 + 16, 128)
    w, b = model.decoder_embed.weight, model.decoder_embed.bias
    pos = model.decoder_pos_embed[0]
    for s in range(2):
        order = sorted(range(16), key=lambda i: noise[s, i].item())
        for k, patch in enumerate(order[:4]):  # kept token k sits at its patch position (+1 for cls)
            torch.testing.assert_close(dec_in[s, 1 + patch] - pos[1 + patch], latent[s, 1 + k] @ w.T + b)
        for patch in order[4:]:
            torch.testing.assert_close(dec_in[s, 1 + patch] - pos[1 + patch], model.mask_token[0, 0])
        torch.testing.assert_close(dec_in[s, 0] - pos[0], latent[s, 0] @ w.T + b)


def test_encoder_matches_timm_vit():
    torch.manual_seed(0)
    model = _tiny_mae(depth=12).eval()
    state = model.encoder_state_dict()
    assert not any(k.startswith("encoder.") for k in state)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8).eval()
    vit.load_state_dict(state, strict=True)
    ours = models.create("vit_tiny_patch16", img_size=32, patch_size=8)
    ours.load_state_dict(state, strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        latent, _, _ = model.forward_encoder(imgs, 0.0, noise=torch.arange(16.0).expand(2, 16))  # keep all, in order
        torch.testing.assert_close(latent, vit.forward_features(imgs), atol=1e-5, rtol=1e-5)


def test_fixed_tables_are_frozen_sincos():
    model = _tiny_mae()
    assert not model.encoder.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    torch.testing.assert_close(model.encoder.pos_embed[0], sincos_2d_pos_embed(192, 4, cls_token=True))
    torch.testing.assert_close(model.decoder_pos_embed[0], sincos_2d_pos_embed(128, 4, cls_token=True))
    loss, _, _ = model(torch.randn(1, 3, 32, 32))
    loss.backward()
    assert model.encoder.pos_embed.grad is None and model.decoder_pos_embed.grad is None
    assert model.mask_token.grad is not None


def test_init_stats():
    torch.manual_seed(0)
    model = models.create("mae_vit_small_patch16", img_size=32, patch_size=8, depth=2, decoder_depth=2)
    d, dd, p = 384, 256, 8

    def check_xavier(weight, fan_in, fan_out):
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert weight.abs().max().item() <= bound
        assert weight.abs().max().item() > 0.97 * bound
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)

    check_xavier(model.encoder.blocks[0].attn.qkv.weight, d, 3 * d)  # one xavier over the fused (3d, d) matrix
    check_xavier(model.encoder.blocks[1].mlp.fc2.weight, 4 * d, d)
    check_xavier(model.decoder_blocks[0].attn.qkv.weight, dd, 3 * dd)
    check_xavier(model.decoder_embed.weight, d, dd)
    check_xavier(model.decoder_pred.weight, dd, p * p * 3)
    check_xavier(model.encoder.patch_embed.proj.weight, 3 * p * p, d)  # as the (out, in*p*p) view
    assert model.encoder.cls_token.std().item() == pytest.approx(0.02, rel=0.25)
    assert model.mask_token.std().item() == pytest.approx(0.02, rel=0.25)
    # facebookresearch/mae models_mae.py:initialize_weights leaves the patch conv's bias at nn.Conv2d's default,
    # uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = in_chans * p * p
    # (pytorch/pytorch torch/nn/modules/conv.py:_ConvNd.reset_parameters)
    bias, bound = model.encoder.patch_embed.proj.bias, 1 / math.sqrt(3 * p * p)
    assert bias.abs().max().item() <= bound
    assert bias.abs().max().item() > 0.9 * bound  # 384 draws: all below 0.9 * bound has probability 0.9^384
    assert bias.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    for name, param in model.named_parameters():
        if name.endswith("bias") and name != "encoder.patch_embed.proj.bias":
            assert torch.count_nonzero(param) == 0, name
        if "norm" in name and name.endswith("weight"):
            assert torch.all(param == 1), name


def test_decoder_names_follow_reference():
    names = set(dict(_tiny_mae().named_parameters()))
    for expected in ("decoder_embed.weight", "mask_token", "decoder_pos_embed", "decoder_blocks.1.attn.qkv.weight",
                     "decoder_norm.weight", "decoder_pred.bias", "encoder.cls_token", "encoder.blocks.0.mlp.fc1.weight"):
        assert expected in names
    model = _tiny_mae()
    assert model.no_weight_decay() <= names


def test_prediction_width():
    with torch.device("meta"):
        assert models.create("mae_vit_base_patch16").decoder_pred.out_features == 768
        assert models.create("mae_vit_huge_patch14").decoder_pred.out_features == 588


def test_bad_mask_ratio():
    with pytest.raises(ValueError, match="mask_ratio"):
        _tiny_mae(mask_ratio=1.0)
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(torch.zeros(1, 4, 2), -0.1)


@pytest.mark.gpu
def test_bf16_flash_attention_step_on_gpu():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = models.create("mae_vit_small_patch16", depth=2, decoder_depth=2).cuda()  # head dims 64 and 32
    imgs = torch.randn(4, 3, 224, 224, device="cuda")
    noise = torch.rand(4, 196, device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        loss, pred, mask = model(imgs, noise=noise)  # raises if the flash kernel cannot run these shapes
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert mask.sum().item() == 4 * (196 - 49)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        fp32_loss, _, fp32_mask = model(imgs, noise=noise)
    assert torch.equal(fp32_mask, mask)
    assert loss.item() == pytest.approx(fp32_loss.item(), rel=0.05)
