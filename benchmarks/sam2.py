"""SAM 2 speed: training clips/s, Lightning against a plain PyTorch loop; and video-inference frames/s, Prism's
VideoPredictor against the official sam2 package's SAM2VideoPredictor under the same weights.

    python -m benchmarks.sam2                       # sam2.1_hiera_nano, 128 px, on the CPU: under a minute
    python -m benchmarks.sam2 --model sam2.1_hiera_base_plus --device cuda      # 1024 px, bf16 autocast
    python -m benchmarks.sam2 --part video --frames 32 --objects 3 --prompt click

Training (--part train) is ``python -m recipes.benchmark --trainer sam2`` (benchmarks/training.py): SAM2Training in
video mode with the recipe's defaults on --batch_size clips of --frames frames of the synthetic world, made once on
the device; each of --repeats repeats runs the recipes' Lightning Trainer and the plain loop from the same weights,
alternating which goes first, --warmup untimed steps then --steps timed ones. A clip counts once however many
objects it has; frames/s is clips/s x frames.

Video (--part video): one synthetic-world video of --frames frames at the model's input size, written once as
JPEGs that both predictors read (each decodes and resizes them its own way: sam2 all at once in init_state, Prism
frame by frame while tracking). Each side starts on the video once (init_state, timed apart); every run then
resets it and prompts the --objects objects on frame 0 with their masks (or a click each), untimed, and times the
propagation over every frame (frame 0, the prompted one, included). frames/s counts video frames, whatever the
number of objects tracked in each. Warm-up propagations are untimed; the runs alternate which side goes first.
The last run's logits of the two sides are compared: the largest absolute difference and the IoU of each object's
masks (logit > 0) over all frames.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import lightning as L
import numpy as np
import sam2.sam2_video_predictor as official_video
import sam2.utils.misc as official_misc
import torch
import yaml
from PIL import Image
from sam2.build_sam import build_sam2_video_predictor
from sam2.modeling.backbones.hieradet import Hiera
from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
from sam2.modeling.position_encoding import PositionEmbeddingSine
from sam2.modeling.sam.transformer import RoPEAttention
from sam2.sam2_video_predictor import SAM2VideoPredictor
from tqdm import tqdm

import models
from benchmarks.config import Config, ModelChoice
from benchmarks.measure import StepClock, format_how, how_measured
from benchmarks.training import synthetic_video, training_benchmark
from datamodules.synthetic import MAX_SCENE_OBJECTS
from models.sam.sam2 import SAM2_CONFIGS, official_sam2_state
from models.sam.video_predictor import VideoFrames, VideoPredictor
from trainers.threads import configure_cpu_threads

PARTS = ("train", "video", "both")
NANO = "sam2.1_hiera_nano"
OFFICIAL_SIZES = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}
# What build_sam2_video_predictor's postprocessing sets, but the hole filling: it needs sam2's compiled extension,
# which a pip install may lack (sam2 then skips it with a warning), and Prism's predictor does not fill holes.
PREDICTOR_OVERRIDES = {"sam_mask_decoder_extra_args": {"dynamic_multimask_via_stability": True,
                                                       "dynamic_multimask_stability_delta": 0.05,
                                                       "dynamic_multimask_stability_thresh": 0.98},
                       "binarize_mask_from_pts_for_mem_enc": True, "fill_hole_area": 0}
AGREE_IOU = 0.99
"""The smallest per-object mask IoU between the two predictors that counts as agreement."""


# ---- the official predictor and ours, same weights ---------------------------------------------------------------

def official_nano_modules() -> tuple[ImageEncoder, MemoryAttention, MemoryEncoder]:
    """sam2's image encoder, memory attention and memory encoder at sam2.1_hiera_nano's sizes (sam2 ships no such
    config), built from sam2.modeling classes; the parity tests build their reference from the same."""
    trunk = Hiera(embed_dim=32, num_heads=1, stages=(1, 1, 2, 1), global_att_blocks=(3,), window_spec=(4, 4, 4, 2),
                  window_pos_embed_bkg_spatial_size=(4, 4))
    neck = FpnNeck(PositionEmbeddingSine(num_pos_feats=64), d_model=64, backbone_channel_list=[256, 128, 64, 32],
                   fpn_top_down_levels=[2, 3], fpn_interp_model="nearest")
    rope = dict(rope_theta=10000.0, feat_sizes=[8, 8], embedding_dim=64, num_heads=1, downsample_rate=1, dropout=0.1)
    layer = MemoryAttentionLayer(
        activation="relu", d_model=64, dim_feedforward=256, dropout=0.1, pos_enc_at_attn=False,
        pos_enc_at_cross_attn_keys=True, pos_enc_at_cross_attn_queries=False, self_attention=RoPEAttention(**rope),
        cross_attention=RoPEAttention(**rope, rope_k_repeat=True, kv_in_dim=32))
    memory_encoder = MemoryEncoder(
        out_dim=32, in_dim=64, mask_downsampler=MaskDownSampler(embed_dim=64, kernel_size=3, stride=2, padding=1),
        fuser=Fuser(CXBlock(dim=64, kernel_size=7, padding=3, layer_scale_init_value=1e-6, use_dwconv=True), 2),
        position_encoding=PositionEmbeddingSine(num_pos_feats=32))
    return ImageEncoder(trunk, neck, scalp=1), MemoryAttention(64, True, layer, num_layers=2), memory_encoder


def _official_nano() -> SAM2VideoPredictor:
    """sam2's video predictor around :func:`official_nano_modules` with the flags of its sam2.1 T config."""
    config = Path(official_video.__file__).parent / "configs" / "sam2.1" / "sam2.1_hiera_t.yaml"
    flags = {k: v for k, v in yaml.safe_load(config.read_text())["model"].items()
             if not isinstance(v, dict) and k != "_target_"}
    image_encoder, memory_attention, memory_encoder = official_nano_modules()
    return SAM2VideoPredictor(image_encoder=image_encoder, memory_attention=memory_attention,
                              memory_encoder=memory_encoder, **{**flags, **PREDICTOR_OVERRIDES, "image_size": 128})


