"""The GPU benchmarks in one command: each case is ``python -m recipes.benchmark`` in a subprocess, the figures go
into a marked section of BENCHMARKS.md with every command, the GPU's name, the date and whether each performance
target holds.

    python -m benchmarks.gpu_suite --dry-run                   # every case: command and time estimate (any machine)
    python -m benchmarks.gpu_suite --part mae                  # one part per 10-minute command on an H200
    python -m benchmarks.gpu_suite --part loader --shards '/data/in1k/train-{000000..001023}.tar'
    python -m benchmarks.gpu_suite --part zero --cases zero3off_6p5b    # one case again, e.g. one the budget skipped

Parts (``--part all`` or a comma list):
  mae       MAE ViT-B/16, 224 px, mask 0.75, batch 256, bf16, synthetic data: eager and torch.compile; MFU against
            the matmul peak measured in the same run, and Lightning / plain.
  loader    --trainer none over JPEG shards (16 synthetic worlds of 384 px images built once, in parallel, unless
            --shards names real ones), 8 and 16 workers, host and device decode; then the MAE ViT-B/16 run fed from
            those shards (host and device decode) against the same run on synthetic batches: does the loader keep up?
  zero      MAE ViT-B/16 under ddp and deepspeed_stage_2 (the ZeRO-2 / DDP ratio); then deepspeed_stage_3 for MAE
            ViT-6.5B, ViT-2B and ViT-H (largest first), each retried with deepspeed_stage_3_offload only if it does
            not fit: the largest MAE encoder that trains on one GPU.
  plm       PerceptionLM-1B stage 2 (PE-L tower, 448 px tiles, Llama 3.2 1B; every part trained), bf16, on one batch
            of the built-in conversations: tokens/s, MFU (benchmarks.methods.plm_step_flops) and Lightning / plain.
  ablation  channels-last off / on (and on + compile) for the conv model RegNetY-16GF (SWAG's), and MAE ViT-B/16
            in fp32 (TF32 matmuls) against the bf16 run of the mae part. torch.compile on / off is in the mae part.

Each case runs in its own run directory (``<run-root>/<case>``, default runs/gpu_suite) in its own process group,
time-boxed: an OOM, a crash or a timeout ends that case only, and is recorded with the last lines of its log
(``<run-root>/<case>/log.txt``). Each part has a time budget (--part-budget, default 540 s, to fit a 10-minute
command): a case whose estimate would pass it is skipped and recorded as such; run it later with --cases. Results of
every invocation accumulate in ``<run-root>/results.json`` and the Markdown section is rewritten from all of them
after each case, so parts run in separate commands (on one disk) end up in one section.

Besides torch, lightning and timm, the recipe needs jsonargparse (with docstring_parser and typeshed_client),
webdataset, braceexpand and wandb, and the zero part deepspeed: the suite names any that are missing before it starts.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("mae", "loader", "zero", "plm", "ablation")
PART_BUDGET_S = 540  # a device command may run 10 minutes; this leaves time for start-up and copying results
BEGIN = "<!-- gpu_suite:begin (python -m benchmarks.gpu_suite writes this section; edits inside are lost) -->"
END = "<!-- gpu_suite:end -->"

# The performance targets
MIN_MFU = 0.50  # MAE ViT-B/16, against the measured bf16 matmul peak
MIN_LIGHTNING_OVER_PLAIN = 0.98  # Lightning within 2% of the plain loop (images/s)
MIN_SHARDS_OVER_SYNTHETIC = 0.95  # the loader keeps up: shards within 5% of synthetic batches made on the GPU
MIN_ZERO2_OVER_DDP = 0.95

# Batch per GPU for MAE ViT-B/16: 256 is the per-GPU share of the paper's 4096 on 16 GPUs; it keeps the encoder's
# GEMMs at 256 x 50 = 12,800 rows and the decoder's at 256 x 197, and a step (about 50 ms at 40% MFU, 58.7 training
# GFLOPs per image by the model's own count) far longer than the Python and launch overhead Lightning could add.
MAE_BATCH = 256
MAE_B16 = ("--trainer", "mae", "--model.name", "mae_vit_base_patch16", "--image_size", "224", "--precision",
           "bf16-mixed")
# The largest MAE encoders registered (MAWS pre-pretrains ViT-2B and ViT-6.5B), largest first, with a batch that
# keeps the encoder's GEMMs at >= 2,000 rows (65 visible tokens at 224 px / 14) while the 16 bytes per parameter of
# one-GPU ZeRO-3 (bf16 weights and gradients, fp32 master weights and AdamW moments: 104 GB for 6.5B) leave room.
# (short name, model, batch, billions of parameters)
BIG_MAE = (("6p5b", "mae_vit_6p5b_patch14", 32, 6.5), ("2b", "mae_vit_2b_patch14", 64, 2.0),
           ("huge", "mae_vit_huge_patch14", 128, 0.63))
# PLM-1B stage 2: 2 conversations of the built-in world, each about 4,400 tokens (an image is a thumbnail and 16
# tiles of 448 px, 17 x 256 visual tokens), one stage-2 sequence (6144 tokens at most) each. Without activation
# checkpointing the PE-L tower keeps about 0.8 GB of activations per tile in bf16 and the 128k-entry logits about
# 0.6 MB per token: 2 conversations (34 tiles) with the fp32 weights, gradients and AdamW moments of 1.5B parameters
# (about 25 GB) fit an H200, 8 would not.
PLM_BATCH = 2
LOADER_WORKERS = (8, 16)  # the H200 machine has 16 cores
TRAIN_WORKERS = 14  # loader workers beside a training process: two cores left for its Python loop and pinning
# The synthetic world for the loader: ImageNet-like pixel counts (384^2 = 0.15 MP; ImageNet's mean is about
# 400 x 350), 16 worlds of 512 built in parallel, one per core (about 20 ms per image: a few seconds each).
# Its flat-coloured JPEGs are about 14 kB against ImageNet's 110 kB and decode roughly twice as fast: a verdict on
# real data needs --shards.
WORLD_PARTS, WORLD_IMAGE_SIZE, WORLD_SAMPLES, WORLD_PER_SHARD = 16, 384, 512, 128

REQUIRED = ("torch", "lightning", "timm", "jsonargparse", "docstring_parser", "typeshed_client", "webdataset",
            "braceexpand", "wandb", "PIL")
REQUIRED_BY_PART = {"zero": ("deepspeed",)}


# ---- the cases ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    part: str
    what: str
    """One line for the tables."""
    args: tuple[str, ...]
    """The flags of python -m recipes.benchmark."""
    estimate_s: int
    """Expected wall time on an H200 machine, start-up included (an estimate, not a measurement)."""
    timeout_s: int
    """The case is stopped past this (or past the part's budget)."""
    only_if_failed: str | None = None
    """Run only when this case did not finish (the offload retry of a model that does not fit)."""

    @property
    def kind(self) -> str:
        """loader (--trainer none: a table per worker count) or training (Lightning and plain steps)."""
        return "loader" if self.args[self.args.index("--trainer") + 1] == "none" else "training"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "recipes.benchmark", *self.args]

    def shown(self) -> str:
        return shlex.join(["python", "-m", "recipes.benchmark", *self.args])


