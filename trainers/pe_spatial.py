"""Spatial alignment of a PE-Core vision tower (Bolya et al. 2025, "Perception Encoder", §5 spatial alignment), the
stage that turns PE-Core into PE-Spatial: features for dense prediction and tracking at the output of the tower.

The student is the contrastive run's vision trunk without its head: no final norm, attention pooling or projection
(the PE-Spatial layout, timm's ``vit_pe_spatial_*``); its features are the last block's patch tokens. Two losses
pull them, both negative cosine similarities (the paper minimises negative cosine; its printed sign is a typo):

- self-distillation (:func:`token_alignment_loss`): towards the patch tokens of a frozen copy of the starting tower at
  an intermediate block (``teacher_layer``), where a contrastive tower keeps its best dense features;
- SAM 2.1 mask-logit correspondence (:func:`correspondence_loss`): SAM 2.1 is prompted with a grid of single
  points; each location's teacher feature is the vector of its masks over all prompts, as probabilities (the
  sigmoid of the mask logits) by default (:func:`sam_mask_features`), and each row of the student's token-to-token
  cosine-similarity matrix is pulled towards the same row of the teacher's.

Batches carry ``frames`` (B, T, 3, S, S) normalised with PE's mean and std (0.5); every frame is a training image.
Validation batches are whole videos (``frame_masks``, ``frame_valid``): J&F of label propagation from the first
frame's masks (:mod:`evaluation.label_propagation`) and the mIoU of a linear foreground / background probe fitted
on half of the validation videos and scored on the other half (:mod:`evaluation.segmentation_probe`), for the
aligned tower and, as ``start_*``, for the frozen starting tower's last block.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from timm.models.eva import Eva
from torch import Tensor, nn

import models
from evaluation.label_propagation import propagate_segmentation
from evaluation.segmentation_probe import fit_segmentation_probe, mean_iou, predict_segmentation
from evaluation.vos import PROMPT_AGREEMENT_WARNING, evaluate_video, mean_pairwise_iou
from models.pe import resample_pe_pos_embed, vision_complexity
from models.sam.image_predictor import IMAGENET_MEAN, IMAGENET_STD, LOW_RES_LOGIT_CLAMP, SAM2ImageModel
from models.sam.sam2 import SAM2
from trainers.distributed import gather_objects
from trainers.eval_model import load_sam_model
from trainers.checkpoint import save_timm_tower
from trainers.handoff import load_into
from trainers.method import Method, as_config
from trainers.optim import OptimConfig, param_groups_weight_decay
from trainers.sam2 import CLICK_READING_RUN
from trainers.sam_loss import mask_iou

__all__ = ["SpatialModelConfig", "SpatialOptimConfig", "SpatialAlignment", "token_alignment_loss",
           "pairwise_cosine", "correspondence_loss", "grid_points", "sam_grid_masks", "click_mask_features",
           "sam_mask_features", "teacher_click_quality", "teacher_metrics", "mask_share_features", "block_tokens",
           "load_sam2_teacher", "export_spatial_tower", "validation_metrics"]

PE_MEAN, PE_STD = 0.5, 0.5
"""PE's pixel normalisation (the student's input); SAM 2 takes ImageNet's."""
CORRESPONDENCE_TEACHERS = ("sam", "masks")
SAM_FEATURES = ("probabilities", "logits")
MAX_IDS = 256
"""Object ids of uint8 masks (0 the background)."""