def official_config(name: str) -> str:
    """The config that sam2 ships for a registered official size: sam2.1_hiera_base_plus ->
    configs/sam2.1/sam2.1_hiera_b+.yaml."""
    prefix, size = name.split("_hiera_")
    return f"configs/{prefix}/{prefix}_hiera_{OFFICIAL_SIZES[size]}.yaml"


def official_predictor(name: str, device: torch.device) -> SAM2VideoPredictor:
    """sam2's SAM2VideoPredictor of ``name`` with random weights (no checkpoint), in eval mode on ``device``.
    Parameters that start constant (memory embeddings, position embeddings, norms, layer scales) get noise, as in
    the parity tests, so that one that reached the wrong place in Prism's model would change the masks."""
    if name == NANO:
        predictor = _official_nano()
    else:
        overrides = [f"++model.sam_mask_decoder_extra_args.{k}={str(v).lower()}"
                     for k, v in PREDICTOR_OVERRIDES["sam_mask_decoder_extra_args"].items()]
        overrides += [f"++model.{k}={str(v).lower()}" for k, v in PREDICTOR_OVERRIDES.items()
                      if not isinstance(v, dict)]
        predictor = build_sam2_video_predictor(official_config(name), ckpt_path=None, device="cpu",
                                               apply_postprocessing=False, hydra_overrides_extra=overrides)
    with torch.no_grad():
        for key, param in predictor.named_parameters():
            if key.startswith(("no_", "maskmem_tpos_enc")) or "pos_embed" in key:
                param.normal_(std=0.5)
            elif key.endswith("gamma"):
                param.uniform_(0.5, 1.5)
            elif param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return predictor.to(device).eval()


def prism_predictor(official: SAM2VideoPredictor, name: str, device: torch.device) -> VideoPredictor:
    """Prism's VideoPredictor on the registered ``name`` holding ``official``'s weights (through the checkpoint
    mapping that loads sam2's files), with the flag sam2's video-predictor build sets."""
    model = models.create(name, binarize_mask_from_pts_for_mem_enc=True)
    state = {k: v.detach().cpu() for k, v in official.state_dict().items()}
    model.load_state_dict(official_sam2_state({"model": state}, model), strict=True)
    return VideoPredictor(model.to(device).eval())


