"""Boundary IoU's mask_to_boundary: the OpenCV reference (one mask at a time) vs ours (torch batched, numpy).

    python -m benchmarks.boundary_iou [--masks 1000 --height 480 --width 640 --device cpu|cuda --threads 1]

Random blob masks (bilinear upsampled uniform noise, thresholded; seeded), many touching the border. The
reference formulation is boundary-iou-api boundary_utils.py mask_to_boundary: 1 px zero padding, cv2.erode
with a 3x3 ones kernel and d iterations, crop, subtract. Every method writes its boundaries into a preallocated
array; the outputs are compared byte for byte. Wall time per method is the median over ``--repeats``; the masks
already sit on the device (no host/device copies are timed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from evaluation.boundary import boundary_width, mask_to_boundary


def random_blob_masks(n: int, height: int, width: int, seed: int = 0, chunk: int = 100) -> np.ndarray:
    """(n, H, W) uint8 0/1 masks of smooth random blobs: noise on a ~32 px grid, upsampled, thresholded."""
    g = torch.Generator().manual_seed(seed)
    grid = (max(height // 32, 2), max(width // 32, 2))
    out = np.empty((n, height, width), np.uint8)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        noise = torch.rand(m, 1, *grid, generator=g)
        smooth = F.interpolate(noise, size=(height, width), mode="bilinear", align_corners=False)
        out[start:start + m] = (smooth[:, 0] > 0.6).numpy()
    return out


def opencv_boundary(mask: np.ndarray, dilation_ratio: float) -> np.ndarray:
    """The reference formulation (uint8 in, uint8 out): bowenc0221/boundary-iou-api
    boundary_iou/utils/boundary_utils.py:mask_to_boundary (Cheng et al., Boundary IoU, arXiv 2103.16562)."""
    h, w = mask.shape
    d = boundary_width(h, w, dilation_ratio)
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1:h + 1, 1:w + 1]
    return mask - eroded


def _median_time(fn, repeats: int, sync=lambda: None) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--masks", type=int, default=1000, help="number of masks")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--dilation-ratio", type=float, default=0.02)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of our torch path")
    ap.add_argument("--batch", type=int, default=100, help="masks per torch call (bounds memory)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch and OpenCV alike")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per method; the median is reported")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible; use --device cpu")
    return args


def measure(args: argparse.Namespace, masks: np.ndarray) -> tuple[dict, dict]:
    """Seconds per pass of each method over ``masks`` (median of ``args.repeats``), and whether each of ours is
    byte-identical to OpenCV's."""
    n, ratio = len(masks), args.dilation_ratio
    device = torch.device(args.device)
    masks_dev = torch.from_numpy(masks).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ref, ours_numpy = np.empty_like(masks), np.empty_like(masks)
    ours_torch = torch.empty_like(masks_dev)

    def run_opencv():
        for i in range(n):
            ref[i] = opencv_boundary(masks[i], ratio)

    def run_torch():
        for s in range(0, n, args.batch):
            ours_torch[s:s + args.batch] = mask_to_boundary(masks_dev[s:s + args.batch], ratio)

    def run_numpy():
        for i in range(n):
            ours_numpy[i] = mask_to_boundary(masks[i], ratio)

    run_torch()  # warm-up (CUDA context, allocator)
    seconds = {"opencv": _median_time(run_opencv, args.repeats), "torch": _median_time(run_torch, args.repeats, sync),
               "numpy": _median_time(run_numpy, args.repeats)}
    same = {"torch": bool(np.array_equal(ours_torch.cpu().numpy(), ref)),
            "numpy": bool(np.array_equal(ours_numpy, ref))}
    return seconds, same


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    n, h, w, ratio = args.masks, args.height, args.width, args.dilation_ratio
    masks = random_blob_masks(n, h, w, args.seed)
    seconds, same = measure(args, masks)
    rate = {k: n / t for k, t in seconds.items()}
    d = boundary_width(h, w, ratio)
    print("mask_to_boundary benchmark (Boundary IoU)")
    print(f"  masks: {n} x {h}x{w} uint8 random blobs (seed {args.seed}, {float(masks.mean()):.1%} foreground), "
          f"dilation_ratio {ratio} -> d = {d}")
    print(f"  measured: wall time of one pass over all masks, median of {args.repeats} repeats after one torch "
          f"warm-up; torch {torch.__version__} threads {torch.get_num_threads()}, OpenCV {cv2.__version__} "
          f"threads {cv2.getNumThreads()}; our torch path on {args.device} in batches of {args.batch}, masks already "
          "on the device")
    print(f"  OpenCV reference, per mask : {rate['opencv']:10.1f} masks/s  ({seconds['opencv']:.3f} s)")
    print(f"  ours, torch batched ({args.device:4s}) : {rate['torch']:10.1f} masks/s  ({seconds['torch']:.3f} s)")
    print(f"  ours, numpy, per mask      : {rate['numpy']:10.1f} masks/s  ({seconds['numpy']:.3f} s)")
    yes_no = {True: "yes", False: "NO"}
    print(f"  byte-identical to OpenCV   : torch {yes_no[same['torch']]}, numpy {yes_no[same['numpy']]}")
    print(f"  ratio ours/OpenCV (masks/s): torch {rate['torch'] / rate['opencv']:.2f}x, "
          f"numpy {rate['numpy'] / rate['opencv']:.2f}x")
    return {"masks_per_s": rate, "identical": same["torch"] and same["numpy"], "d": d,
            "ratio_torch": rate["torch"] / rate["opencv"], "ratio_numpy": rate["numpy"] / rate["opencv"]}


if __name__ == "__main__":
    sys.exit(0 if main()["identical"] else 1)
