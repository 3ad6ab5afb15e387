"""SAM / SAM 2 mask decoder: a two-way transformer between prompt tokens and the image embedding.

Follows facebookresearch/sam2 sam2/modeling/sam/mask_decoder.py:MaskDecoder with
sam2/modeling/sam/transformer.py:TwoWayTransformer, and facebookresearch/segment-anything
segment_anything/modeling/mask_decoder.py:MaskDecoder for SAM 1. Submodule names equal the reference ones, so
``sam_mask_decoder.*`` (SAM 2) or ``mask_decoder.*`` (SAM 1) checkpoint entries load strictly once the prefix is
dropped. SAM 2's ``conv_s0`` / ``conv_s1`` live here (that is where checkpoints keep them) although they act on the
image features once per image, before any prompt: see :meth:`MaskDecoder.project_high_res_features`.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d  # channel LayerNorm of NCHW maps, eps 1e-6 as SAM's
from torch import Tensor, nn

__all__ = ["MLP", "Attention", "MaskDecoder", "MaskDecoderConfig", "MaskDecoderOutput", "TwoWayTransformer"]


@dataclass
class MaskDecoderConfig:
    """Mask decoder hyper-parameters; defaults are SAM 2.1 inference (sam2/configs/sam2.1/*.yaml, sam2_base.py
    _build_sam_heads, and the dynamic-multimask overrides of sam2/build_sam.py:build_sam2)."""

    transformer_dim: int = 256
    """Token and image-embedding width d."""
    depth: int = 2
    """Two-way attention blocks."""
    num_heads: int = 8
    """Heads of every attention layer; must divide transformer_dim // attention_downsample_rate."""
    mlp_dim: int = 2048
    """Hidden width of the token MLP inside each block."""
    attention_downsample_rate: int = 2
    """Token<->image cross-attention projects to d / rate channels (cheaper attention over h*w keys)."""
    num_multimask_outputs: int = 3
    """Ambiguity-resolving masks; one more mask token is kept for the single-mask output."""
    iou_head_depth: int = 3
    """Layers of the IoU prediction MLP."""
    iou_head_hidden_dim: int = 256
    """Hidden width of the IoU prediction MLP."""
    legacy_mlp_names: bool = False
    """SAM 1 names the block MLP ``lin1`` / ``lin2`` (segment_anything/modeling/common.py:MLPBlock); SAM 2 uses
    ``layers.0`` / ``layers.1`` (sam2/modeling/sam2_utils.py:MLP). Only the state-dict names differ."""
    use_high_res_features: bool = True
    """SAM 2: add projected stride-4 / stride-8 backbone features while upscaling (conv_s0 / conv_s1)."""
    iou_prediction_use_sigmoid: bool = True
    """SAM 2.1: IoU head output goes through a sigmoid; SAM 1 returns the raw regression."""
    dynamic_multimask_via_stability: bool = True
    """In eval with multimask_output False, fall back to the best multimask output when the single mask is
    unstable (sam2 mask_decoder.py:MaskDecoder._dynamic_multimask_via_stability)."""
    dynamic_multimask_stability_delta: float = 0.05
    """Logit offset of the stability score: area(logit > delta) / area(logit > -delta)."""
    dynamic_multimask_stability_thresh: float = 0.98
    """Single masks with stability at or above this are kept."""
    pred_obj_scores: bool = True
    """SAM 2: an extra ``obj_score_token`` (first in the token list) predicts whether the object is visible."""
    pred_obj_scores_mlp: bool = True
    """Object score head is MLP(d, d, 1, 3) instead of a Linear(d, 1)."""
    use_multimask_token_for_obj_ptr: bool = True
    """With multimask_output, return the three multimask tokens as sam_tokens_out (else always mask token 0)."""
    multimask_min_pt_num: int = 0
    """SAM 2.1 click policy (sam2_base.py:SAM2Base._use_multimask): multimask only with at least this many
    points ..."""
    multimask_max_pt_num: int = 1
    """... and at most this many (box corners count as points)."""

    @classmethod
    def sam1(cls, **overrides) -> MaskDecoderConfig:
        """segment-anything's decoder (segment_anything/build_sam.py:_build_sam)."""
        sam1 = {"legacy_mlp_names": True, "use_high_res_features": False, "iou_prediction_use_sigmoid": False,
                "dynamic_multimask_via_stability": False, "pred_obj_scores": False, "pred_obj_scores_mlp": False,
                "use_multimask_token_for_obj_ptr": False}
        return cls(**{**sam1, **overrides})


class MaskDecoderOutput(NamedTuple):
    """Decoder outputs; unpacks like sam2's 4-tuple. SAM 1 semantics are the first two fields."""

    masks: Tensor
    """(B, M, 4h, 4w) mask logits; M = num_multimask_outputs with multimask_output, else 1."""
    iou_pred: Tensor
    """(B, M) predicted mask IoU (a probability with iou_prediction_use_sigmoid)."""
    sam_tokens_out: Tensor
    """(B, 1 or M, d) mask tokens after the transformer: SAM 2 turns them into object pointers."""
    object_score_logits: Tensor
    """(B, 1) object-present logit; a constant 10 (sigmoid ~ 1) without pred_obj_scores, as sam2."""


class MLP(nn.Module):
    """Linear layers with ReLU between them (sam2/modeling/sam2_utils.py:MLP); names ``layers.{i}``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, sigmoid_output: bool = False):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(dims))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        x = self.layers[-1](x)
        return torch.sigmoid(x) if self.sigmoid_output else x


class MLPBlock(nn.Module):
    """Two-layer ReLU MLP named ``lin1`` / ``lin2``, as SAM 1's transformer blocks store it."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden_dim)
        self.lin2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class Attention(nn.Module):
    """Multi-head attention whose q/k/v live in dim / downsample_rate channels, keys and values read from kv_dim
    channels (sam2 transformer.py:Attention). Batch-first tokens; dropout on the attention weights in training."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1, kv_dim: int | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        inner, kv_dim = dim // downsample_rate, kv_dim or dim
        if inner % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide the attention width {inner}.")
        self.num_heads, self.dropout_p = num_heads, dropout
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(kv_dim, inner)
        self.v_proj = nn.Linear(kv_dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def heads(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The projections, split into heads: (B, heads, N, head_dim) each."""
        return tuple(proj(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
                     for proj, x in ((self.q_proj, q), (self.k_proj, k), (self.v_proj, v)))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.attend(*self.heads(q, k, v))


class TwoWayAttentionBlock(nn.Module):
    """Post-norm block: token self-attention, tokens->image, token MLP, image->tokens.

    The first block's self-attention sees no position code and has no residual: the tokens entering it are the
    raw learned output tokens plus prompt codes (sam2 transformer.py:TwoWayAttentionBlock, skip_first_layer_pe).
    """

    def __init__(self, cfg: MaskDecoderConfig, skip_first_layer_pe: bool) -> None:
        super().__init__()
        d, heads, rate = cfg.transformer_dim, cfg.num_heads, cfg.attention_downsample_rate
        self.self_attn = Attention(d, heads)
        self.norm1 = nn.LayerNorm(d)
        self.cross_attn_token_to_image = Attention(d, heads, downsample_rate=rate)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = MLPBlock(d, cfg.mlp_dim) if cfg.legacy_mlp_names else MLP(d, cfg.mlp_dim, d, 2)
        self.norm3 = nn.LayerNorm(d)
        self.norm4 = nn.LayerNorm(d)
        self.cross_attn_image_to_token = Attention(d, heads, downsample_rate=rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        if self.skip_first_layer_pe:
            queries = self.norm1(self.self_attn(queries, queries, queries))
        else:
            q = queries + query_pe
            queries = self.norm1(queries + self.self_attn(q, q, queries))
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Blocks of :class:`TwoWayAttentionBlock`, then a last tokens->image attention and LayerNorm on the tokens."""

    def __init__(self, cfg: MaskDecoderConfig) -> None:
        super().__init__()
        d = cfg.transformer_dim
        self.layers = nn.ModuleList(TwoWayAttentionBlock(cfg, skip_first_layer_pe=i == 0) for i in range(cfg.depth))
        self.final_attn_token_to_image = Attention(d, cfg.num_heads, downsample_rate=cfg.attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(d)

    def forward(self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor) -> tuple[Tensor, Tensor]:
        """image (B, d, h, w), its code (B, d, h, w), tokens (B, n, d) -> tokens (B, n, d), image (B, h*w, d)."""
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class MaskDecoder(nn.Module):
    """Predicts mask logits, IoU estimates and (SAM 2) an object score from image and prompt embeddings."""

    def __init__(self, cfg: MaskDecoderConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or MaskDecoderConfig()
        self.cfg = cfg
        d = cfg.transformer_dim
        self.transformer_dim = d
        self.transformer = TwoWayTransformer(cfg)
        self.num_multimask_outputs = cfg.num_multimask_outputs
        self.num_mask_tokens = cfg.num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, d)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, d)
        if cfg.pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, d)
        # indices 0, 1, 3 carry weights, as in the reference nn.Sequential
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(d, d // 4, kernel_size=2, stride=2),
            LayerNorm2d(d // 4),
            nn.GELU(),
            nn.ConvTranspose2d(d // 4, d // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        if cfg.use_high_res_features:
            self.conv_s0 = nn.Conv2d(d, d // 8, kernel_size=1)
            self.conv_s1 = nn.Conv2d(d, d // 4, kernel_size=1)
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(d, d, d // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(d, cfg.iou_head_hidden_dim, self.num_mask_tokens, cfg.iou_head_depth,
                                       sigmoid_output=cfg.iou_prediction_use_sigmoid)
        if cfg.pred_obj_scores:
            self.pred_obj_score_head = MLP(d, d, 1, 3) if cfg.pred_obj_scores_mlp else nn.Linear(d, 1)

    def project_high_res_features(self, feat_s0: Tensor, feat_s1: Tensor) -> tuple[Tensor, Tensor]:
        """Backbone FPN levels 0 (stride 4, d channels) and 1 (stride 8) -> the decoder's high_res_features.

        Applied once per image, not per prompt (sam2/modeling/sam2_base.py:SAM2Base.forward_image).
        """
        if not self.cfg.use_high_res_features:
            raise RuntimeError("this decoder was built with use_high_res_features=False.")
        return self.conv_s0(feat_s0), self.conv_s1(feat_s1)

    def wants_multimask(self, num_points: int) -> bool:
        """SAM 2.1's rule for multimask output on a prompted frame, from the number of point prompts."""
        return self.cfg.multimask_min_pt_num <= num_points <= self.cfg.multimask_max_pt_num

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool,
        repeat_image: bool = False,
        high_res_features: list[Tensor] | tuple[Tensor, Tensor] | None = None,
    ) -> MaskDecoderOutput:
        """Run the decoder and select the outputs.

        image_embeddings (B or 1, d, h, w); image_pe (1, d, h, w) from PromptEncoder.get_dense_pe; sparse (B, n, d)
        and dense (B, d, h, w) from the prompt encoder. ``repeat_image`` repeats each image for the B prompt sets
        (SAM 1 always does). high_res_features: the two maps of :meth:`project_high_res_features`.
        """
        masks, iou_pred, mask_tokens_out, obj_logits = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, repeat_image,
            high_res_features)
        if multimask_output:
            masks, iou_pred = masks[:, 1:], iou_pred[:, 1:]
        elif self.cfg.dynamic_multimask_via_stability and not self.training:
            masks, iou_pred = self._dynamic_multimask_via_stability(masks, iou_pred)
        else:
            masks, iou_pred = masks[:, :1], iou_pred[:, :1]
        # Token 0 is the memory token even after a multimask click, since tracking is trained on it
        # (sam2 mask_decoder.py:MaskDecoder.forward), unless the multimask tokens are asked for.
        if multimask_output and self.cfg.use_multimask_token_for_obj_ptr:
            tokens = mask_tokens_out[:, 1:]
        else:
            tokens = mask_tokens_out[:, :1]
        return MaskDecoderOutput(masks, iou_pred, tokens, obj_logits)

    def _output_tokens(self, batch: int) -> Tensor:
        """Learned output tokens: [obj_score (SAM 2)], iou, mask_0..mask_M, expanded to (B, k, d)."""
        parts = [self.iou_token.weight, self.mask_tokens.weight]
        if self.cfg.pred_obj_scores:
            parts.insert(0, self.obj_score_token.weight)
        return torch.cat(parts, dim=0).unsqueeze(0).expand(batch, -1, -1)

    def _upscale(self, src: Tensor, high_res_features) -> Tensor:
        """(B, d, h, w) -> (B, d/8, 4h, 4w); SAM 2 adds feat_s1 before the first LayerNorm and feat_s0 before the
        last GELU (sam2 mask_decoder.py:MaskDecoder.predict_masks)."""
        if not self.cfg.use_high_res_features:
            return self.output_upscaling(src)
        if high_res_features is None:
            raise ValueError("use_high_res_features needs high_res_features=(feat_s0, feat_s1).")
        deconv1, norm1, act1, deconv2, act2 = self.output_upscaling
        feat_s0, feat_s1 = high_res_features
        x = act1(norm1(deconv1(src) + feat_s1))
        return act2(deconv2(x) + feat_s0)

    def predict_masks(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        repeat_image: bool,
        high_res_features=None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """All mask-token outputs: masks (B, M+1, 4h, 4w), iou (B, M+1), mask tokens (B, M+1, d), obj (B, 1)."""
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = self._output_tokens(batch)
        tokens = torch.cat([output_tokens.to(sparse_prompt_embeddings.dtype), sparse_prompt_embeddings], dim=1)
        if repeat_image:
            src = torch.repeat_interleave(image_embeddings, batch, dim=0)
        elif image_embeddings.shape[0] != batch:
            raise ValueError(f"{image_embeddings.shape[0]} images for {batch} prompt sets; use repeat_image=True.")
        else:
            src = image_embeddings
        src = src + dense_prompt_embeddings
        if image_pe.shape[0] != 1:
            raise ValueError("image_pe must have batch size 1 (PromptEncoder.get_dense_pe).")
        pos_src = image_pe.expand(src.shape[0], -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        first = 1 if self.cfg.pred_obj_scores else 0
        iou_token_out = hs[:, first]
        mask_tokens_out = hs[:, first + 1:first + 1 + self.num_mask_tokens]
        upscaled = self._upscale(src.transpose(1, 2).reshape(b, c, h, w), high_res_features)
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
                               dim=1)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.flatten(2)).reshape(b, -1, h, w)
        iou_pred = self.iou_prediction_head(iou_token_out)
        if self.cfg.pred_obj_scores:
            obj_logits = self.pred_obj_score_head(hs[:, 0])
        else:
            obj_logits = iou_pred.new_full((iou_pred.shape[0], 1), 10.0)
        return masks, iou_pred, mask_tokens_out, obj_logits

    def _stability_scores(self, mask_logits: Tensor) -> Tensor:
        """IoU between the masks thresholded at +delta and -delta; 1 when both are empty."""
        flat = mask_logits.flatten(-2)
        delta = self.cfg.dynamic_multimask_stability_delta
        inter = (flat > delta).sum(-1).float()
        union = (flat > -delta).sum(-1).float()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))

    def _dynamic_multimask_via_stability(self, masks: Tensor, iou_pred: Tensor) -> tuple[Tensor, Tensor]:
        """Keep the single-mask output where stable, else the multimask output with the highest predicted IoU.

        Single clicks are ambiguous and token 0 then tends to blur the candidates; the fallback gives a valid
        mask for both clicking and tracking (sam2 mask_decoder.py:MaskDecoder._dynamic_multimask_via_stability).
        """
        best = iou_pred[:, 1:].argmax(dim=-1)
        rows = torch.arange(masks.shape[0], device=masks.device)
        best_masks = masks[:, 1:][rows, best].unsqueeze(1)
        best_iou = iou_pred[:, 1:][rows, best].unsqueeze(1)
        single_masks, single_iou = masks[:, :1], iou_pred[:, :1]
        stable = self._stability_scores(single_masks) >= self.cfg.dynamic_multimask_stability_thresh
        out_masks = torch.where(stable[..., None, None], single_masks, best_masks)
        out_iou = torch.where(stable, single_iou, best_iou)
        return out_masks, out_iou