@dataclass
class SpatialModelConfig:
    name: str | None = None
    """Registered PE-Core model of the --init_from run; None: read from that run's config.yaml."""
    teacher_layer: int = 3
    """Block (counted from 1) of the frozen starting tower whose patch tokens the last block is distilled towards.
    A choice: the paper distils PE-Core G from its layer 41 of 50 (about 0.8 of the depth); 3 of pe_core_nano's 4."""
    self_weight: float = 1.0
    """Weight of the self-distillation loss (a choice: the paper's weights are not published)."""
    sam_weight: float = 1.0
    """Weight of the SAM 2.1 mask-logit correspondence loss (a choice, as self_weight)."""
    correspondence_teacher: str = "sam"
    """What the correspondence loss matches: "sam" (the method: SAM 2.1's mask logits) or "masks", a control that is
    not the method: the training frames' ground-truth objects as a teacher that groups perfectly, each location's
    feature its area share of every object and of the background (:func:`mask_share_features`). It tells a weak
    teacher from a loss that does not help."""
    sam_features: str = "probabilities"
    """What a location's SAM 2 feature holds for each grid click: "probabilities", the sigmoid of the click's mask
    logit there, or "logits", the logits themselves (clamped to +-32 as SAM 2's predictor returns them). The paper
    matches the similarities of SAM 2.1's mask logits without saying how they are scaled before the cosine (a
    choice). Raw logits make locations on two different objects alike: most clicks miss both, and their large
    negative logits dominate both vectors. Probabilities keep only which masks cover a location, as the ground-truth
    control's area shares do."""
    points_per_side: int = 8
    """SAM 2.1 is prompted with this many x this many single positive points on a regular grid (a choice: 64 masks
    at the nano's 128 px; use 16-32 at 1024 px)."""
    propagation_topk: int = 5
    """Label propagation: context tokens kept per target token (DINO: 5)."""
    propagation_context: int = 7
    """Label propagation: preceding frames used besides the first (DINO: 7)."""
    propagation_radius: int = 3
    """Label propagation: neighbourhood half-width in patches. DINO uses 12 on the 60-row grid of 480p frames with
    8-px patches, a fifth of the height; 3 is a fifth of the 16-row grid of 128-px frames."""
    propagation_temperature: float = 0.1
    """Label propagation: softmax temperature of the affinities (DINO: 0.1)."""

    def __post_init__(self) -> None:
        if self.correspondence_teacher not in CORRESPONDENCE_TEACHERS:
            raise ValueError(f"model.correspondence_teacher must be one of {', '.join(CORRESPONDENCE_TEACHERS)}, got "
                             f"{self.correspondence_teacher!r}")
        if self.sam_features not in SAM_FEATURES:
            raise ValueError(f"model.sam_features must be one of {', '.join(SAM_FEATURES)}, got {self.sam_features!r}")
        if self.teacher_layer < 1 or self.points_per_side < 1 or min(self.self_weight, self.sam_weight) < 0:
            raise ValueError(f"model.teacher_layer and model.points_per_side must be >= 1 and the weights >= 0; got "
                             f"{self.teacher_layer}, {self.points_per_side}, {self.self_weight}, {self.sam_weight}")


@dataclass
class SpatialOptimConfig(OptimConfig):
    blr: float = 5e-4
    """Base learning rate; the actual rate is blr * effective_batch / 256 (1.6e-5 at the default batch of 8): a
    short fine-tune of a trained tower (a choice; the paper's schedule is not published)."""
    warmup_steps: int = 20
    """Linear warmup from 0, in optimizer steps."""
    weight_decay: float = 0.05
    """AdamW weight decay on matrices; 1-D parameters and biases never decay."""


# -- losses (pure functions) -------------------------------------------------------------------------------------
def token_alignment_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Negative cosine similarity of matching tokens, averaged over every token: -mean_i cos(s_i, t_i).
    (N, L, C) and (N, L, C') with C = C' -> scalar in [-1, 1]."""
    return -F.cosine_similarity(student.float(), teacher.float(), dim=-1).mean()


def pairwise_cosine(tokens: Tensor) -> Tensor:
    """(N, L, C) -> (N, L, L): cos(x_i, x_j) of every pair of tokens of each image."""
    unit = F.normalize(tokens.float(), dim=-1)
    return unit @ unit.transpose(-1, -2)


def correspondence_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Negative cosine similarity between matching rows of the student's and the teacher's token-to-token cosine
    matrices, averaged over tokens: -mean_i cos(S_i, T_i) with S = pairwise_cosine(student) (N, L, L) and
    T = pairwise_cosine(teacher). The features' widths may differ: (N, L, C) and (N, L, P)."""
    return token_alignment_loss(pairwise_cosine(student), pairwise_cosine(teacher))


# -- teachers ----------------------------------------------------------------------------------------------------
def grid_points(points_per_side: int, side: int) -> Tensor:
    """(P, 2) pixel (x, y) centres of a points_per_side x points_per_side grid over a side x side image (the
    automatic mask generator's point grid, row by row)."""
    centres = (torch.arange(points_per_side, dtype=torch.float32) + 0.5) * side / points_per_side
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)