# ---- the two sides -----------------------------------------------------------------------------------------------

@contextmanager
def quiet_official():
    """sam2's progress bars off (they only print; the iteration stays sam2's)."""
    silent = functools.partial(tqdm, disable=True)
    saved = official_video.tqdm, official_misc.tqdm
    official_video.tqdm = official_misc.tqdm = silent
    try:
        yield
    finally:
        official_video.tqdm, official_misc.tqdm = saved


class Official:
    name = "sam2"

    def __init__(self, predictor: SAM2VideoPredictor):
        self.predictor, self.state = predictor, None

    def start(self, folder: Path) -> None:
        self.state = self.predictor.init_state(str(folder))

    def prompt(self, prompts: dict) -> None:
        self.predictor.reset_state(self.state)
        for obj_id, (kind, value) in prompts.items():
            if kind == "mask":
                self.predictor.add_new_mask(self.state, 0, obj_id, value)
            else:
                self.predictor.add_new_points_or_box(self.state, 0, obj_id, value, np.ones(len(value), np.int32))

    def propagate(self) -> Iterator:
        return self.predictor.propagate_in_video(self.state)


class Prism:
    name = "prism"

    def __init__(self, predictor: VideoPredictor):
        self.predictor = predictor

    def start(self, folder: Path) -> None:
        self.predictor.init_state(folder)

    def prompt(self, prompts: dict) -> None:
        self.predictor.reset()
        for obj_id, (kind, value) in prompts.items():
            if kind == "mask":
                self.predictor.add_mask(0, obj_id, value)
            else:
                self.predictor.add_points(0, obj_id, value, np.ones(len(value), np.int32))

    def propagate(self) -> Iterator:
        return self.predictor.propagate()


def frame_zero_prompts(ids: np.ndarray, objects: int, kind: str) -> dict:
    """Object k's frame-0 mask, or a click on its pixel nearest the mask's centroid (x, y)."""
    prompts = {}
    for k in range(1, objects + 1):
        mask = ids == k
        if kind == "mask":
            prompts[k] = ("mask", mask)
            continue
        ys, xs = np.nonzero(mask)
        nearest = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
        prompts[k] = ("click", np.array([[xs[nearest], ys[nearest]]], dtype=np.float32))
    return prompts


def timed_propagation(side: Official | Prism, prompts: dict, device: torch.device,
                      autocast: Callable) -> tuple[list[float], list[torch.Tensor]]:
    """Prompt (untimed), then propagate over the video: each frame's milliseconds and (objects, 1, H, W) logits."""
    with torch.inference_mode(), autocast():
        side.prompt(prompts)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        clock, logits = StepClock(device), []
        clock.mark()
        for _, _, frame_logits in side.propagate():
            logits.append(frame_logits)
            clock.mark()
    return clock.step_ms(), logits


# ---- the video benchmark ------------------------------------------------------------------------------------------

def agreement(prism: list[torch.Tensor], official: list[torch.Tensor]) -> dict:
    """The two sides' logits (per frame (objects, 1, H, W)): largest absolute difference, and per object the IoU of
    the masks (logit > 0) over all frames (1 when both are empty), with each side's foreground fraction."""
    ours = torch.stack([x.float().cpu() for x in prism])[:, :, 0]  # (T, K, H, W)
    theirs = torch.stack([x.float().cpu() for x in official])[:, :, 0]
    a, b = ours > 0, theirs > 0
    inter = (a & b).sum(dim=(0, 2, 3)).double()
    union = (a | b).sum(dim=(0, 2, 3)).double()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).tolist()
    return {"max_abs_logit_diff": float((ours - theirs).abs().max()), "mask_iou_per_object": iou,
            "mask_iou_min": min(iou), "pixels_differing": float((a != b).float().mean()),
            "foreground_prism": float(a.float().mean()), "foreground_official": float(b.float().mean()),
            "agree": min(iou) >= AGREE_IOU}


