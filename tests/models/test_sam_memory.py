"""SAM 2 memory attention and memory encoder against facebookresearch/sam2's modules (the installed ``sam2``)."""

import math

import pytest
import torch
from sam2.modeling.memory_attention import MemoryAttention as RefMemoryAttention
from sam2.modeling.memory_attention import (
    MemoryAttentionLayer as RefMemoryAttentionLayer,
)
from sam2.modeling.memory_encoder import CXBlock as RefCXBlock
from sam2.modeling.memory_encoder import Fuser as RefFuser
from sam2.modeling.memory_encoder import MaskDownSampler as RefMaskDownSampler
from sam2.modeling.memory_encoder import MemoryEncoder as RefMemoryEncoder
from sam2.modeling.position_encoding import (
    PositionEmbeddingSine as RefPositionEmbeddingSine,
)
from sam2.modeling.position_encoding import compute_axial_cis
from sam2.modeling.sam.transformer import RoPEAttention as RefRoPEAttention

from models.sam.memory import (
    MemoryAttention,
    MemoryEncoder,
    apply_rope,
    compute_axial_rope,
    mask_for_memory,
)

TOL = 1e-4


def _perturb_constant_params(module: torch.nn.Module) -> None:
    """Norm weights / biases start at 1 / 0 and layer scales at 1e-6: randomise them so they affect the outputs."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name or name.endswith("gamma"):
                param.copy_(torch.rand_like(param) + 0.5 if name.endswith(("weight", "gamma")) else
                            0.1 * torch.randn_like(param))


def test_axial_rope_vector():
    cos, sin = compute_axial_rope(8, 2, 2)
    # frequencies 10000 ** (-[0, 4] / 8) = [1, 0.01]; token t -> x = t mod 2, y = t div 2; angles [x-part, y-part]
    angles = torch.tensor([[0, 0, 0, 0], [1, 0.01, 0, 0], [0, 0, 1, 0.01], [1, 0.01, 1, 0.01]])
    torch.testing.assert_close(cos, angles.cos())
    torch.testing.assert_close(sin, angles.sin())
    # and upstream's complex form of the same angles
    torch.testing.assert_close(torch.complex(cos, sin), compute_axial_cis(8, 2, 2))

    q = torch.randn(1, 1, 4, 8)
    k = torch.randn(1, 1, 10, 8)  # two frames of the 2x2 grid + two unrotated tokens
    k[..., 4, :] = k[..., 0, :]
    q_rot, k_rot = apply_rope(q, k, (cos, sin), repeat_k=True, num_k_exclude=2)
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(k_rot.norm(dim=-1), k.norm(dim=-1))
    torch.testing.assert_close(q_rot[..., 0, :], q[..., 0, :])
    torch.testing.assert_close(k_rot[..., 4, :], k_rot[..., 0, :])
    torch.testing.assert_close(k_rot[..., 8:, :], k[..., 8:, :])
    assert not torch.allclose(q_rot[..., 3, :], q[..., 3, :])


def _rotate_by_hand(x: torch.Tensor, height: int, width: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotate each token of x (N, D), N a multiple of height*width, pair by pair with its own 2x2 matrix."""
    dim = x.shape[-1]
    freqs = [theta ** (-4 * j / dim) for j in range(dim // 4)]
    out = x.clone()
    for t in range(x.shape[0]):
        col, row = (t % (height * width)) % width, (t % (height * width)) // width
        for p in range(dim // 2):
            angle = col * freqs[p] if p < dim // 4 else row * freqs[p - dim // 4]
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[t, 2 * p].item(), x[t, 2 * p + 1].item()
            out[t, 2 * p], out[t, 2 * p + 1] = a * c - b * s, a * s + b * c
    return out


def test_rope_non_square_grid_matches_per_token_rotation():
    height, width, dim, n_ptr = 3, 5, 8, 3
    q = torch.randn(2, 2, height * width, dim)
    k = torch.randn(2, 2, 2 * height * width + n_ptr, dim)
    rope = compute_axial_rope(dim, height, width)
    q_rot, k_rot = apply_rope(q, k, rope, repeat_k=True, num_k_exclude=n_ptr)
    torch.testing.assert_close(q_rot[1, 0], _rotate_by_hand(q[1, 0], height, width), atol=1e-5, rtol=0)
    spatial = 2 * height * width
    torch.testing.assert_close(k_rot[0, 1, :spatial], _rotate_by_hand(k[0, 1, :spatial], height, width),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(k_rot[..., spatial:, :], k[..., spatial:, :])
    with pytest.raises(ValueError, match="whole frames"):
        apply_rope(q, k, rope, repeat_k=True, num_k_exclude=n_ptr - 1)


def _ref_memory_attention(feat_sizes) -> RefMemoryAttention:
    """sam2.1_hiera_*.yaml's memory_attention, built from sam2.modeling classes."""
    rope = dict(rope_theta=10000.0, feat_sizes=feat_sizes, embedding_dim=256, num_heads=1, downsample_rate=1,
                dropout=0.1)
    layer = RefMemoryAttentionLayer(
        activation="relu", d_model=256, dim_feedforward=2048, dropout=0.1, pos_enc_at_attn=False,
        pos_enc_at_cross_attn_keys=True, pos_enc_at_cross_attn_queries=False,
        self_attention=RefRoPEAttention(**rope),
        cross_attention=RefRoPEAttention(**rope, rope_k_repeat=True, kv_in_dim=64))
    return RefMemoryAttention(d_model=256, pos_enc_at_input=True, layer=layer, num_layers=4)


# A square grid goes through upstream's square re-computation of its angles; a non-square one needs upstream's
# feat_sizes ([w, h]) to equal the grid, which pins down which axis is x.
@pytest.mark.parametrize("grid, feat_sizes", [((8, 8), (64, 64)), ((4, 6), (6, 4))])
def test_memory_attention_matches_sam2(grid, feat_sizes):
    torch.manual_seed(0)
    ref = _ref_memory_attention(list(feat_sizes)).eval()
    _perturb_constant_params(ref)
    ours = MemoryAttention().eval()
    ours.load_state_dict(ref.state_dict(), strict=True)

    batch, tokens, n_ptr = 2, grid[0] * grid[1], 4
    curr, curr_pos = torch.randn(batch, tokens, 256), torch.randn(batch, tokens, 256)
    memory, memory_pos = torch.randn(2, batch, 2 * tokens + n_ptr, 64).unbind(0)
    with torch.no_grad():
        expected = ref(curr.transpose(0, 1), memory.transpose(0, 1), curr_pos.transpose(0, 1),
                       memory_pos.transpose(0, 1), num_obj_ptr_tokens=n_ptr).transpose(0, 1)
        got = ours(curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens=n_ptr, grid=grid)
    assert got.shape == (batch, tokens, 256)
    assert (got - expected).abs().max() <= TOL


def test_memory_attention_rejects_a_wrong_grid():
    ours = MemoryAttention()
    curr, memory = torch.randn(1, 12, 256), torch.randn(1, 2 * 12 + 1, 64)
    with pytest.raises(ValueError, match="grid"):
        ours(curr, curr, memory, memory, num_obj_ptr_tokens=1, grid=(4, 4))
    with pytest.raises(ValueError, match="whole frames"):
        ours(curr, curr, memory, memory, num_obj_ptr_tokens=0, grid=(3, 4))


def _ref_memory_encoder() -> RefMemoryEncoder:
    """sam2.1_hiera_*.yaml's memory_encoder, built from sam2.modeling classes."""
    cx = RefCXBlock(dim=256, kernel_size=7, padding=3, layer_scale_init_value=1e-6, use_dwconv=True)
    return RefMemoryEncoder(
        out_dim=64,
        mask_downsampler=RefMaskDownSampler(kernel_size=3, stride=2, padding=1),
        fuser=RefFuser(cx, num_layers=2),
        position_encoding=RefPositionEmbeddingSine(num_pos_feats=64, normalize=True, scale=None, temperature=10000))


@pytest.mark.parametrize("skip_mask_sigmoid", [False, True])
def test_memory_encoder_matches_sam2(skip_mask_sigmoid):
    torch.manual_seed(0)
    ref = _ref_memory_encoder().eval()
    _perturb_constant_params(ref)
    ours = MemoryEncoder().eval()
    ours.load_state_dict(ref.state_dict(), strict=True)

    height, width = 3, 5  # non-square: the sine code's row / column halves must not swap
    pix_feat = torch.randn(2, 256, height, width)
    masks = 4 * torch.randn(2, 1, 16 * height, 16 * width)
    if skip_mask_sigmoid:  # how SAM2Base._encode_new_memory calls it
        masks = mask_for_memory(masks)
    with torch.no_grad():
        expected = ref(pix_feat, masks, skip_mask_sigmoid=skip_mask_sigmoid)
        features, pos = ours(pix_feat, masks, skip_mask_sigmoid=skip_mask_sigmoid)
    assert features.shape == pos.shape == (2, 64, height, width)
    assert (features - expected["vision_features"]).abs().max() <= TOL
    assert (pos - expected["vision_pos_enc"][0]).abs().max() <= TOL


def test_mask_for_memory():
    logits = torch.tensor([-3.0, 0.0, 0.5, 2.0])
    torch.testing.assert_close(mask_for_memory(logits), torch.sigmoid(logits) * 20 - 10)
    torch.testing.assert_close(mask_for_memory(logits, binarize=True), torch.tensor([-10.0, -10.0, 10.0, 10.0]))