@torch.no_grad()
def sam_grid_masks(sam: SAM2, images: Tensor, points_per_side: int) -> Tensor:
    """SAM 2's answer to each click of a points_per_side x points_per_side grid: (N, 3, H, W) images normalised
    with PE's 0.5 -> (N, P, 4h, 4w) low-resolution mask logits, clamped to +-32 as SAM 2's image predictor returns
    them. Of the three candidate masks the one with the highest predicted IoU is kept (a single click is ambiguous,
    so SAM's predictor asks for three)."""
    model = SAM2ImageModel(sam)
    side = model.image_size
    pixels = images.float() * PE_STD + PE_MEAN
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    if pixels.shape[-1] != side or pixels.shape[-2] != side:
        pixels = F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    features = model.encode_image((pixels - mean) / std)
    points = grid_points(points_per_side, side).to(images.device)[:, None]  # (P, 1, 2): one click per prompt
    labels = torch.ones(points.shape[:2], dtype=torch.int32, device=images.device)
    out = []
    for n in range(len(images)):  # the decoder repeats one image's features over its P prompts
        masks, iou = model.decode(features.select(n), points, labels, multimask_output=True)  # (P, 3, 4h, 4w)
        best = masks.gather(1, iou.argmax(dim=1).view(-1, 1, 1, 1).expand(-1, 1, *masks.shape[-2:]))[:, 0]
        out.append(best.clamp(-LOW_RES_LOGIT_CLAMP, LOW_RES_LOGIT_CLAMP))
    return torch.stack(out)


def click_mask_features(logits: Tensor, grid: tuple[int, int], probabilities: bool = True) -> Tensor:
    """Masks of P clicks as dense features: (N, P, H, W) mask logits -> (N, h*w, P), each location's vector of the P
    masks' probabilities (the sigmoid of the logits) or, with ``probabilities`` False, of their logits,
    area-averaged to the student's grid."""
    masks = logits.float().sigmoid() if probabilities else logits.float()
    return F.adaptive_avg_pool2d(masks, grid).flatten(2).transpose(1, 2)


def sam_mask_features(sam: SAM2, images: Tensor, points_per_side: int, grid: tuple[int, int],
                      probabilities: bool = True) -> Tensor:
    """SAM 2's grid-click masks as dense features: (N, 3, H, W) images normalised with PE's 0.5 -> (N, h*w, P)
    (:func:`sam_grid_masks` then :func:`click_mask_features`)."""
    return click_mask_features(sam_grid_masks(sam, images, points_per_side), grid, probabilities)


def teacher_click_quality(logits: Tensor, points_per_side: int, ids: Tensor) -> tuple[float, list[float]]:
    """How local a SAM teacher's masks are, on one image with ground truth: ``logits`` (P, h, w) of the grid's
    clicks (:func:`sam_grid_masks`) and ``ids`` (H, W) its objects (0 background) -> the mean IoU between two
    clicks' masks (near 1: the masks hardly depend on where SAM is clicked, so their correspondences carry no
    locality) and, for each click that lands on an object, the IoU of its mask with that object."""
    height, width = ids.shape
    logits = F.interpolate(logits[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0]
    agreement = mean_pairwise_iou(logits > 0) if len(logits) > 1 else 1.0
    points = grid_points(points_per_side, 1).to(ids.device)  # in [0, 1]: the same clicks at the masks' size
    rows, cols = (points[:, 1] * height).long(), (points[:, 0] * width).long()
    clicked = ids[rows, cols]
    on_object = clicked.nonzero().flatten()
    targets = ids[None] == clicked[on_object, None, None]  # (K, H, W): the object under each such click
    return float(agreement), mask_iou(logits[on_object, None], targets[:, None]).flatten().tolist()


def mask_share_features(masks: Tensor, grid: tuple[int, int]) -> Tensor:
    """Ground-truth grouping as dense features: (N, H, W) integer ids (0 background) -> (N, h*w, 256), each grid
    cell's area share of every id. Cells of one object are identical, cells of two objects orthogonal; absent ids
    are zero columns, which no cosine sees. Counted by scatter, so the number of objects is never read on the
    host."""
    n, height, width = masks.shape
    rows = torch.arange(height, device=masks.device) * grid[0] // height
    cols = torch.arange(width, device=masks.device) * grid[1] // width
    cell = (rows[:, None] * grid[1] + cols[None, :]).flatten()  # (H*W,) the grid cell of each pixel
    index = (cell * MAX_IDS).expand(n, -1) + masks.flatten(1).long()
    counts = torch.zeros(n, grid[0] * grid[1] * MAX_IDS, device=masks.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=counts.dtype))
    return counts.view(n, grid[0] * grid[1], MAX_IDS) * (grid[0] * grid[1] / (height * width))