def side_figures(frame_ms: list[list[float]], frames: int, objects: int, setup_s: float) -> dict:
    """One side's figures over its timed runs: frames/s (and object-frames/s) over all of them, the median, min and
    max propagation time, the median time per frame."""
    totals = [sum(ms) / 1000.0 for ms in frame_ms]
    fps = frames * len(totals) / sum(totals)
    return {"frames_per_sec": fps, "object_frames_per_sec": fps * objects, "runs": len(totals),
            "propagation_s_median": statistics.median(totals), "propagation_s_min": min(totals),
            "propagation_s_max": max(totals), "frame_ms_median": statistics.median(m for ms in frame_ms for m in ms),
            "init_state_s": setup_s, "propagation_s": totals}


def frame_read_ms(video: VideoFrames) -> float:
    """Median milliseconds for Prism's predictor to read one frame as the model's input (JPEG decode, resize,
    normalise, on the host), which its propagation does frame by frame and sam2's init_state does up front."""
    times = []
    for index in range(len(video)):
        start = time.perf_counter()
        video[index]
        times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_sides(sides: dict, prompts: dict, args: argparse.Namespace, device: torch.device,
              autocast: Callable) -> tuple[list[dict], dict, dict]:
    """Warm-up propagations, then the timed runs, alternating which side goes first. Returns each repeat's order,
    frames/s and ratio, each side's per-run frame milliseconds, and each side's last logits."""
    for _ in range(args.warmup):
        for side in sides.values():
            timed_propagation(side, prompts, device, autocast)
    repeats, frame_ms, last = [], {name: [] for name in sides}, {}
    for repeat in range(args.repeats):
        entry = {"repeat": repeat, "order": list(sides) if repeat % 2 == 0 else list(sides)[::-1]}
        for name in entry["order"]:
            ms, last[name] = timed_propagation(sides[name], prompts, device, autocast)
            frame_ms[name].append(ms)
            entry[name] = args.frames / (sum(ms) / 1000.0)
        entry["ratio"] = entry["prism"] / entry["official"]
        repeats.append(entry)
    return repeats, frame_ms, last


def video_benchmark(args: argparse.Namespace, device: torch.device, threads: str) -> dict:
    """Both predictors on one synthetic video (see the module's docstring); the report."""
    side = SAM2_CONFIGS[args.model].image_size
    frames, ids = synthetic_video(args.frames, args.objects, side, args.seed)
    prompts = frame_zero_prompts(ids[0], args.objects, args.prompt)
    torch.manual_seed(args.seed)
    official = official_predictor(args.model, device)
    sides = {"official": Official(official), "prism": Prism(prism_predictor(official, args.model, device))}
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    setup_s = {}
    with tempfile.TemporaryDirectory() as tmp, quiet_official():
        for t, frame in enumerate(frames):
            Image.fromarray(frame).save(Path(tmp) / f"{t:05d}.jpg", quality=95)
        for name, s in sides.items():
            start = time.perf_counter()
            with torch.inference_mode(), autocast():
                s.start(Path(tmp))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            setup_s[name] = time.perf_counter() - start
        repeats, frame_ms, last = run_sides(sides, prompts, args, device, autocast)
        read_ms = frame_read_ms(sides["prism"].predictor.video)
    figures = {name: side_figures(frame_ms[name], args.frames, args.objects, setup_s[name]) for name in sides}
    figures["prism"]["frame_read_ms"] = read_ms
    return {"how_measured": _video_how(args, device, side, threads, repeats), **figures, "repeats": repeats,
            "ratio_prism_over_official": {"frames_per_sec": _spread([r["ratio"] for r in repeats])},
            "agreement": agreement(last["prism"], last["official"])}