def world_spec(run_root: Path, smoke: bool = False) -> str:
    """The shard glob of the suite's synthetic worlds (built by :func:`build_world`)."""
    return str(_world_root(run_root, smoke) / "synthetic" / "*" / "train-*.tar")


def _world_root(run_root: Path, smoke: bool) -> Path:
    parts, size, samples, _ = _world_settings(smoke)
    return run_root / "world" / f"{parts}x{samples}-{size}px"


def _world_settings(smoke: bool) -> tuple[int, int, int, int]:
    return (2, 64, 64, 32) if smoke else (WORLD_PARTS, WORLD_IMAGE_SIZE, WORLD_SAMPLES, WORLD_PER_SHARD)


@dataclass(frozen=True)
class _Cases:
    """How the cases of one suite are written: their run root, and the smoke settings when asked for."""

    run_root: Path
    smoke: bool

    def steps(self, warmup: int, timed: int, repeats: int = 1) -> tuple[str, ...]:
        """Warm-up and timed steps per run, and the repeats of each loop (always 1 in a smoke run)."""
        if self.smoke:
            return ("--warmup_steps", "1", "--steps", "2", "--repeats", "1")
        return ("--warmup_steps", str(warmup), "--steps", str(timed), "--repeats", str(repeats))

    def batch(self, n: int) -> tuple[str, ...]:
        return ("--batch_size", str(min(n, 8) if self.smoke else n))

    def case(self, name: str, part: str, what: str, args: Sequence[str], estimate_s: int, timeout_s: int,
             only_if_failed: str | None = None) -> Case:
        return Case(name, part, what, (*args, "--run_dir", str(self.run_root / name)), estimate_s, timeout_s,
                    only_if_failed)

    @property
    def mae_b(self) -> tuple[str, ...]:
        return (*MAE_B16, *self.batch(MAE_BATCH))