def block_tokens(trunk: Eva, images: Tensor, layer: int) -> Tensor:
    """Patch tokens (N, h*w, C) after block ``layer`` (from 1) of a PE trunk, without the final norm: the steps of
    timm's Eva.forward_features, stopped early."""
    x = trunk.patch_embed(images)
    x, rope = trunk._pos_embed(x)
    x = trunk.norm_pre(x)
    for block in trunk.blocks[:layer]:
        x = block(x, rope=rope)
    return x[:, trunk.num_prefix_tokens:]


def spatial_trunk(trunk: Eva) -> Eva:
    """The PE-Spatial layout of a PE-Core trunk, in place: no final norm, pooling or projection (PE-Spatial configs:
    no ln_post, pool none, no projection), so ``forward_features`` gives the last block's tokens."""
    trunk.norm, trunk.head, trunk.fc_norm = nn.Identity(), nn.Identity(), nn.Identity()
    trunk.attn_pool, trunk.global_pool = None, ""
    return trunk


def load_sam2_teacher(source: str) -> SAM2:
    """The SAM 2 of ``source`` (official sam2*.pt or a Prism SAM 2 run / export), frozen in eval mode."""
    if not Path(source).exists():
        raise FileNotFoundError(f"--teacher {source} does not exist: pass an official sam2.1_hiera_*.pt or a "
                                "sam2_train run directory")
    try:
        sam = load_sam_model(source, flag=None)  # pe_align_spatial names the teacher by its file only
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise ValueError(f"--teacher {source} is not a SAM 2 model: {err}. Spatial alignment distils SAM 2.1's "
                         "mask logits: pass an official sam2.1_hiera_*.pt or a sam2_train run directory.") from err
    if not isinstance(sam, SAM2):
        raise ValueError(f"--teacher {source} holds a {type(sam).__name__}, not a SAM 2: spatial alignment distils "
                         "SAM 2.1's mask logits. Pass an official sam2.1_hiera_*.pt or a sam2_train run directory.")
    return sam.requires_grad_(False).eval()


