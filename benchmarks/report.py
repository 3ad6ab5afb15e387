"""The training benchmark's report: each run's figures, the figures of each loop over all its runs, the
Lightning / plain ratio of each repeat and their median and spread, as a dict for JSON and as a text table."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from benchmarks.measure import format_how, step_stats

LOOPS = ("lightning", "plain")


@dataclass(frozen=True)
class Run:
    """One timed run of one loop: which loop, in which repeat, its step milliseconds (warm-up included) and its
    peak memory in bytes."""

    loop: str
    repeat: int
    step_ms: Sequence[float]
    peak_memory_bytes: int | None


def flop_count(model: nn.Module) -> dict:
    """FLOPs per image: the model's own count (``complexity()``, forward; training is 3x the forward, the PaLM /
    Megatron MFU convention). None for a model without a count, whose MFU is then not reported."""
    count = model.complexity() if callable(getattr(model, "complexity", None)) else None
    return {"model_forward_flops_per_image": count.flops if count else None,
            "train_flops_per_image": count.train_flops if count else None,
            "source": f"{type(model).__name__}.complexity()" if count else f"{type(model).__name__} has no count"}


def _with_rates(figures: dict, train_flops: float | None, peak_flops: float, peak_memory: int | None) -> dict:
    achieved = figures["images_per_sec"] * train_flops if train_flops else None
    return {**figures, "achieved_flops_per_sec": achieved, "mfu": achieved / peak_flops if achieved else None,
            "peak_memory_bytes": peak_memory}


def run_figures(step_ms: Sequence[float], warmup_steps: int, batch_size: int, train_flops: float | None,
                peak_flops: float, peak_memory: int | None) -> dict:
    """One run's figures: timing, achieved FLOP/s (images/s x training FLOPs per image), MFU, peak memory."""
    return _with_rates(step_stats(step_ms, warmup_steps, batch_size), train_flops, peak_flops, peak_memory)


def pooled_figures(runs: Sequence[dict], batch_size: int, train_flops: float | None, peak_flops: float) -> dict:
    """The figures of one loop over all its runs: images/s over every timed step of every run, the median / min /
    max step, the highest peak memory."""
    steps = [ms for run in runs for ms in run["step_ms"]]
    memory = [run["peak_memory_bytes"] for run in runs if run["peak_memory_bytes"] is not None]
    return {**_with_rates(step_stats(steps, 0, batch_size), train_flops, peak_flops, max(memory, default=None)),
            "runs": len(runs)}


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def benchmark_report(how: dict, flops: dict, peak: dict, warmup_steps: int, batch_size: int,
                     runs: Sequence[Run]) -> dict:
    """Every figure of every run, in running order. ``lightning`` and ``plain`` pool each loop's runs (``plain``
    is None when the plain loop did not run). ``ratio_lightning_over_plain`` (None without plain runs) is the
    median over repeats of each repeat's Lightning / plain ratio, with its min and max: images/s, and the median
    step time."""
    train, peak_flops = flops["train_flops_per_image"], peak["flops_per_sec"]
    repeats: dict[int, dict] = {}
    for run in runs:
        entry = repeats.setdefault(run.repeat, {"repeat": run.repeat, "order": []})
        entry["order"].append(run.loop)
        entry[run.loop] = run_figures(run.step_ms, warmup_steps, batch_size, train, peak_flops, run.peak_memory_bytes)
    pooled = {}
    for loop in LOOPS:
        mine = [entry[loop] for entry in repeats.values() if loop in entry]
        pooled[loop] = pooled_figures(mine, batch_size, train, peak_flops) if mine else None
    pairs = [entry for entry in repeats.values() if all(loop in entry for loop in LOOPS)]
    for entry in pairs:
        entry["ratio"] = {key: entry["lightning"][key] / entry["plain"][key]
                          for key in ("images_per_sec", "step_ms_median")}
    ratio = None
    if pairs:
        ratio = {"repeats": len(pairs)}
        for key in ("images_per_sec", "step_ms_median"):
            spread = _spread([entry["ratio"][key] for entry in pairs])
            ratio.update({key: spread["median"], f"{key}_min": spread["min"], f"{key}_max": spread["max"]})
    return {"how_measured": how, "flops": flops, "peak": peak, **pooled, "repeats": list(repeats.values()),
            "ratio_lightning_over_plain": ratio}


def _num(value: float | None, unit: str = "", scale: float = 1.0, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value / scale:.{digits}g}{unit}"


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                      for i, (cell, w) in enumerate(zip(row, widths))) for row in rows)


def _loop_rows(report: dict) -> list[tuple[str, ...]]:
    rows = [("", "images/s", "median ms", "min ms", "max ms", "TFLOP/s", "MFU", "peak mem")]
    for name, key in (("Lightning", "lightning"), ("plain PyTorch", "plain")):
        r = report[key]
        if r is None:
            rows.append((name, "not run", "", "", "", "", "", ""))
            continue
        rows.append((name, _num(r["images_per_sec"]), _num(r["step_ms_median"]), _num(r["step_ms_min"]),
                     _num(r["step_ms_max"]), _num(r["achieved_flops_per_sec"], scale=1e12),
                     _num(r["mfu"] and 100 * r["mfu"], "%", digits=3), _num(r["peak_memory_bytes"], " GB", 1e9)))
    ratio = report["ratio_lightning_over_plain"]
    if ratio is not None:
        def cell(key: str) -> str:
            return f"{ratio[key]:.3f} ({ratio[f'{key}_min']:.3f}-{ratio[f'{key}_max']:.3f})"
        rows.append(("Lightning / plain", cell("images_per_sec"), cell("step_ms_median"), "", "", "", "", ""))
    return rows


def _repeat_lines(report: dict) -> list[str]:
    lines = ["runs in order (images/s):"]
    for entry in report["repeats"]:
        figures = ", ".join(f"{loop} {entry[loop]['images_per_sec']:.4g}" for loop in entry["order"])
        ratio = f"; Lightning / plain {entry['ratio']['images_per_sec']:.3f}" if "ratio" in entry else ""
        lines.append(f"  repeat {entry['repeat'] + 1}: {figures}{ratio}")
    return lines


def format_report(report: dict) -> str:
    """The report as plain text: how measured, the table (Lightning, plain loop, their ratio), each repeat, FLOPs
    and peak."""
    f, p, ratio = report["flops"], report["peak"], report["ratio_lightning_over_plain"]
    lines = [format_how(report["how_measured"]), "", _table(_loop_rows(report))]
    if ratio is not None:
        lines.append(f"Lightning / plain: median over {ratio['repeats']} repeats of the ratio within each repeat "
                     "(min-max); the loops alternate which runs first, and each loop's row pools its runs")
    lines += ["", *_repeat_lines(report), "",
              f"FLOPs per image, forward: {_num(f['model_forward_flops_per_image'], ' GF', 1e9)} ({f['source']}); "
              f"training: {_num(f['train_flops_per_image'], ' GF', 1e9)} "
              f"({f.get('train_source', '3 x forward')})",
              f"peak: measured {_num(p['flops_per_sec'], ' TFLOP/s', 1e12)} ({p['dtype']} {p['size']}^3 matmul x "
              f"{p['repetitions']}, {p['seconds']:.2f} s); spec bf16 "
              + (_num(p["spec_bf16_flops_per_sec"], " TFLOP/s", 1e12) if p.get("spec_bf16_flops_per_sec")
                 else "unknown"),
              "MFU = achieved / measured peak"]
    if ratio is None:
        lines.append("plain PyTorch loop not run (--plain false): no plain figures and no Lightning / plain ratio")
    return "\n".join(lines)