def _mae_cases(c: _Cases) -> list[Case]:
    # Start-up of one case, about 25 s: Python with torch, Lightning, timm and W&B; the 1 s matmul peak; building
    # the model. A MAE ViT-B/16 step takes about 50 ms at 40% MFU; each further run adds about 8 s (a Trainer,
    # W&B's offline run, a copy of the model). The eager case runs each loop 3 times, alternating which goes
    # first, for the Lightning / plain ratio's median and spread; compile's case once, as each run compiles anew.
    return [
        c.case("mae_b16_eager", "mae", "MAE ViT-B/16, bf16, eager", (*c.mae_b, *c.steps(20, 50, repeats=3)), 95, 240),
        c.case("mae_b16_compile", "mae", "MAE ViT-B/16, bf16, torch.compile",
               (*c.mae_b, *c.steps(20, 50), "--compile", "true"), 200, 420),
    ]


def _loader_cases(c: _Cases, spec: str) -> list[Case]:
    cases = []
    for decode in ("host", "device"):
        # per worker count: worker start-up (forkserver, imports), max(2, workers) warm-up batches, 20 timed
        # batches of 256 for the datamodule and as many for the raw decode, at a few thousand images/s
        cases.append(c.case(f"loader_{decode}", "loader", f"--trainer none, {decode} decode",
                            ("--trainer", "none", "--shards", spec, *c.batch(MAE_BATCH), "--image_size", "224",
                             "--steps", "2" if c.smoke else "20", "--worker_counts", json.dumps(list(LOADER_WORKERS)),
                             "--decode", decode), 90, 300))
    cases.append(c.case("loader_mae_synthetic", "loader", "MAE ViT-B/16, synthetic batches (reference)",
                        (*c.mae_b, *c.steps(20, 50), "--plain", "false"), 45, 240))
    for decode in ("host", "device"):
        cases.append(c.case(f"loader_mae_shards_{decode}", "loader", f"MAE ViT-B/16 from shards, {decode} decode",
                            (*c.mae_b, *c.steps(20, 50), "--plain", "false", "--data", "shards", "--shards", spec,
                             "--num_workers", str(TRAIN_WORKERS), "--decode", decode), 75, 300))
    return cases


def _zero_cases(c: _Cases) -> list[Case]:
    # ZeRO-2 against DDP: both through Lightning on the one GPU, the Lightning run only
    cases = [c.case(name, "zero", f"MAE ViT-B/16, bf16, {strategy}",
                    (*c.mae_b, *c.steps(10, 30), "--plain", "false", "--strategy", strategy), estimate, 300)
             for name, strategy, estimate in (("zero_ddp_b16", "ddp", 45), ("zero_ds2_b16", "deepspeed_stage_2", 70))]
    # Big models: building one on the CPU (fp32, xavier init) and DeepSpeed's partitioning take most of the time
    # (about 10 s per billion parameters each); offload adds the AdamW step on the CPU (about 1 s per billion
    # parameters on 16 cores) and the transfers.
    for short, model, size, billions in BIG_MAE:
        args = ("--trainer", "mae", "--model.name", model, "--image_size", "224", "--precision", "bf16-mixed",
                *c.batch(size), "--plain", "false")
        cases.append(c.case(f"zero3_{short}", "zero", f"{model}, batch {size}, deepspeed_stage_3",
                            (*args, *c.steps(3, 5), "--strategy", "deepspeed_stage_3"), int(60 + 20 * billions), 420))
        cases.append(c.case(f"zero3off_{short}", "zero", f"{model}, batch {size}, deepspeed_stage_3_offload",
                            (*args, *c.steps(2, 3), "--strategy", "deepspeed_stage_3_offload"),
                            int(60 + 35 * billions), 540, only_if_failed=f"zero3_{short}"))
    return cases


def _plm_cases(c: _Cases) -> list[Case]:
    # Start-up: the conversation world and its tokenizer (about 30 s on a fresh machine, then cached), building
    # 1.5B parameters on the CPU and a copy per run (about 40 s); a step of about 0.15 PFLOP takes under a second.
    args = ("--trainer", "plm", "--model.name", "plm_1b", "--image_size", "448", "--precision", "bf16-mixed",
            *c.batch(PLM_BATCH))
    return [c.case("plm_1b_stage2", "plm", "PLM-1B stage 2, 448 px tiles, bf16, eager", (*args, *c.steps(5, 20)),
                   180, 420)]