# -- the method --------------------------------------------------------------------------------------------------
class SpatialAlignment(Method):
    """Args:
        model: ``SpatialModelConfig`` (or its fields), with ``name`` resolved.
        optim: ``SpatialOptimConfig`` (or its fields); lr: the actual peak rate; total_steps: the schedule's length.
        teacher: the SAM 2 source (official sam2*.pt, or a Prism SAM 2 run or export).
        image_size: the training resolution (the FLOP count and the export's fixed grid).
        sam: the teacher already loaded from ``teacher`` (None: loaded here); kept out of the checkpoint.
    """

    batch_keys = ("frames",)

    def __init__(self, model: SpatialModelConfig | dict, optim: SpatialOptimConfig | dict | None, lr: float,
                 total_steps: int, teacher: str, image_size: int, sam: SAM2 | None = None):
        super().__init__(as_config(SpatialOptimConfig, optim), lr, total_steps)
        self.model_cfg = cfg = as_config(SpatialModelConfig, model)
        if cfg.name is None:
            raise ValueError("SpatialModelConfig.name must name the PE-Core model of the run (the recipe reads it)")
        self.record_hparams(model=cfg, optim=self.optim_cfg, lr=lr, total_steps=total_steps, teacher=teacher,
                            image_size=image_size)
        clip = models.create(cfg.name)
        depth = len(clip.visual.trunk.blocks)
        if cfg.teacher_layer >= depth:
            raise ValueError(f"model.teacher_layer {cfg.teacher_layer} must be an intermediate block of {cfg.name}'s "
                             f"{depth}: set --model.teacher_layer to 1..{depth - 1}")
        if cfg.correspondence_teacher == "masks":
            self.batch_keys = ("frames", "frame_masks")
        self.architecture, self.image_size = clip.cfg.vision, image_size
        self.flops_per_sample = (3 + cfg.teacher_layer / depth) * vision_complexity(
            clip.cfg, clip.visual.trunk, image_size).flops  # student forward + backward, teacher layers; not SAM 2
        self.model = spatial_trunk(clip.visual.trunk)
        self.start = copy.deepcopy(self.model).requires_grad_(False).eval()  # the frozen starting tower
        # SAM 2 is a plain attribute, not a submodule: its weights stay out of checkpoints and the optimizer
        self.__dict__["sam"] = sam if sam is not None else load_sam2_teacher(teacher)
        self._val: list[dict] = []
        self._start_metrics: dict[str, float] | None = None

    def train(self, mode: bool = True) -> SpatialAlignment:
        super().train(mode)
        self.start.eval()  # frozen teachers never switch to training behaviour
        self.sam.eval()
        return self

    def init_from(self, source) -> list[str]:
        """The vision tower of a PE contrastive run (run directory or Lightning checkpoint), into the student and its
        frozen copy; the text tower, final norm, pooling and projection are left behind."""
        clip = models.create(self.model_cfg.name)
        load_into(clip, source, prefix="model.")
        state, target = clip.visual.trunk.state_dict(), self.model.state_dict()
        kept = {k: state[k] for k in target}
        self.model.load_state_dict(kept)
        self.start.load_state_dict(kept)
        left = sorted({k.split(".")[0] for k in state.keys() - target.keys()})
        return [f"init_from {source}: the PE vision tower, {len(kept)} tensors (left behind: the text tower and the "
                f"trunk's {', '.join(left)})", f"self-distillation teacher: block {self.model_cfg.teacher_layer} of "
                f"a frozen copy; SAM 2 teacher: {self.hparams['teacher']}"]

    # -- training ------------------------------------------------------------------------------------------------
    def grid(self, images: Tensor) -> tuple[int, int]:
        patch = self.model.patch_embed.patch_size
        return images.shape[-2] // patch[0], images.shape[-1] // patch[1]

    def compute_loss(self, batch) -> Tensor:
        cfg = self.model_cfg
        images = batch["frames"].flatten(0, 1)  # every frame is a training image
        student = self.model.forward_features(images)[:, self.model.num_prefix_tokens:]  # (N, h*w, C)
        loss = student.new_zeros(())
        with torch.no_grad():
            target = block_tokens(self.start, images, cfg.teacher_layer) if cfg.self_weight else None
            masks = self.correspondence_target(batch, images) if cfg.sam_weight else None
        if target is not None:
            self._self_loss = token_alignment_loss(student, target)
            loss = loss + cfg.self_weight * self._self_loss
        if masks is not None:
            self._sam_loss = correspondence_loss(student, masks)
            loss = loss + cfg.sam_weight * self._sam_loss
        return loss

    def correspondence_target(self, batch, images: Tensor) -> Tensor:
        """(N, h*w, P) features whose token similarities the student's are matched to: SAM 2's grid-click masks, or
        the ground-truth control."""
        if self.model_cfg.correspondence_teacher == "masks":
            return mask_share_features(batch["frame_masks"].flatten(0, 1), self.grid(images))
        cfg = self.model_cfg
        return sam_mask_features(self._sam_on(images.device), images, cfg.points_per_side, self.grid(images),
                                 probabilities=cfg.sam_features == "probabilities")

    def _sam_on(self, device: torch.device) -> SAM2:
        """The SAM 2 teacher on ``device`` (it is not a submodule, so Lightning does not move it)."""
        if self.sam.no_mem_embed.device != device:
            self.sam.to(device)
        return self.sam

    def training_metrics(self) -> dict[str, Tensor]:
        parts = {"train/self_distill_loss": "_self_loss", "train/sam_correspondence_loss": "_sam_loss"}
        return {name: getattr(self, attr).detach() for name, attr in parts.items() if hasattr(self, attr)}

    def param_groups(self) -> list[dict]:
        return param_groups_weight_decay(self.model, self.optim_cfg.weight_decay)  # the student only

    # -- validation: label propagation and the linear probe ------------------------------------------------------
    def dense_features(self, tower: Eva, frames: Tensor) -> Tensor:
        """(T, 3, S, S) frames -> (T, C, h, w) last-block patch features of ``tower``."""
        tokens = tower.forward_features(frames)[:, tower.num_prefix_tokens:]
        return tokens.transpose(1, 2).unflatten(2, self.grid(frames)).float()

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch, batch_idx):
        towers = {"": self.model} | ({} if self._start_metrics is not None else {"start_": self.start})
        for b in range(len(batch["frames"])):
            masks, valid = batch["frame_masks"][b].long(), batch["frame_valid"][b]
            record = {"key": batch["key"][b] if "key" in batch else f"{batch_idx}/{b}", "masks": masks.cpu()}
            for prefix, tower in towers.items():
                features = self.dense_features(tower, batch["frames"][b])
                record[prefix + "scores"] = self.propagation_scores(features, masks, valid)
                record[prefix + "features"] = features.cpu()
            if self._start_metrics is None and self.teaches_with_sam:  # the teacher never changes either
                points = self.model_cfg.points_per_side
                logits = sam_grid_masks(self._sam_on(masks.device), batch["frames"][b][:1], points)[0]
                record["teacher_agreement"], record["teacher_click_ious"] = teacher_click_quality(logits, points,
                                                                                                  masks[0])
            self._val.append(record)

    @property
    def teaches_with_sam(self) -> bool:
        return self.model_cfg.correspondence_teacher == "sam" and self.model_cfg.sam_weight > 0

    def propagation_scores(self, features: Tensor, masks: Tensor, valid: Tensor):
        """J and F (evaluation.vos, DAVIS protocol) of the first frame's objects propagated through the video."""
        cfg = self.model_cfg
        pred = propagate_segmentation(features, masks[0], self.model.patch_embed.patch_size[0],
                                      topk=cfg.propagation_topk, context=cfg.propagation_context,
                                      radius=cfg.propagation_radius, temperature=cfg.propagation_temperature)
        frames = valid.nonzero().flatten()
        ids = range(1, int(masks[0].max()) + 1)
        gt = {k: (masks[frames] == k).cpu().numpy() for k in ids}
        return evaluate_video(gt, {k: (pred[frames] == k).cpu().numpy() for k in ids},
                              skip_first_and_last=len(frames) >= 3)

    def on_validation_epoch_end(self) -> None:
        records, self._val = gather_objects(self._val), []
        if not records:
            return
        start = self._start_metrics
        if start is None:
            start = validation_metrics(records, "start_") | teacher_metrics(records)
        trainer = self.attached_trainer()
        if trainer is None or not trainer.sanity_checking:  # the starting tower never changes: measure it once
            if self._start_metrics is None:
                self.report_teacher(start)
            self._start_metrics = start
        metrics = validation_metrics(records, "") | start
        for name, value in metrics.items():  # every rank holds the same gathered numbers
            self.log(f"val/{name}", value, prog_bar=name == "J&F")

    def report_teacher(self, metrics: dict[str, float]) -> None:
        """On the console, a teacher whose masks hardly depend on the click: its correspondences can only teach
        foreground against background, which the probe rewards and tracking does not."""
        if metrics.get("teacher_prompt_agreement", 0.0) > 100 * PROMPT_AGREEMENT_WARNING:
            points = self.model_cfg.points_per_side
            rank_zero_info(f"\nThe SAM 2 teacher's masks hardly depend on where it is clicked: two of its {points} x "
                           f"{points} grid clicks' masks overlap by {metrics['teacher_prompt_agreement']:.0f}% IoU on "
                           f"average, and a click's mask covers the object clicked by "
                           f"{metrics['teacher_click_IoU']:.0f}% IoU. Its correspondences carry little locality; "
                           f"they need a stronger teacher: an official SAM 2.1, or a run in image mode for thousands "
                           f"of steps ({CLICK_READING_RUN}).")

    # -- export --------------------------------------------------------------------------------------------------
    def export(self, out_dir: Path, **metadata) -> dict[str, Path]:
        """The aligned tower (PE-Spatial) as a timm model directory (:func:`export_spatial_tower`)."""
        prism = {"model": self.model_cfg.name, "teacher": self.hparams["teacher"],
                 "teacher_layer": self.model_cfg.teacher_layer, **metadata}
        return {"pe_spatial": export_spatial_tower(self.model, self.architecture, self.image_size,
                                                   Path(out_dir) / "pe_spatial", **prism)}


