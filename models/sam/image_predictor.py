"""SAM 2's image path on the promptable-image protocol: one image, any number of prompts.

    from models.registry import create
    sam2 = create("sam2.1_hiera_tiny").eval()                # load_official_sam2(sam2, "sam2.1_hiera_tiny.pt")
    predictor = SAM2ImagePredictor(sam2)
    predictor.set_image(image)                                # HWC uint8 RGB (or a PIL image)
    masks, iou, low_res = predictor.predict(point_coords=np.array([[500, 375]]), point_labels=np.array([1]))
    AutomaticMaskGenerator(predictor, AMGConfig.sam2())       # evaluation.amg on SAM 2

Computes what facebookresearch/sam2 sam2/sam2_image_predictor.py:SAM2ImagePredictor computes. SAM 2's image path
differs from SAM's in three places, all here: the image is resized to a square (no longest-side resize, no
padding), so prompt coordinates scale by the two sides separately (sam2/utils/transforms.py:SAM2Transforms); the
stride-16 features get ``no_mem_embed`` added, as a frame without memory does in tracking; and the decoder reads the
stride-4 / stride-8 features. :class:`SAM2ImageModel` exposes the model through
:class:`~models.sam.sam.PromptableImageModel`, so :class:`~models.sam.sam.ImagePredictor` and the automatic mask
generator run on SAM 2 as on SAM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .prompt_encoder import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT
from .sam import ImagePredictor
from .sam2 import SAM2, FrameFeatures
from .transforms import as_chw

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LOW_RES_LOGIT_CLAMP", "SquareResizeTransform", "SAM2ImageModel",
           "SAM2ImagePredictor"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel RGB mean of 0-1 pixels SAM 2 normalises with (sam2/utils/transforms.py:SAM2Transforms)."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel RGB std of 0-1 pixels."""
LOW_RES_LOGIT_CLAMP = 32.0
"""The predictor returns low-resolution logits clamped to +-32, so that feeding them back as a mask prompt cannot
saturate the prompt encoder (SAM2ImagePredictor._predict)."""