def _video_how(args: argparse.Namespace, device: torch.device, side: int, threads: str, repeats: list[dict]) -> dict:
    order = " | ".join(", ".join(r["order"]) for r in repeats)
    return how_measured(
        device, part="video inference", model=args.model, sam2_package=importlib.metadata.version("sam2"),
        weights=f"random (seed {args.seed}), the same in both", image_size=side,
        video=f"{args.frames} frames of {side}x{side}, synthetic world (seed {args.seed}), JPEG quality 95",
        prompts=f"{args.objects} object(s) on frame 0, {'masks' if args.prompt == 'mask' else 'one click each'}",
        precision="bf16 autocast + TF32, inference_mode" if device.type == "cuda" else "fp32, inference_mode",
        timed="propagation over every frame (prompts and init_state untimed)",
        runs=f"{args.warmup} warm-up + {args.repeats} timed per side, in order: {order}",
        ratio="Prism / sam2 frames/s within each repeat: median (min-max)", cpu_threads=threads,
        timing=StepClock(device).how.replace("step", "frame"))


# ---- the training benchmark ---------------------------------------------------------------------------------------

def _clip_figures(figures: dict, frames: int) -> dict:
    return {"clips_per_sec": figures["images_per_sec"], "frames_per_sec": figures["images_per_sec"] * frames,
            **{k: figures[k] for k in ("timed_steps", "step_ms_median", "step_ms_min", "step_ms_max",
                                       "peak_memory_bytes", "step_ms")}, "runs": figures["runs"]}


def train_benchmark(args: argparse.Namespace, device: torch.device, run_dir: Path) -> dict:
    """``recipes.benchmark --trainer sam2`` with these settings; its figures per clip and per frame."""
    cfg = Config(trainer="sam2", model=ModelChoice(args.model), image_size=SAM2_CONFIGS[args.model].image_size,
                 batch_size=args.batch_size, warmup_steps=args.warmup, steps=args.steps, repeats=args.repeats,
                 seed=args.seed, run_dir=str(run_dir), num_frames=args.frames, objects=args.objects)
    L.seed_everything(args.seed, verbose=False)
    report, _ = training_benchmark(cfg, run_dir, device)
    ratio = report["ratio_lightning_over_plain"]
    repeats = [{"repeat": r["repeat"], "order": r["order"], **{loop: r[loop]["images_per_sec"] for loop in r["order"]},
                "ratio": r["ratio"]["images_per_sec"]} for r in report["repeats"]]
    return {"how_measured": report["how_measured"],
            **{loop: _clip_figures(report[loop], args.frames) for loop in ("lightning", "plain")},
            "repeats": repeats, "ratio_lightning_over_plain": {
                "clips_per_sec": {"median": ratio["images_per_sec"], "min": ratio["images_per_sec_min"],
                                  "max": ratio["images_per_sec_max"]}}}


# ---- the printout and the command ---------------------------------------------------------------------------------

def _ratio(spread: dict) -> str:
    return f"{spread['median']:.3f} ({spread['min']:.3f}-{spread['max']:.3f})"


def format_train(report: dict) -> str:
    lines = ["SAM 2 training: the recipes' Lightning Trainer against a plain PyTorch loop, the same steps",
             format_how(report["how_measured"]), "",
             f"  {'':<18}{'clips/s':>10}{'frames/s':>10}{'median ms':>11}{'min ms':>9}{'max ms':>9}{'peak mem':>10}"]
    for name, key in (("Lightning", "lightning"), ("plain PyTorch", "plain")):
        r = report[key]
        lines.append(f"  {name:<18}{r['clips_per_sec']:>10.3f}{r['frames_per_sec']:>10.2f}{r['step_ms_median']:>11.1f}"
                     f"{r['step_ms_min']:>9.1f}{r['step_ms_max']:>9.1f}{r['peak_memory_bytes'] / 1e9:>8.2f} GB")
    lines.append(f"  Lightning / plain clips/s: {_ratio(report['ratio_lightning_over_plain']['clips_per_sec'])}, "
                 "median over repeats of the ratio within each repeat (min-max)")
    lines += [f"  repeat {r['repeat'] + 1}: " + ", ".join(f"{loop} {r[loop]:.3f}" for loop in r["order"])
              + f" clips/s; ratio {r['ratio']:.3f}" for r in report["repeats"]]
    return "\n".join(lines)