def export_spatial_tower(tower: Eva, architecture: str, image_size: int, out_dir: Path, **metadata) -> Path:
    """A PE-Spatial trunk (no final norm, pooling or projection) as a timm model directory, laid out as
    ``trainers.plm.export_pe_lang`` writes PE-Lang: ``config.json`` (``timm.create_model(config["architecture"],
    **config["model_args"])`` builds it) and ``model.safetensors`` under timm's keys. The grid is fixed at
    ``image_size``: the position table is resampled to it as the tower resamples it on the fly (bilinear, no
    antialias), and RoPE's reference is that grid, which leaves the raw patch indices PE rotates by. Its features
    are ``forward_features(x)[:, num_prefix_tokens:]``, equal to the tower's at ``image_size``."""
    state = {k: v.detach().cpu() for k, v in tower.state_dict().items()}
    grid = image_size // tower.patch_embed.patch_size[0]
    state["pos_embed"] = resample_pe_pos_embed(state["pos_embed"], (grid, grid), tower.patch_embed.grid_size, 1)
    model_args = {"depth": len(tower.blocks), "init_values": None, "ref_feat_shape": [grid, grid]}
    return save_timm_tower(tower, state, out_dir, architecture, image_size, model_args,
                           {"source": "PE spatial alignment", **metadata})