def _ablation_cases(c: _Cases) -> list[Case]:
    regnet = ("--trainer", "swag", "--model.name", "regnety_16gf", "--image_size", "224", "--precision",
              "bf16-mixed", *c.batch(128), *c.steps(10, 30))
    return [
        c.case("abl_regnet16_nchw", "ablation", "SWAG RegNetY-16GF, batch 128, bf16, channels first", regnet, 70, 300),
        c.case("abl_regnet16_cl", "ablation", "SWAG RegNetY-16GF, batch 128, bf16, channels last",
               (*regnet, "--channels_last", "true"), 70, 300),
        c.case("abl_mae_b16_fp32", "ablation", "MAE ViT-B/16, fp32 (TF32 matmuls), eager",
               (*MAE_B16[:-1], "32-true", *c.batch(MAE_BATCH), *c.steps(10, 30)), 70, 300),
        c.case("abl_regnet16_cl_compile", "ablation", "SWAG RegNetY-16GF, batch 128, bf16, channels last, compile",
               (*regnet, "--channels_last", "true", "--compile", "true"), 200, 420),
    ]


def make_cases(run_root: Path | str = "runs/gpu_suite", shards: str | None = None, smoke: bool = False) -> list[Case]:
    """Every case of every part, in running order. ``smoke``: 1 warm-up and 2 timed steps, one run of each loop,
    batches of 8 and a tiny world, to check the plumbing on a GPU quickly (the figures mean nothing)."""
    c = _Cases(Path(run_root), smoke)
    spec = shards or world_spec(c.run_root, smoke)
    return [*_mae_cases(c), *_loader_cases(c, spec), *_zero_cases(c), *_plm_cases(c), *_ablation_cases(c)]


# ---- running -----------------------------------------------------------------------------------------------------

def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def missing_modules(parts: Sequence[str]) -> list[str]:
    names = [*REQUIRED, *(m for part in parts for m in REQUIRED_BY_PART.get(part, ()))]
    return [name for name in names if importlib.util.find_spec(name) is None]


def _build_one(seed: int, size: int, samples: int, per_shard: int, root: str) -> str:
    from datamodules.synthetic import SyntheticWorldConfig, ensure_synthetic_world

    cfg = SyntheticWorldConfig(seed=seed, image_size=size, train_samples=samples, val_samples=1,
                               samples_per_shard=per_shard)
    return ensure_synthetic_world(cfg, root).train_shards


def build_world(run_root: Path, smoke: bool = False) -> str:
    """The loader part's shards: several synthetic worlds (different seeds) built at once, one process per core,
    cached under the run root. Returns their glob."""
    parts, size, samples, per_shard = _world_settings(smoke)
    root = _world_root(run_root, smoke)
    # spawn, not fork: this process has asked the CUDA driver whether there is a GPU
    with ProcessPoolExecutor(min(parts, os.cpu_count() or 1), mp_context=get_context("spawn")) as pool:
        list(pool.map(_build_one, range(parts), [size] * parts, [samples] * parts, [per_shard] * parts,
                      [str(root)] * parts))
    return world_spec(run_root, smoke)


