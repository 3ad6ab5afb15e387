"""Training speed: a method's Lightning run, as users run it, against a plain PyTorch loop over the same model,
data and optimizer, on one device; or the loader against raw JPEG decoding.

    python -m recipes.benchmark                           # MAE tiny on the CPU, both loops 3 times, about a minute
    python -m recipes.benchmark --trainer finetune        # or swag
    python -m recipes.benchmark --model.name mae_vit_base_patch16 --image_size 224 --batch_size 256 --steps 50
    python -m recipes.benchmark --data shards --shards '/data/in1k/train-{000000..001023}.tar'
    python -m recipes.benchmark --trainer none --worker_counts '[0, 2, 4, 8]'    # the loader against raw decode
    python -m recipes.benchmark --model.name mae_vit_2b_patch14 --image_size 224 --strategy deepspeed_stage_3 \\
        --plain false --repeats 1                         # a model too big for two copies: one Lightning run
    python -m recipes.benchmark --trainer swag --model.name regnety_16gf --channels_last true

Every run: the same initial weights, batches and seed; warmup_steps untimed steps, then steps timed ones. Each of
--repeats repeats runs both loops, alternating which goes first; the ratio Lightning / plain is the median over
repeats with its min-max spread. The table is printed and, with every figure and the config, written to
<run_dir>/benchmark.json. The code is in benchmarks/ (training.py, loader.py); the GPU suite
(python -m benchmarks.gpu_suite) runs its cases through this command."""

import json
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch

from benchmarks.config import Config
from benchmarks.loader import loader_report
from benchmarks.training import training_benchmark
from recipes.cli import run_command


def main(cfg: Config, config_yaml: str = "") -> dict:
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    L.seed_everything(cfg.seed, verbose=False)
    report, text = loader_report(cfg, device) if cfg.trainer == "none" else training_benchmark(cfg, run_dir, device)
    report["config"] = asdict(cfg)
    path = run_dir / "benchmark.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{text}\n\nwritten: {path}")
    return report


if __name__ == "__main__":
    run_command(main, Config, __doc__)