def teacher_metrics(records: list[dict]) -> dict[str, float]:
    """The SAM teacher's locality on the validation videos' first frames (:func:`teacher_click_quality`): the mean
    IoU between two grid clicks' masks and the mean IoU of a click's mask with the object clicked, in percent."""
    agreement = [r["teacher_agreement"] for r in records if "teacher_agreement" in r]
    if not agreement:
        return {}
    ious = [v for r in records for v in r["teacher_click_ious"]]
    return {"teacher_prompt_agreement": 100 * float(np.mean(agreement)),
            "teacher_click_IoU": 100 * float(np.mean(ious)) if ious else float("nan")}


def validation_metrics(records: list[dict], prefix: str) -> dict[str, float]:
    """J, F and J&F (global means over every object of every video, in percent) of label propagation, and the linear
    probe's foreground / background mIoU: fitted on the even-numbered videos' frames, scored on the odd ones."""
    scores = [r[prefix + "scores"] for r in records]
    j = [v for s in scores for v in s.j_mean.values()]
    f = [v for s in scores for v in s.f_mean.values()]
    metrics = {"J": float(np.mean(j)) if j else float("nan"), "F": float(np.mean(f)) if f else float("nan")}
    metrics["J&F"] = (metrics["J"] + metrics["F"]) / 2
    if len(records) >= 2:
        train, test = records[0::2], records[1::2]
        features = {name: torch.cat([r[prefix + "features"] for r in part]) for name, part in (("train", train),
                                                                                              ("test", test))}
        labels = {name: torch.cat([(r["masks"] > 0).long() for r in part]) for name, part in (("train", train),
                                                                                             ("test", test))}
        probe = fit_segmentation_probe(features["train"], labels["train"], num_classes=2)
        pred = predict_segmentation(probe, features["test"], tuple(labels["test"].shape[-2:]))
        metrics["probe_mIoU"] = mean_iou(pred, labels["test"], num_classes=2)
    return {prefix + name: value for name, value in metrics.items()}