def _tail(text: str, lines: int = 15) -> str:
    kept = [line[:300] for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def run_case(case: Case, timeout_s: float, run_dir: Path) -> dict:
    """Run one case in its own process group, time-boxed; the record of what happened (and its report)."""
    shutil.rmtree(run_dir, ignore_errors=True)  # no stale benchmark.json may pass for this run's
    run_dir.mkdir(parents=True)
    log = run_dir / "log.txt"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    record = _record(case)
    start = time.monotonic()
    with open(log, "w") as out:
        # A process group of its own, so that a timeout also ends its loader workers and W&B's service process; not
        # a session of its own, so that whatever ends the suite's session (a device command's limit) ends it too.
        proc = subprocess.Popen(case.command(), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                process_group=0)
        try:
            returncode = proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _end_group(proc)
            returncode = proc.returncode
        except BaseException:  # Ctrl-C or SIGTERM reach only the suite's own process group
            _end_group(proc)
            raise
    record["seconds"] = round(time.monotonic() - start, 1)
    text = log.read_text(errors="replace")
    report_path = run_dir / "benchmark.json"
    if timed_out:
        record.update(status="timeout", error=f"stopped after {timeout_s:.0f} s\n{_tail(text)}")
    elif returncode == 0 and report_path.exists():
        record.update(status="ok", report=json.loads(report_path.read_text()))
    else:
        oom = "out of memory" in text.lower() or "OutOfMemoryError" in text or returncode == -signal.SIGKILL
        why = f"exit {returncode}" + (" (killed: host memory?)" if returncode == -signal.SIGKILL else "")
        record.update(status="oom" if oom else "failed", error=f"{why}\n{_tail(text)}")
    return record


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the case's process group, 15 s to exit, then SIGKILL to whatever of the group is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return  # the whole group is gone
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass


def _record(case: Case) -> dict:
    return {"name": case.name, "part": case.part, "kind": case.kind, "what": case.what, "command": case.shown(),
            "estimate_s": case.estimate_s, "started": now()}


def skipped(case: Case, reason: str) -> dict:
    return {**_record(case), "seconds": 0, "status": "skipped", "error": reason}


# ---- the results store -------------------------------------------------------------------------------------------

def load_store(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"invocations": [], "cases": {}}


def save_store(store: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(store, indent=1) + "\n")
    tmp.replace(path)


# ---- the performance targets ------------------------------------------------------------------------------------

@dataclass
class Check:
    target: str
    figure: str
    holds: bool | None
    """None: not measured yet."""


def _ok(records: dict, name: str) -> dict | None:
    record = records.get(name)
    return record["report"] if record and record.get("status") == "ok" and record.get("report") else None


def _lightning(records: dict, name: str, key: str) -> float | None:
    report = _ok(records, name)
    return report["lightning"][key] if report and report.get("lightning") else None


def check_mfu(records: dict) -> Check:
    target = f"MAE ViT-B/16, 224 px, mask 0.75: MFU >= {MIN_MFU:.0%} of the measured bf16 peak"
    mfu = {name: _lightning(records, name, "mfu") for name in ("mae_b16_eager", "mae_b16_compile")}
    mfu = {name: value for name, value in mfu.items() if value is not None}
    if not mfu:
        return Check(target, "not measured (--part mae)", None)
    figure = ", ".join(f"{name} {100 * value:.1f}%" for name, value in mfu.items())
    return Check(target, figure, max(mfu.values()) >= MIN_MFU)


def check_lightning_overhead(records: dict) -> Check:
    target = f"Lightning within {1 - MIN_LIGHTNING_OVER_PLAIN:.0%} of the plain loop (images/s)"
    ratios = {}
    for name in ("mae_b16_eager", "mae_b16_compile"):
        report = _ok(records, name)
        if report and report.get("ratio_lightning_over_plain"):
            ratios[name] = report["ratio_lightning_over_plain"]["images_per_sec"], _ratio(report)
    if not ratios:
        return Check(target, "not measured (--part mae)", None)
    figure = ", ".join(f"{name} {shown}" for name, (_, shown) in ratios.items())
    return Check(target, f"Lightning / plain: {figure}", all(v >= MIN_LIGHTNING_OVER_PLAIN for v, _ in ratios.values()))


def check_loader(records: dict) -> Check:
    target = (f"the loader keeps up: MAE ViT-B/16 from shards >= {MIN_SHARDS_OVER_SYNTHETIC:.0%} of its images/s "
              "on synthetic batches (host or device decode)")
    reference = None  # the same run on synthetic batches: this part's own, else the mae part's
    for name in ("mae_b16_eager", "loader_mae_synthetic"):
        value = _lightning(records, name, "images_per_sec")
        reference = (name, value) if value is not None else reference
    shards = {decode: _lightning(records, f"loader_mae_shards_{decode}", "images_per_sec")
              for decode in ("host", "device")}
    shards = {decode: value for decode, value in shards.items() if value is not None}
    if reference is None or not shards:
        return Check(target, "not measured (--part loader)", None)
    name, synthetic = reference
    ratios = {decode: value / synthetic for decode, value in shards.items()}
    figure = ", ".join(f"{decode} decode {shards[decode]:.0f} img/s = {ratio:.2f}x" for decode, ratio in ratios.items())
    return Check(target, f"{figure} of {synthetic:.0f} img/s synthetic ({name})",
                 any(r >= MIN_SHARDS_OVER_SYNTHETIC for r in ratios.values()))


def check_zero2(records: dict) -> Check:
    target = f"ZeRO-2 >= {MIN_ZERO2_OVER_DDP}x DDP (MAE ViT-B/16, images/s)"
    ddp = _lightning(records, "zero_ddp_b16", "images_per_sec")
    zero2 = _lightning(records, "zero_ds2_b16", "images_per_sec")
    if ddp is None or zero2 is None:
        return Check(target, "not measured (--part zero)", None)
    return Check(target, f"{zero2:.0f} / {ddp:.0f} img/s = {zero2 / ddp:.3f}x", zero2 / ddp >= MIN_ZERO2_OVER_DDP)


def check_largest(records: dict) -> Check:
    target = "the largest MAE encoder that trains on one GPU with ZeRO-3 (+ offload)"
    larger = []  # what happened to the models larger than the one that fits
    for short, model, *_ in BIG_MAE:  # largest first
        names = (f"zero3_{short}", f"zero3off_{short}")
        for name in names:
            report = _ok(records, name)
            if report:
                run, how = report["lightning"], report["how_measured"]
                figure = (f"{model} ({how.get('strategy')}, batch {how['batch_per_step']}): "
                          f"{run['images_per_sec']:.1f} img/s, peak {run['peak_memory_bytes'] / 1e9:.1f} GB")
                return Check(target, figure + (f"; larger: {'; '.join(larger)}" if larger else ""), True)
        tried = [f"{name} {records[name]['status']}" for name in names
                 if records.get(name, {}).get("status") not in (None, "skipped")]
        larger.append(f"{model} {', '.join(tried) if tried else 'not run'}")
    if all(note.endswith("not run") for note in larger):
        return Check(target, "not measured (--part zero)", None)
    # holds False only once every model was tried; until then the answer is open
    return Check(target, "none fits: " + "; ".join(larger),
                 None if any(note.endswith("not run") for note in larger) else False)


CHECKS: tuple[Callable[[dict], Check], ...] = (check_mfu, check_lightning_overhead, check_loader, check_zero2,
                                                check_largest)


def check_targets(records: dict) -> list[Check]:
    return [check(records) for check in CHECKS]


# ---- Markdown ----------------------------------------------------------------------------------------------------

def _fmt(value: float | None, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    return "" if value is None else f"{value / scale:,.{digits}f}{unit}"


def _holds(value: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "not measured"}[value]


def _ratio(report: dict) -> str:
    """Lightning / plain images/s: the median over repeats, with its min-max when there were several."""
    ratio = report.get("ratio_lightning_over_plain") or {}
    if ratio.get("images_per_sec") is None:
        return ""
    spread = (f" ({ratio['images_per_sec_min']:.3f}-{ratio['images_per_sec_max']:.3f})"
              if ratio.get("repeats", 1) > 1 else "")
    return f"{ratio['images_per_sec']:.3f}{spread}"


def _training_rows(records: dict) -> list[str]:
    lines = ["| case | what | status | Lightning img/s | step ms median (min-max) | MFU | TFLOP/s | peak GB "
             "| plain img/s | plain MFU | Lightning / plain | train GFLOP/img | measured peak TFLOP/s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in (r for r in records.values() if r["kind"] == "training"):
        report = r.get("report") or {}
        run, plain = report.get("lightning") or {}, report.get("plain") or {}
        steps = (f"{run['step_ms_median']:.2f} ({run['step_ms_min']:.2f}-{run['step_ms_max']:.2f})"
                 if run.get("step_ms_median") is not None else "")
        lines.append(
            f"| {r['name']} | {r['what']} | {r['status']} | {_fmt(run.get('images_per_sec'))} | {steps} | "
            f"{_fmt(run.get('mfu'), 0.01, unit='%')} | {_fmt(run.get('achieved_flops_per_sec'), 1e12)} | "
            f"{_fmt(run.get('peak_memory_bytes'), 1e9)} | {_fmt(plain.get('images_per_sec'))} | "
            f"{_fmt(plain.get('mfu'), 0.01, unit='%')} | {_ratio(report)} | "
            f"{_fmt((report.get('flops') or {}).get('train_flops_per_image'), 1e9, digits=2)} | "
            f"{_fmt((report.get('peak') or {}).get('flops_per_sec'), 1e12)} |")
    return lines


def _token_rows(records: dict) -> list[str]:
    """The training cases that count tokens (--trainer plm): real tokens per second of each loop."""
    rows = [(r, r["report"]) for r in records.values() if (r.get("report") or {}).get("tokens_per_step")]
    if not rows:
        return []
    lines = ["", "### Tokens (--trainer plm: real tokens, visual ones included)", "",
             "| case | tokens per step | Lightning tokens/s | plain tokens/s | training MFLOP/token |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['name']} | {report['tokens_per_step']:,} | "
              f"{_fmt((report.get('lightning') or {}).get('tokens_per_sec'))} | "
              f"{_fmt((report.get('plain') or {}).get('tokens_per_sec'))} | "
              f"{_fmt(report['flops'].get('train_flops_per_token'), 1e6)} |" for r, report in rows]
    return lines


def _loader_rows(records: dict) -> list[str]:
    loaders = [r for r in records.values() if r["kind"] == "loader"]
    if not loaders:
        return []
    lines = ["", "### Loader against raw decode (--trainer none, MAE training transform, 224 px, batch 256)", "",
             "| case | status | workers | datamodule img/s | raw decode img/s | datamodule / raw |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in loaders:
        for row in (r.get("report") or {}).get("loader") or [{}]:
            lines.append(f"| {r['name']} | {r['status']} | {row.get('workers', '')} | "
                         f"{_fmt(row.get('datamodule_images_per_sec'), digits=0)} | "
                         f"{_fmt(row.get('raw_decode_images_per_sec'), digits=0)} | "
                         f"{_fmt(row.get('ratio'), digits=3)} |")
    return lines


def _command_rows(records: dict) -> list[str]:
    lines = ["", "### Commands", ""]
    lines += [f"- `{r['name']}`: {r['status']}, {r['seconds']:.0f} s (estimate {r['estimate_s']} s), "
              f"{r['started']}: `{r['command']}`" for r in records.values()]
    failures = [r for r in records.values() if r["status"] != "ok"]
    if failures:
        lines += ["", "### Not finished", ""]
        for r in failures:
            lines += [f"{r['name']} ({r['status']}):", "", *("    " + line for line in r["error"].splitlines()), ""]
    return lines


def render_section(store: dict) -> str:
    """The Markdown section (markers included) for every case recorded so far."""
    records: dict = store["cases"]
    reports = [r["report"] for r in records.values() if r.get("report")]
    devices = sorted({r["how_measured"]["device"] for r in reports}) or ["(no finished case yet)"]
    hows = [r["how_measured"] for r in reports]
    versions = sorted({f"torch {h['torch']}, lightning {h['lightning']}, {h['cpu_cores']} CPU cores" for h in hows})
    dates = sorted({r.get("started", "")[:10] for r in records.values() if r.get("started")})
    lines = [BEGIN, "## GPU suite", "",
             f"GPU: {', '.join(devices)}; {'; '.join(versions) or 'versions: n/a'}; "
             f"dates: {', '.join(dates) or 'n/a'}. "
             "Written by `python -m benchmarks.gpu_suite`; every case is one `python -m recipes.benchmark` command "
             "(listed below). MFU = achieved / the bf16 matmul peak measured in the same run; images/s over the "
             "timed steps of every run of a loop; Lightning / plain = the median over repeats of the ratio within "
             "a repeat (min-max); peak memory = torch.cuda.max_memory_allocated.", "",
             "Suite invocations:", ""]
    lines += [f"- `{inv['command']}` ({inv['started']})" for inv in store["invocations"]] or ["- none"]
    lines += ["", "### Targets", "", "| target | figure | holds |", "| --- | --- | --- |"]
    lines += [f"| {c.target} | {c.figure} | {_holds(c.holds)} |" for c in check_targets(records)]
    lines += ["", "### Training steps", "", *_training_rows(records), *_token_rows(records), *_loader_rows(records),
              *_command_rows(records), END]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace the marked section of ``path`` (markers included) with ``section``, keeping the rest of the file; append
    it when the file has no such section (or does not exist)."""
    text = path.read_text() if path.exists() else ""
    begin, end = text.find(BEGIN), text.find(END)
    if begin >= 0 and end > begin:
        text = text[:begin] + section + text[end + len(END):]
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + ("\n" if text else "") + section + "\n"
    path.write_text(text)


# ---- the command line --------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="all", help="all, or a comma list of: " + ", ".join(PARTS))
    parser.add_argument("--cases", default=None, help="Only these cases (comma list; --dry-run lists the names).")
    parser.add_argument("--out", default="BENCHMARKS.md", help="Markdown file whose marked section is (re)written.")
    parser.add_argument("--shards", default=None, help="JPEG shards for the loader part (default: synthetic worlds).")
    parser.add_argument("--run-root", default="runs/gpu_suite", help="Run directories and results.json go here.")
    parser.add_argument("--part-budget", type=float, default=PART_BUDGET_S,
                        help="Seconds per part; a case whose estimate would pass it is skipped (0: no budget).")
    parser.add_argument("--dry-run", action="store_true", help="Print the cases and their commands; write nothing.")
    parser.add_argument("--smoke", action="store_true",
                        help="1 warm-up + 2 timed steps, batches of 8, a tiny world: checks the plumbing only.")
    args = parser.parse_args(argv)
    parts = PARTS if args.part == "all" else tuple(p.strip() for p in args.part.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        parser.error(f"--part {args.part!r}: unknown part(s) {unknown}; choose all or a comma list of "
                     f"{', '.join(PARTS)}")
    args.parts = parts
    return args


def select(cases: list[Case], parts: Sequence[str], names: str | None) -> list[Case]:
    chosen = [c for c in cases if c.part in parts]
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {c.name for c in chosen})
        if unknown:
            raise SystemExit(f"--cases: {unknown} are not cases of --part {','.join(parts)}; these are: "
                             f"{', '.join(c.name for c in chosen)}")
        chosen = [c for c in chosen if c.name in wanted]
    return chosen


def dry_run(cases: list[Case], parts: Sequence[str], shards: str | None, budget: float) -> str:
    lines = []
    for part in parts:
        mine = [c for c in cases if c.part == part]
        if not mine:
            continue
        always = sum(c.estimate_s for c in mine if not c.only_if_failed)
        lines.append(f"== part {part}: about {always / 60:.1f} min on an H200 (estimate; budget {budget:.0f} s)")
        if part == "loader" and not shards and any("--shards" in c.args for c in mine):
            lines.append(f"   first: build {WORLD_PARTS} synthetic worlds of {WORLD_SAMPLES} images at "
                         f"{WORLD_IMAGE_SIZE} px in parallel (about 30 s; cached)")
        for c in mine:
            when = f", only if {c.only_if_failed} does not finish" if c.only_if_failed else ""
            lines.append(f"-- {c.name} ({c.what}): ~{c.estimate_s} s, timeout {c.timeout_s} s{when}\n   {c.shown()}")
    return "\n".join(lines)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(f"benchmarks.gpu_suite: stopped by signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run_root = Path(args.run_root)  # as the cases' commands name it: they run in the repository root
    cases = select(make_cases(run_root, args.shards, args.smoke), args.parts, args.cases)
    if args.dry_run:
        print(dry_run(cases, args.parts, args.shards, args.part_budget))
        return 0

    import torch  # only now: --dry-run and --help work anywhere; the CUDA context stays with the cases

    if not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks.gpu_suite measures on a CUDA GPU and none is visible here (torch.cuda.is_available() is "
            "False). Run it on a GPU machine from the repository root, one part per command, e.g. `python -m "
            "benchmarks.gpu_suite --part mae` (then loader, zero, ablation); `--dry-run` lists every case and its "
            "command on any machine, and `python -m recipes.benchmark` runs a single case on the CPU.")
    missing = missing_modules(args.parts)
    if missing:
        raise SystemExit(f"benchmarks.gpu_suite: these Python modules are missing here: {', '.join(missing)}. "
                         "Install them (pip install jsonargparse[signatures] webdataset braceexpand wandb deepspeed), "
                         "or on a machine without a registry carry them as wheels and put them on PYTHONPATH.")

    root = ROOT / run_root  # where the cases' commands put their run directories (an absolute path stays)
    store_path, out = root / "results.json", Path(args.out)
    store = load_store(store_path)
    store["invocations"].append({"command": shlex.join(["python", "-m", "benchmarks.gpu_suite",
                                                        *(sys.argv[1:] if argv is None else argv)]),
                                 "started": now()})
    for part in args.parts:
        mine = [c for c in cases if c.part == part]
        start = time.monotonic()
        if part == "loader" and not args.shards and any("--shards" in c.args for c in mine):
            print(f"[gpu_suite] building the synthetic worlds for the loader part under {root / 'world'}", flush=True)
            build_world(root, args.smoke)
        for case in mine:
            elapsed = time.monotonic() - start
            left = args.part_budget - elapsed if args.part_budget else float("inf")
            retry_of = store["cases"].get(case.only_if_failed) if case.only_if_failed and not args.cases else None
            if retry_of is not None and retry_of["status"] == "ok":
                continue  # the model fits without offload: no retry needed
            if case.only_if_failed and not args.cases and (retry_of is None or retry_of["status"] == "skipped"):
                record = skipped(case, f"{case.only_if_failed} did not run")
            elif case.estimate_s > left:
                record = skipped(case, f"its estimate ({case.estimate_s} s) is past what is left of the part's "
                                       f"budget ({max(left, 0):.0f} s): run it with --part {part} --cases {case.name}")
            else:
                print(f"[gpu_suite] {case.name}: {case.shown()}", flush=True)
                record = run_case(case, min(case.timeout_s, left), root / case.name)
            store["cases"][case.name] = record
            print(f"[gpu_suite] {case.name}: {record['status']} in {record['seconds']:.0f} s"
                  + (f"\n{record['error']}" if record.get("error") else ""), flush=True)
            save_store(store, store_path)
            write_section(out, render_section(store))
    for check in check_targets(store["cases"]):
        print(f"[gpu_suite] {_holds(check.holds):>12}  {check.target}: {check.figure}")
    print(f"[gpu_suite] written: {out} (section between the gpu_suite markers) and {store_path}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # a running case's process group is ended on the way out
    sys.exit(main())
