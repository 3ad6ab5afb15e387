"""Top-1 error under every corruption and severity: the ImageNet-C / ImageNet-C-bar protocol.

Each image gets its own draw of the corruption's parameters, as the published sets were generated (one
random draw per image, hendrycks/robustness make_imagenet_c.py; augmentation-corruption make_imagenet_c_bar.py),
from a generator seeded by (seed, corruption, severity): a result does not depend on which other
corruptions ran. The metric is the plain top-1 error averaged over severities and corruptions, which is what
ImageNet-C-bar reports (facebookresearch/augmentation-corruption imagenet_c_bar/test_c_bar.py:test_c_bar);
AlexNet-normalised mCE is not computed.
The published sets were also saved as JPEG (quality 85 for C-bar); corrupting in memory, as here, differs
slightly from evaluating on those files (augmentation-corruption README).
"""

from __future__ import annotations

import json
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from multiprocessing import get_context
from multiprocessing.pool import Pool
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from evaluation.corruptions import SEVERITIES, get_corruption

Classifier = Callable[[np.ndarray], Tensor]
"""uint8 images (B, H, W, 3) -> logits (B, C); the caller owns normalisation and the device."""


@dataclass
class RobustnessResult:
    clean_error: float
    """Top-1 error (percent) on the uncorrupted images."""
    errors: dict[str, dict[int, float]] = field(default_factory=dict)
    """corruption -> severity -> top-1 error (percent)."""
    families: dict[str, str] = field(default_factory=dict)
    """corruption -> "imagenet_c" or "imagenet_c_bar"."""
    num_images: int = 0

    def per_corruption(self) -> dict[str, float]:
        return {name: float(np.mean(list(by_sev.values()))) for name, by_sev in self.errors.items()}

    def per_severity(self, family: str | None = None) -> dict[int, float]:
        chosen = [e for n, e in self.errors.items() if family is None or self.families[n] == family]
        severities = sorted({s for e in chosen for s in e})
        return {s: float(np.mean([e[s] for e in chosen if s in e])) for s in severities}

    def overall(self, family: str | None = None) -> float:
        """Mean error over corruptions (each the mean over its severities) of one family, or of all."""
        chosen = [v for n, v in self.per_corruption().items() if family is None or self.families[n] == family]
        return float(np.mean(chosen)) if chosen else float("nan")

    def table(self) -> str:
        """Markdown: a row per corruption (error per severity and mean), then per-family means."""
        severities = sorted({s for e in self.errors.values() for s in e})
        head = "| corruption | family | " + " | ".join(f"s{s}" for s in severities) + " | mean |"
        rows = [head, "|---|---|" + "---:|" * (len(severities) + 1)]
        means = self.per_corruption()
        for name, by_sev in self.errors.items():
            cells = " | ".join(f"{by_sev[s]:.1f}" if s in by_sev else "-" for s in severities)
            rows.append(f"| {name} | {self.families[name]} | {cells} | {means[name]:.1f} |")
        for family in dict.fromkeys(self.families.values()):
            per_sev = self.per_severity(family)
            cells = " | ".join(f"{per_sev[s]:.1f}" if s in per_sev else "-" for s in severities)
            label = {"imagenet_c": "**ImageNet-C mean**", "imagenet_c_bar": "**ImageNet-C-bar mean**"}[family]
            rows.append(f"| {label} | | {cells} | **{self.overall(family):.1f}** |")
        rows.append("| clean | | " + " | ".join("" for _ in severities) + f" | {self.clean_error:.1f} |")
        return "\n".join(rows)

    def to_json(self) -> str:
        summary = {"per_corruption": self.per_corruption(), "overall": self.overall(),
                   **{f"overall_{f}": self.overall(f) for f in dict.fromkeys(self.families.values())}}
        return json.dumps({**asdict(self), **summary}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "RobustnessResult":
        raw = json.loads(text)
        errors = {n: {int(s): v for s, v in e.items()} for n, e in raw["errors"].items()}
        return cls(raw["clean_error"], errors, raw["families"], raw["num_images"])


def corruption_rng(seed: int, name: str, severity: int) -> np.random.Generator:
    """The generator of one (corruption, severity) sweep; crc32 keeps it stable across Python processes."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), severity])


def corrupt_images(images: np.ndarray, name: str, params: Sequence[Mapping]) -> np.ndarray:
    """Each image of (N, H, W, 3) uint8 under ``name`` with its own parameters ``params[i]``."""
    corruption = get_corruption(name)
    return np.stack([corruption.apply(image, p) for image, p in zip(images, params, strict=True)])


def _corrupted_batches(images: np.ndarray, name: str, params: list, batch_size: int, pool: Pool | None,
                       ahead: int) -> Iterator[np.ndarray]:
    """Corrupted batches in order; with a pool, up to ``ahead`` batches are prepared ahead of the model, which
    bounds memory to a few batches whatever the speed of either side."""
    jobs = ((images[i:i + batch_size], name, params[i:i + batch_size]) for i in range(0, len(images), batch_size))
    if pool is None:
        yield from (corrupt_images(*job) for job in jobs)
        return
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.apply_async(corrupt_images, job))
        if len(pending) > ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def top1_errors(classify: Classifier, images: np.ndarray, labels: np.ndarray, batch_size: int) -> int:
    wrong = 0
    for i in range(0, len(images), batch_size):
        logits = classify(images[i:i + batch_size])
        wrong += int((logits.argmax(1).cpu() != torch.as_tensor(labels[i:i + batch_size])).sum())
    return wrong


def evaluate_robustness(classify: Classifier, images: np.ndarray, labels: np.ndarray, corruptions: Sequence[str],
                        severities: Sequence[int] = SEVERITIES, *, seed: int = 0, batch_size: int = 64,
                        workers: int = 0, progress: bool = True) -> RobustnessResult:
    """Top-1 error (percent) of ``classify`` on ``images`` (uint8 (N, H, W, 3)) clean and under every
    corruption x severity.

    The parameters are drawn in this process, in image order, so the result does not depend on ``workers``:
    the number of processes that apply the corruptions while the model runs (0: this process, in turn).
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"evaluate_robustness: {len(images)} images and {len(labels)} labels; need the same, > 0")
    if (labels < 0).any():
        raise ValueError("evaluate_robustness: some images have no label (-1); the shards need a 'cls' field")
    corruption_list = [get_corruption(n) for n in corruptions]  # unknown names fail before any work
    n = len(images)
    result = RobustnessResult(100.0 * top1_errors(classify, images, labels, batch_size) / n, num_images=n)
    sweeps = [(c, s) for c in corruption_list for s in severities]
    # forkserver: workers must not inherit the parent's threads (torch, a CUDA context)
    with (get_context("forkserver").Pool(workers) if workers > 0 else nullcontext()) as pool:
        for corruption, severity in tqdm(sweeps, desc="corruptions x severities", disable=not progress):
            rng = corruption_rng(seed, corruption.name, severity)
            params = [corruption.sample_parameters(severity, rng) for _ in range(n)]
            wrong = 0
            for i, batch in zip(range(0, n, batch_size),
                                _corrupted_batches(images, corruption.name, params, batch_size, pool, 2 * workers)):
                wrong += top1_errors(classify, batch, labels[i:i + batch_size], batch_size)
            result.errors.setdefault(corruption.name, {})[severity] = 100.0 * wrong / n
            result.families[corruption.name] = corruption.family
    return result