@dataclass(frozen=True)
class SquareResizeTransform:
    """SAM 2's input frame: the whole image resized to ``image_size`` x ``image_size`` (the aspect ratio is not
    kept), ImageNet-normalised. An :class:`~models.sam.sam.ImageTransform`."""

    image_size: int = 1024
    """Side of the square model input."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean of 0-1 RGB pixels."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel std of 0-1 RGB pixels."""

    def preprocess(self, image: np.ndarray | Tensor | Image.Image,
                   device: torch.device | str | None = None) -> tuple[Tensor, tuple[int, int], tuple[int, int]]:
        """RGB on the 0-255 scale (uint8 or float) -> ((1, 3, S, S) float32 input, (S, S), original (H, W)).

        Scaled to 0-1 first, then resized bilinearly with antialiasing, as torchvision's ``Resize`` does to the
        reference's ``ToTensor`` output."""
        chw = as_chw(image)
        if device is not None:
            chw = chw.to(device)
        original_size = (int(chw.shape[-2]), int(chw.shape[-1]))
        side = self.image_size
        x = chw.float() / 255.0
        x = F.interpolate(x[None], (side, side), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std, (side, side), original_size

    def scale_coords(self, coords: np.ndarray | Tensor, original_size: tuple[int, int]) -> Tensor:
        """Pixel (x, y) of the original image (..., 2) -> of the model input: x * S / W, y * S / H, in float32
        and in the reference's order (divide, then multiply; SAM2Transforms.transform_coords)."""
        coords = torch.as_tensor(coords, dtype=torch.float32)
        height, width = original_size
        sides = torch.tensor([width, height], dtype=torch.float32, device=coords.device)
        return coords / sides * self.image_size

    def scale_boxes(self, boxes: np.ndarray | Tensor, original_size: tuple[int, int]) -> Tensor:
        """(..., 4) boxes (x0, y0, x1, y1) of the original image -> (N, 4) of the model input."""
        boxes = torch.as_tensor(boxes, dtype=torch.float32)
        return self.scale_coords(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def postprocess_masks(self, low_res_logits: Tensor, input_size: tuple[int, int],
                          original_size: tuple[int, int]) -> Tensor:
        """(B, M, h, w) decoder logits -> (B, M, H, W) at the original size: one bilinear resize, since the input
        frame has no padding to crop (SAM2Transforms.postprocess_masks without its hole filling)."""
        return F.interpolate(low_res_logits.float(), tuple(original_size), mode="bilinear", align_corners=False)


class SAM2ImageModel(nn.Module):
    """A :class:`~models.sam.sam2.SAM2` as a :class:`~models.sam.sam.PromptableImageModel`: ``encode_image`` gives
    the frame's :class:`~models.sam.sam2.FrameFeatures` (with ``no_mem_embed`` added), ``decode`` runs the prompt
    encoder and mask decoder on them. Shares the SAM 2 model's parameters; holds none of its own. The automatic mask
    generator matches sam2's when given a :class:`SAM2ImagePredictor` rather than this model: its mask-to-mask step
    then reads the clamped low-resolution logits."""

    def __init__(self, sam2: SAM2, mask_threshold: float = 0.0) -> None:
        super().__init__()
        self.sam2 = sam2
        self.mask_threshold = mask_threshold

    @property
    def image_size(self) -> int:
        """Side of the square model input in pixels."""
        return self.sam2.cfg.image_size

    def image_transform(self) -> SquareResizeTransform:
        return SquareResizeTransform(self.image_size)

    def encode_image(self, images: Tensor) -> FrameFeatures:
        """(B, 3, S, S) normalised images -> features; a single image has no memory, so, as in tracking an initial
        conditioning frame, ``no_mem_embed`` is added to the stride-16 features (SAM2ImagePredictor.set_image)."""
        features = self.sam2.forward_image(images)
        if not self.sam2.cfg.directly_add_no_mem_embed:
            return features
        channels = features.vision_features.shape[1]
        vision = features.vision_features + self.sam2.no_mem_embed.reshape(1, channels, 1, 1)
        return FrameFeatures(vision, features.vision_pos_enc, features.high_res_features)

    def decode(self, image_embeddings: FrameFeatures, points: Tensor | None = None, labels: Tensor | None = None,
               boxes: Tensor | None = None, mask_input: Tensor | None = None,
               multimask_output: bool = True) -> tuple[Tensor, Tensor]:
        """B prompt sets on one image (or on B images) -> (low-res logits (B, M, 4h, 4w), IoU (B, M)).

        points (B, N, 2) pixel (x, y) of the model input with labels (B, N), boxes (B, 4), mask_input
        (B, 1, 4h, 4w) logits. A box travels as two corner points (labels 2, 3) ahead of the clicks, as SAM 2 was
        trained (SAM2ImagePredictor._predict). The masks are the decoder's own: no object-score gating, unlike
        tracking."""
        if (points is None) != (labels is None):
            raise ValueError("points and labels must be given together")
        if boxes is not None:
            corners = boxes.reshape(-1, 2, 2).float()
            corner_labels = torch.tensor([[BOX_TOP_LEFT, BOX_BOTTOM_RIGHT]], dtype=torch.int32,
                                         device=boxes.device).expand(corners.shape[0], -1)
            if points is not None:
                corners, corner_labels = torch.cat([corners, points], 1), torch.cat([corner_labels, labels], 1)
            points, labels = corners, corner_labels
        prompt_encoder = self.sam2.sam_prompt_encoder
        sparse, dense = prompt_encoder(points, labels, None, mask_input)
        features = image_embeddings
        high_res = features.high_res_features
        repeat = features.batch_size != sparse.shape[0]
        if repeat and features.batch_size != 1:
            raise ValueError(f"{sparse.shape[0]} prompt sets for {features.batch_size} images: give one set per image "
                             "or any number on one image")
        out = self.sam2.sam_mask_decoder(features.vision_features, prompt_encoder.get_dense_pe(), sparse, dense,
                                         multimask_output=multimask_output, repeat_image=repeat,
                                         high_res_features=high_res)
        return out.masks, out.iou_pred


class SAM2ImagePredictor(ImagePredictor):
    """:class:`~models.sam.sam.ImagePredictor` on SAM 2 (sam2/sam2_image_predictor.py:SAM2ImagePredictor, same
    inputs and outputs): the low-resolution logits it returns are clamped to +-32, after the full-size masks were
    made from the unclamped ones. Put the model in eval mode first."""

    def __init__(self, model: SAM2 | SAM2ImageModel, mask_threshold: float = 0.0) -> None:
        if isinstance(model, SAM2):
            model = SAM2ImageModel(model, mask_threshold)
        super().__init__(model)

    @torch.no_grad()
    def set_image(self, image: np.ndarray | Tensor | Image.Image, image_format: str = "RGB") -> None:
        """Embed ``image``: numpy HWC, torch CHW or a PIL image, RGB on the 0-255 scale."""
        if isinstance(image, Image.Image):
            image = np.array(image.convert("RGB"))
        super().set_image(image, image_format)

    def predict(self, point_coords: np.ndarray | None = None, point_labels: np.ndarray | None = None,
                box: np.ndarray | None = None, mask_input: np.ndarray | None = None, multimask_output: bool = True,
                return_logits: bool = False, normalize_coords: bool = True) -> tuple[np.ndarray, ...]:
        """As :meth:`ImagePredictor.predict`; with ``normalize_coords`` False, points and boxes are already
        fractions of the image's width and height (SAM2ImagePredictor.predict)."""
        if normalize_coords:
            return super().predict(point_coords, point_labels, box, mask_input, multimask_output, return_logits)
        self._require_image()
        side = float(self.model.image_size)
        coords = labels = boxes = masks = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be given with point_coords")
            coords = (torch.as_tensor(point_coords, dtype=torch.float32) * side).to(self.device)[None]
            labels = torch.as_tensor(point_labels, dtype=torch.int, device=self.device)[None]
        if box is not None:
            boxes = (torch.as_tensor(box, dtype=torch.float32) * side).reshape(-1, 4).to(self.device)
        if mask_input is not None:
            masks = torch.as_tensor(mask_input, dtype=torch.float, device=self.device)[None]
        out = self.predict_torch(coords, labels, boxes, masks, multimask_output, return_logits)
        return tuple(t[0].detach().cpu().numpy() for t in out)

    @torch.no_grad()
    def predict_torch(self, point_coords: Tensor | None, point_labels: Tensor | None, boxes: Tensor | None = None,
                      mask_input: Tensor | None = None, multimask_output: bool = True,
                      return_logits: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """As :meth:`ImagePredictor.predict_torch`, the low-resolution logits clamped to +-32."""
        masks, iou, low_res = super().predict_torch(point_coords, point_labels, boxes, mask_input, multimask_output,
                                                    return_logits)
        return masks, iou, low_res.clamp(-LOW_RES_LOGIT_CLAMP, LOW_RES_LOGIT_CLAMP)
