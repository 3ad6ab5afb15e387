"""SAM (Kirillov et al. 2023): timm's ``samvit_*`` image encoder, the prompt encoder and the two-way mask decoder.

    import models.sam.sam  # registers sam_vit_{b,l,h,nano}
    from models.registry import create
    sam = create("sam_vit_b").eval()
    sam.load_state_dict(official_sam_state(torch.load("sam_vit_b_01ec64.pth"), sam))
    predictor = ImagePredictor(sam)
    predictor.set_image(image)                                  # HWC uint8 RGB
    masks, iou, low_res = predictor.predict(point_coords=np.array([[500, 375]]), point_labels=np.array([1]))

Computes what facebookresearch/segment-anything segment_anything/modeling/sam.py:Sam and
segment_anything/predictor.py:SamPredictor compute. The image encoder is timm's VisionTransformerSAM
(timm/models/vision_transformer_sam.py: windowed blocks with decomposed relative positions, a few global blocks,
the conv neck to the prompt width), built with SAM's LayerNorm eps of 1e-6 (timm's default is 1e-5). The prompt
encoder and mask decoder are :mod:`models.sam.prompt_encoder` / :mod:`models.sam.mask_decoder` in SAM 1 mode, under
segment-anything's parameter names, so an official ``sam_vit_*.pth`` maps by timm's own key filter
(:func:`official_sam_state`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Protocol

import numpy as np
import timm
import torch
from timm.models import build_model_with_cfg
from timm.models import register_model as register_timm_model
from timm.models.vision_transformer_sam import VisionTransformerSAM, checkpoint_filter_fn
from torch import Tensor, nn

from ..registry import register_config
from .checkpoints import model_state, require_exact_fit
from .mask_decoder import MaskDecoder, MaskDecoderConfig
from .prompt_encoder import PromptEncoder, PromptEncoderConfig
from .transforms import SAM_PIXEL_MEAN, SAM_PIXEL_STD, LongestSideTransform

__all__ = ["SAMConfig", "SAM", "official_sam_state", "PromptableImageModel", "ImageTransform", "ImagePredictor"]

SAM_LAYER_NORM_EPS = 1e-6
"""LayerNorm eps of SAM's encoder blocks (segment_anything/build_sam.py:_build_sam)."""

SAMVIT_NANO_ARGS = dict(img_size=256, patch_size=16, embed_dim=64, depth=4, num_heads=2, window_size=6,
                        global_attn_indexes=(1, 3), use_rel_pos=True, neck_chans=64)
"""``samvit_nano_patch16``: four blocks of width 64 on the 16 x 16 grid of a 256-px image, global attention in
every second block as the official sizes alternate windowed runs with a global block, windows of 6 that do not
tile the grid so that the padding path of the 14-wide windows on SAM's 64 x 64 grid is exercised."""


@register_timm_model
def samvit_nano_patch16(pretrained: bool = False, **kwargs) -> VisionTransformerSAM:
    """Prism's CPU-sized SAM image encoder (0.3M parameters): windowed and global blocks with decomposed relative
    positions and the conv neck, at a size that runs in milliseconds. Registered with timm so that timm's API
    (features, key filter) applies."""
    if pretrained:
        raise ValueError("samvit_nano_patch16 has no pretrained weights")
    kwargs.pop("pretrained_cfg", None)  # none exists: the encoder has no weights to download
    args = dict(SAMVIT_NANO_ARGS, norm_layer=partial(nn.LayerNorm, eps=SAM_LAYER_NORM_EPS), num_classes=0)
    return build_model_with_cfg(
        VisionTransformerSAM, "samvit_nano_patch16", pretrained=False, **dict(args, **kwargs),
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        pretrained_cfg={"input_size": (3, 256, 256), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                        "num_classes": 0},
    )


@dataclass(frozen=True)
class SAMConfig:
    """One SAM size: the timm encoder by name and the prompt / decoder widths; defaults are ViT-B's."""

    encoder: str = "samvit_base_patch16"
    """timm architecture of the image encoder (``timm.list_models("samvit_*")``)."""
    image_size: int = 1024
    """Side of the square, padded model input; the embedding grid is image_size / patch (64 x 64 for SAM)."""
    prompt_embed_dim: int = 256
    """Width of the encoder neck, prompt tokens and mask decoder (also its IoU head's hidden width, as SAM's)."""
    decoder_mlp_dim: int = 2048
    """Hidden width of the token MLP in the decoder's two-way blocks."""
    mask_threshold: float = 0.0
    """Logit above which a pixel belongs to the mask."""
    pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN
    """Per-channel RGB mean on the 0-255 scale, subtracted before the encoder."""
    pixel_std: tuple[float, float, float] = SAM_PIXEL_STD
    """Per-channel RGB std on the 0-255 scale the centred pixels are divided by."""
    drop_path_rate: float = 0.0
    """Stochastic depth of the encoder blocks, rising linearly to this rate (0 at inference)."""

    def __post_init__(self) -> None:
        encoders = timm.list_models("samvit_*")
        if self.encoder not in encoders:
            raise ValueError(f"{self.encoder!r} is not a SAM image encoder; timm has {encoders}")