def format_video(report: dict) -> str:
    names = {"official": "sam2 SAM2VideoPredictor", "prism": "Prism VideoPredictor"}
    lines = ["SAM 2 video inference: Prism's VideoPredictor against sam2's SAM2VideoPredictor, the same weights",
             format_how(report["how_measured"]), "",
             f"  {'':<26}{'frames/s':>10}{'obj-frames/s':>14}{'median s':>10}{'min s':>8}{'max s':>8}"
             f"{'ms/frame':>10}{'init_state s':>14}"]
    for key, name in names.items():
        r = report[key]
        lines.append(f"  {name:<26}{r['frames_per_sec']:>10.2f}{r['object_frames_per_sec']:>14.2f}"
                     f"{r['propagation_s_median']:>10.3f}{r['propagation_s_min']:>8.3f}{r['propagation_s_max']:>8.3f}"
                     f"{r['frame_ms_median']:>10.1f}{r['init_state_s']:>14.2f}")
    lines.append(f"  Prism / sam2 frames/s: {_ratio(report['ratio_prism_over_official']['frames_per_sec'])}, "
                 "median over repeats of the ratio within each repeat (min-max)")
    lines += [f"  repeat {r['repeat'] + 1}: " + ", ".join(f"{side} {r[side]:.2f}" for side in r["order"])
              + f" frames/s; ratio {r['ratio']:.3f}" for r in report["repeats"]]
    lines.append(f"  Prism's propagation includes reading each frame ({report['prism']['frame_read_ms']:.1f} ms, JPEG "
                 "decode + resize + normalise on the host); sam2 reads them all in init_state (with frame 0's "
                 "features)")
    a = report["agreement"]
    ious = ", ".join(f"{v:.4f}" for v in a["mask_iou_per_object"])
    lines.append(f"  agreement (last run): mask IoU per object {ious}; max |logit difference| "
                 f"{a['max_abs_logit_diff']:.3g}; pixels differing {a['pixels_differing']:.2e}; foreground Prism "
                 f"{a['foreground_prism']:.1%}, sam2 {a['foreground_official']:.1%} -> "
                 + ("agree" if a["agree"] else f"DISAGREE (an IoU below {AGREE_IOU})"))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=NANO, choices=list(SAM2_CONFIGS), help="registered SAM 2 model")
    ap.add_argument("--part", default="both", choices=PARTS, help="what to measure")
    ap.add_argument("--frames", type=int, default=8, help="frames per training clip and of the video")
    ap.add_argument("--objects", type=int, default=2, help="objects per clip and prompted in the video (1-8)")
    ap.add_argument("--batch_size", type=int, default=2, help="training clips per step")
    ap.add_argument("--steps", type=int, default=6, help="timed training steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed training steps per run / propagations per side")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each loop and of each predictor")
    ap.add_argument("--prompt", default="mask", choices=["mask", "click"], help="frame-0 prompt of each object")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0, help="weights, clips, video, prompt decisions")
    ap.add_argument("--run_dir", default="runs/benchmark_sam2", help="the Lightning runs' logs")
    ap.add_argument("--output", default=None, help="the JSON report (default: <run_dir>/benchmark_sam2.json)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible; use --device cpu")
    for name, low in (("frames", 1), ("batch_size", 1), ("steps", 1), ("repeats", 1), ("warmup", 0)):
        if getattr(args, name) < low:
            ap.error(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if not 1 <= args.objects <= MAX_SCENE_OBJECTS:  # the synthetic video's scene holds at most this many
        ap.error(f"--objects must be in 1..{MAX_SCENE_OBJECTS}, got {args.objects}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what stays fp32, as the recipes' Trainer sets it
    threads = configure_cpu_threads(0, 1)
    report: dict = {"args": vars(args)}
    if args.part in ("train", "both"):
        report["train"] = train_benchmark(args, device, run_dir)
        print(format_train(report["train"]) + "\n", flush=True)
    if args.part in ("video", "both"):
        report["video"] = video_benchmark(args, device, threads)
        print(format_video(report["video"]) + "\n")
    path = Path(args.output) if args.output else run_dir / "benchmark_sam2.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {path}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main().get("video", {}).get("agreement", {}).get("agree", True) else 1)