class SAM(nn.Module):
    """SAM with submodules ``image_encoder`` (timm VisionTransformerSAM), ``prompt_encoder`` and ``mask_decoder``.

    Inputs of :meth:`encode_image` are normalised and padded (:mod:`models.sam.transforms`); prompts are pixel
    coordinates of that padded input. ``pixel_mean`` / ``pixel_std`` are buffers outside the state dict, as in
    segment-anything.
    """

    def __init__(self, cfg: SAMConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or SAMConfig()
        d, size = cfg.prompt_embed_dim, cfg.image_size
        self.image_encoder = timm.create_model(
            cfg.encoder, img_size=size, neck_chans=d, num_classes=0, global_pool="",
            norm_layer=partial(nn.LayerNorm, eps=SAM_LAYER_NORM_EPS), drop_path_rate=cfg.drop_path_rate)
        patch = self.image_encoder.patch_embed.patch_size[0]
        if size % patch:
            raise ValueError(f"image_size {size} is not a multiple of the patch size {patch}")
        grid = size // patch
        self.prompt_encoder = PromptEncoder(PromptEncoderConfig.sam1(
            embed_dim=d, image_embedding_size=(grid, grid), input_image_size=(size, size), mask_in_chans=16))
        self.mask_decoder = MaskDecoder(MaskDecoderConfig.sam1(
            transformer_dim=d, mlp_dim=cfg.decoder_mlp_dim, iou_head_hidden_dim=d))
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(-1, 1, 1), persistent=False)

    @property
    def image_size(self) -> int:
        """Side of the square model input in pixels."""
        return self.cfg.image_size

    @property
    def mask_threshold(self) -> float:
        """Logit threshold of a mask pixel."""
        return self.cfg.mask_threshold

    def image_transform(self) -> LongestSideTransform:
        """The preprocessing this model was trained with: longest side to image_size, normalise, pad."""
        return LongestSideTransform(self.cfg.image_size, tuple(self.cfg.pixel_mean), tuple(self.cfg.pixel_std))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each encoder block in the backward pass instead of keeping its activations (timm's
        ``VisionTransformerSAM.set_grad_checkpointing``); the decoder runs on the small grid and keeps its own."""
        self.image_encoder.set_grad_checkpointing(enable)

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) normalised, padded images -> (B, prompt_embed_dim, S/16, S/16) image embeddings."""
        size = self.cfg.image_size
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"SAM takes {size} x {size} inputs (resize and pad with models.sam.transforms), "
                             f"got {tuple(images.shape[-2:])}")
        return self.image_encoder.forward_features(images)

    def get_dense_pe(self) -> Tensor:
        """(1, d, h, w) position code of the embedding grid: the decoder's ``image_pe``."""
        return self.prompt_encoder.get_dense_pe()

    def decode(
        self,
        image_embeddings: Tensor,
        points: Tensor | None = None,
        labels: Tensor | None = None,
        boxes: Tensor | None = None,
        mask_input: Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Masks for P prompt sets on I images -> (low-res logits (P, M, 4h, 4w), predicted IoU (P, M)).

        Prompt sets are grouped by image: with P = I * k, sets ``i*k .. i*k + k - 1`` belong to image i (I = 1:
        every set prompts the one image; I = P: one set per image). points (P, N, 2) pixel (x, y) of the padded
        input with labels (P, N) (1 positive, 0 negative, -1 padding), boxes (P, 4) x0 y0 x1 y1, mask_input
        (P, 1, 4h, 4w) logits of an earlier prediction; any may be None, and with none at all each image gets
        one unprompted set. M is 3 with ``multimask_output``, else 1 (segment_anything/modeling/sam.py:Sam.forward
        runs the same decoder once per image).
        """
        sparse, dense = self.prompt_encoder(points, labels, boxes, mask_input)
        n_images = image_embeddings.shape[0]
        if points is None and boxes is None and mask_input is None:
            sparse = sparse.expand(n_images, -1, -1)
            dense = dense.expand(n_images, -1, -1, -1)
        n_sets = sparse.shape[0]
        if n_sets % n_images:
            raise ValueError(f"{n_sets} prompt sets do not split evenly over {n_images} images")
        src = image_embeddings if n_sets == n_images else image_embeddings.repeat_interleave(n_sets // n_images, 0)
        out = self.mask_decoder(src, self.get_dense_pe(), sparse, dense, multimask_output=multimask_output)
        return out.masks, out.iou_pred

    def forward(
        self,
        images: Tensor,
        points: Tensor | None = None,
        labels: Tensor | None = None,
        boxes: Tensor | None = None,
        mask_input: Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`encode_image` then :meth:`decode`: low-res mask logits and predicted IoU per prompt set."""
        return self.decode(self.encode_image(images), points, labels, boxes, mask_input, multimask_output)


# -- official checkpoints --------------------------------------------------------------------------------------
_ENCODER = "image_encoder."
_HEADS = ("prompt_encoder.", "mask_decoder.")
_SAM2_PREFIXES = ("sam_mask_decoder.", "sam_prompt_encoder.", "memory_attention.", "memory_encoder.")
_CONSTANTS = ("pixel_mean", "pixel_std")  # non-persistent in segment-anything; tolerated if a file has them


def _official_encoder_key(ours: str) -> str:
    """Our ``image_encoder.*`` key -> segment-anything's (timm names the block MLP ``fc``, SAM ``lin``)."""
    return ours.replace("mlp.fc", "mlp.lin")


def _check_sam1(state: Mapping[str, Any]) -> None:
    sam2_keys = sorted(k for k in state if k.startswith(_SAM2_PREFIXES))
    if sam2_keys:
        raise ValueError(f"this is a SAM 2 checkpoint (it holds {sam2_keys[0]!r} and {len(sam2_keys) - 1} more "
                         "SAM 2 tensors), which a SAM 1 model cannot load: use a sam2.1_hiera_* model")


def official_sam_state(state: Mapping[str, Tensor], model: SAM) -> dict[str, Tensor]:
    """An official ``sam_vit_*.pth`` state dict (or ``{"model": state}``) under ``model``'s keys, ready for a strict
    ``model.load_state_dict``.

    The encoder part goes through timm's own SAM key filter (vision_transformer_sam.py:checkpoint_filter_fn);
    prompt encoder and decoder keys are already ours. Raises ValueError naming every missing, unexpected or
    mis-shaped tensor by its checkpoint name, and a SAM 2 checkpoint is named as such.
    """
    state = model_state(state)
    _check_sam1(state)
    encoder = {k: v for k, v in state.items() if k.startswith(_ENCODER)}
    mapped = {_ENCODER + k: v for k, v in checkpoint_filter_fn(encoder, model.image_encoder).items()}
    mapped.update({k: v for k, v in state.items() if k.startswith(_HEADS)})
    official = {k: _official_encoder_key(k) for k in mapped}
    leftover = sorted(k for k in state if not k.startswith((_ENCODER, *_HEADS)) and k not in _CONSTANTS)

    def name(key: str) -> str:
        return official.get(key, _official_encoder_key(key))

    require_exact_fit(mapped, model.state_dict(), f"SAM with {model.cfg.encoder} at {model.cfg.image_size} px",
                      name, tuple(leftover))
    return mapped


# -- image predictor -------------------------------------------------------------------------------------------
class ImageTransform(Protocol):
    """Image and prompt transforms of a promptable model's input frame (:class:`LongestSideTransform` for SAM)."""

    def preprocess(self, image: np.ndarray | Tensor,
                   device: torch.device | str | None = None) -> tuple[Tensor, tuple[int, int], tuple[int, int]]:
        """Image -> (model input (1, 3, S, S), input_size, original_size)."""

    def scale_coords(self, coords: np.ndarray | Tensor, original_size: tuple[int, int]) -> Tensor:
        """Original-image (x, y) -> input-frame (x, y)."""

    def scale_boxes(self, boxes: np.ndarray | Tensor, original_size: tuple[int, int]) -> Tensor:
        """Original-image boxes -> input-frame boxes (N, 4)."""

    def postprocess_masks(self, low_res_logits: Tensor, input_size: tuple[int, int],
                          original_size: tuple[int, int]) -> Tensor:
        """Decoder logits -> logits at the original image size."""


class PromptableImageModel(Protocol):
    """What :class:`ImagePredictor` needs of a model: SAM here, SAM 2's image path alike.

    ``encode_image`` may return any image state (a tensor for SAM, a feature dict for a model with high-resolution
    features); the predictor keeps it and hands it back to ``decode`` untouched.
    """

    image_size: int
    mask_threshold: float

    def image_transform(self) -> ImageTransform:
        """The transform of the model's input frame."""

    def encode_image(self, images: Tensor) -> Any:
        """(1, 3, S, S) preprocessed image -> image state."""

    def decode(self, image_embeddings: Any, points: Tensor | None, labels: Tensor | None, boxes: Tensor | None,
               mask_input: Tensor | None, multimask_output: bool) -> tuple[Tensor, Tensor]:
        """Image state and B prompt sets in the input frame -> (low-res logits (B, M, h, w), IoU (B, M))."""


class ImagePredictor:
    """Embed an image once, then predict masks for any number of prompts on it
    (segment_anything/predictor.py:SamPredictor, same inputs and outputs).

    The model is used as it is: put it in eval mode first (stochastic depth would otherwise apply).
    """

    def __init__(self, model: PromptableImageModel, transform: ImageTransform | None = None) -> None:
        self.model = model
        self.transform = transform if transform is not None else model.image_transform()
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self.features: Any = None
        self.input_size: tuple[int, int] | None = None
        self.original_size: tuple[int, int] | None = None

    @property
    def is_image_set(self) -> bool:
        return self.features is not None

    @torch.no_grad()
    def set_image(self, image: np.ndarray | Tensor, image_format: str = "RGB") -> None:
        """Embed ``image``: numpy HWC or torch CHW, uint8 (or float on the 0-255 scale), RGB or BGR."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if image_format == "BGR":
            image = image[..., ::-1] if isinstance(image, np.ndarray) else image.flip(0)
        self.reset_image()
        x, self.input_size, self.original_size = self.transform.preprocess(image, device=self.device)
        self.features = self.model.encode_image(x)

    def get_image_embedding(self) -> Any:
        """The image state of :meth:`set_image` ((1, d, h, w) embeddings for SAM)."""
        self._require_image()
        return self.features

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("set an image with .set_image(...) before predicting masks")

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One prompt set in original-image pixels -> (masks (M, H, W), iou (M,), low-res logits (M, h, w)).

        point_coords (N, 2) (x, y) with point_labels (N,) (1 foreground, 0 background), box (4,) x0 y0 x1 y1,
        mask_input (1, h, w) low-res logits of an earlier call. Masks are bool unless ``return_logits``
        (segment_anything/predictor.py:SamPredictor.predict).
        """
        self._require_image()
        device = self.device
        coords = labels = boxes = masks = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be given with point_coords")
            coords = self.transform.scale_coords(point_coords, self.original_size).to(device)[None]
            labels = torch.as_tensor(point_labels, dtype=torch.int, device=device)[None]
        if box is not None:
            boxes = self.transform.scale_boxes(box, self.original_size).to(device)
        if mask_input is not None:
            masks = torch.as_tensor(mask_input, dtype=torch.float, device=device)[None]
        out = self.predict_torch(coords, labels, boxes, masks, multimask_output, return_logits)
        return tuple(t[0].detach().cpu().numpy() for t in out)

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: Tensor | None,
        point_labels: Tensor | None,
        boxes: Tensor | None = None,
        mask_input: Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """B prompt sets already in the input frame (``transform.scale_coords`` / ``scale_boxes``) -> masks
        (B, M, H, W), iou (B, M), low-res logits (B, M, h, w) (SamPredictor.predict_torch)."""
        self._require_image()
        low_res, iou = self.model.decode(self.features, point_coords, point_labels, boxes, mask_input,
                                         multimask_output)
        masks = self.transform.postprocess_masks(low_res, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou, low_res


# -- registered sizes ------------------------------------------------------------------------------------------
_SIZES = {
    # segment_anything/build_sam.py:build_sam_vit_{b,l,h}; timm's samvit_* hold the encoder settings
    "sam_vit_b": SAMConfig("samvit_base_patch16"),
    "sam_vit_l": SAMConfig("samvit_large_patch16"),
    "sam_vit_h": SAMConfig("samvit_huge_patch16"),
    # CPU-sized, for tests and smoke runs
    "sam_vit_nano": SAMConfig("samvit_nano_patch16", image_size=256, prompt_embed_dim=64, decoder_mlp_dim=512),
}


for _name, _cfg in _SIZES.items():
    register_config(_name, SAM, _cfg, f"SAM {asdict(_cfg)}")
