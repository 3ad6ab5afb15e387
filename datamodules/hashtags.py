"""Hashtags as weak labels (SWAG, Singh et al. 2022): the vocabulary, the sample transform, the resampler.

The vocabulary is counted once from the ``.json`` members of the training shards (no image is read or
decoded), kept where a tag is seen on at least ``min_count`` samples, and saved in the run directory, so the
hashtag head keeps its meaning across resumes and stages.

Tags are compared after ``normalize_tag`` (strip, drop a leading ``#``, lower case). SWAG canonicalised its
hashtags further (WordNet synsets, ~27K of them; facebookresearch/SWAG#10, #13); the list is unreleased and
that step is not reproduced here.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import multiprocessing
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torchvision.transforms import v2
from tqdm import tqdm

from . import IMAGENET_MEAN, IMAGENET_STD
from .sharded import DataConfig, ShardedDataModule
from .shards import expand_shards
from .streams import derive_seed, json_members
from .transforms import BICUBIC, eval_pil_transform

log = logging.getLogger(__name__)

VOCABULARY_FILE = "hashtag_vocab.json"


def normalize_tag(tag: str) -> str:
    return tag.strip().lstrip("#").lower()


@dataclass
class HashtagDataConfig(DataConfig):
    """Shards and loader (as every recipe), plus the hashtag vocabulary and the class-balancing resampler."""

    min_count: int = 5
    """Keep the hashtags seen on at least this many training samples. SWAG used ~27K hashtags
    (facebookresearch/SWAG#13): choose min_count (or max_vocab) to get a vocabulary of that size."""
    max_vocab: int | None = None
    """Keep at most this many hashtags (the most frequent); None: no cap."""
    vocab_sample_limit: int | None = None
    """Count hashtags on the first N training samples only (shards in order); None: all of them."""
    vocab_workers: int = 0
    """Processes that count hashtags in parallel (one shard each at a time); 0: in this process."""
    balance_power: float = 0.5
    """Class balancing: keep a training sample with probability proportional to the mean of count^-power over
    its hashtags (0.5: square-root balancing; 0: off). See HashtagResampler."""
    min_crop_scale: float = 0.35
    """Smallest area fraction of the random-resized crop. 0.35 suits the 64 px synthetic world, where a small crop
    loses the object that names the class; the paper configs use torchvision's 0.08 (SWAG's value is unpublished)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_count < 1:
            raise ValueError(f"HashtagDataConfig.min_count must be >= 1, got {self.min_count} (--data.min_count)")
        for name in ("max_vocab", "vocab_sample_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"HashtagDataConfig.{name} must be >= 1 or None, got {getattr(self, name)}")
        if self.vocab_workers < 0:
            raise ValueError(f"HashtagDataConfig.vocab_workers must be >= 0, got {self.vocab_workers}")
        if self.balance_power < 0:
            raise ValueError(f"HashtagDataConfig.balance_power must be >= 0, got {self.balance_power}")
        if not 0 < self.min_crop_scale <= 1:
            raise ValueError(f"HashtagDataConfig.min_crop_scale must be in (0, 1], got {self.min_crop_scale}")


# ----------------------------------------------------------------------------------------------------
# The vocabulary


@dataclass
class Vocabulary:
    """Hashtags in head order (count descending, then name), with the number of samples that carry each."""

    tags: list[str]
    counts: list[int]
    num_samples: int
    """Samples whose json was read while counting."""
    class_names: list[str | None] | None = None
    """Class index -> name, from the samples' json ("label" + "class_name") or a classes.json beside the
    shards; None when the shards carry no classes."""
    settings: dict = field(default_factory=dict)
    """How it was built (shards, min_count, max_size, sample_limit): a rerun with other settings is told."""

    def __post_init__(self) -> None:
        if len(self.tags) != len(self.counts):
            raise ValueError(f"Vocabulary: {len(self.tags)} tags but {len(self.counts)} counts")
        self.index = {tag: i for i, tag in enumerate(self.tags)}

    def __len__(self) -> int:
        return len(self.tags)

    def save(self, path: str | Path) -> Path:
        """Written under a temporary name and renamed, so a reader never sees half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=0) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"Cannot read the hashtag vocabulary {path}: {err}. Delete it to rebuild it.") from err

    def training_prior(self, balance_power: float = 0.0) -> list[float]:
        """p(h) proportional to count^(1 - balance_power): the hashtag frequencies after class balancing, exact
        when every sample carries one tag (see HashtagResampler), an approximation otherwise."""
        weights = [c ** (1.0 - balance_power) for c in self.counts]
        total = sum(weights)
        return [w / total for w in weights]

    def class_to_hashtags(self, class_names: Sequence[str | None],
                          synonyms: dict[str, list[str]] | None = None) -> list[list[int]]:
        """For each class, the indices of its hashtags that are in the vocabulary.

        A class's hashtags are ``synonyms[name]`` when given, else the name itself, written as a tag
        (lower case; also with spaces, '_' and '-' removed: "golden retriever" -> "goldenretriever").
        """
        out = []
        for name in class_names:
            if name is None:
                out.append([])
                continue
            candidates = (synonyms or {}).get(name) or [name, re.sub(r"[\s_\-]+", "", name)]
            found = dict.fromkeys(self.index[t] for t in map(normalize_tag, candidates) if t in self.index)
            out.append(list(found))
        return out


def zero_shot_class_map(vocabulary: Vocabulary, class_hashtags: str = "names") -> list[list[int]] | None:
    """Class -> vocabulary indices for zero-shot transfer, or None when there are no classes to map.

    ``class_hashtags``: "names" (each class name, from ``vocabulary.class_names``, as a hashtag), or the path of
    a JSON file {class name: [hashtags]}; its order gives the label order when the shards name no classes.
    """
    synonyms = None
    if class_hashtags != "names":
        try:
            synonyms = json.loads(Path(class_hashtags).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"eval.class_hashtags: cannot read {class_hashtags!r} as a JSON file "
                             f"{{class name: [hashtags]}} ({err}); or pass \"names\"") from err
    class_names = vocabulary.class_names or (list(synonyms) if synonyms else None)
    if not class_names:
        return None
    mapping = vocabulary.class_to_hashtags(class_names, synonyms)
    missing = [name for name, tags in zip(class_names, mapping) if not tags]
    if missing:
        log.warning("zero-shot: %d of %d classes have no hashtag in the vocabulary and are never predicted "
                    "(e.g. %s)", len(missing), len(mapping), missing[:5])
    return mapping


def _count_shard(url: str, limit: int | None = None) -> tuple[Counter, int, dict[int, str]]:
    """(tag counts, samples read, class index -> name) of one shard; each tag counts once per sample."""
    counts: Counter = Counter()
    classes: dict[int, str] = {}
    samples = 0
    for name, raw in json_members(url):
        if limit is not None and samples >= limit:
            break
        try:
            meta = json.loads(raw)
        except ValueError as err:
            log.warning("%s: member %s is not valid JSON (%s); skipped", url, name, err)
            continue
        samples += 1
        counts.update({normalize_tag(t) for t in meta.get("hashtags") or ()} - {""})
        if isinstance(meta.get("label"), int) and isinstance(meta.get("class_name"), str):
            classes.setdefault(meta["label"], meta["class_name"])
    return counts, samples, classes


def count_hashtags(shards: Sequence[str], sample_limit: int | None = None,
                   num_workers: int = 0) -> tuple[Counter, int, dict[int, str]]:
    """Tag counts over the shards in order (the first ``sample_limit`` samples when set)."""
    counts: Counter = Counter()
    classes: dict[int, str] = {}
    samples = 0
    window = max(1, num_workers) * 4  # shards in flight; with a sample limit we stop at the window's end
    # fork: the counters start at once, modules imported. They only read tar files and parse JSON, so no lock
    # of another thread is ever taken in them (logging re-creates its locks after a fork).
    pool = (concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("fork"))
            if num_workers > 0 else None)
    try:
        with tqdm(total=len(shards), unit="shard", desc="counting hashtags", mininterval=5) as bar:
            for start in range(0, len(shards), window):
                chunk = shards[start : start + window]
                results = pool.map(_count_shard, chunk) if pool else map(_count_shard, chunk)
                for url, (shard_counts, shard_samples, shard_classes) in zip(chunk, results):
                    left = None if sample_limit is None else sample_limit - samples
                    if left is not None and shard_samples > left:  # the last shard: count its first samples only
                        shard_counts, shard_samples, shard_classes = _count_shard(url, left)
                    counts.update(shard_counts)
                    samples += shard_samples
                    for label, name in shard_classes.items():
                        classes.setdefault(label, name)
                    bar.update()
                    if sample_limit is not None and samples >= sample_limit:
                        return counts, samples, classes
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return counts, samples, classes


def _classes_json(shards: Sequence[str]) -> list[str] | None:
    """A classes.json beside the first shard: a list of names in label order, or {"0": name, ...}."""
    first = shards[0]
    if "://" in first or first.startswith("pipe:"):
        return None
    path = Path(first).parent / "classes.json"
    if not path.is_file():
        return None
    names = json.loads(path.read_text())
    if isinstance(names, dict):
        names = [names.get(str(i)) for i in range(max(map(int, names)) + 1)]
    return names


def build_vocabulary(shard_spec: str, min_count: int, max_size: int | None = None,
                     sample_limit: int | None = None, num_workers: int = 0) -> Vocabulary:
    """Count the hashtags of ``shard_spec`` and keep those with count >= ``min_count``, most frequent first
    (ties by name), at most ``max_size`` of them."""
    shards = expand_shards(shard_spec)
    start = time.perf_counter()
    counts, samples, classes = count_hashtags(shards, sample_limit, num_workers)
    kept = sorted(((t, c) for t, c in counts.items() if c >= min_count), key=lambda tc: (-tc[1], tc[0]))
    kept = kept[:max_size] if max_size is not None else kept
    if not kept:
        raise ValueError(
            f"No hashtag of {shard_spec!r} is seen on {min_count} or more samples ({len(counts)} distinct tags "
            f"in {samples} samples read; the tags are the 'hashtags' list of each sample's .json). Lower "
            "--data.min_count, or check that the shards carry hashtags."
        )
    class_names = _classes_json(shards)
    if class_names is None and classes:
        class_names = [classes.get(i) for i in range(max(classes) + 1)]
    settings = {"shards": shard_spec, "min_count": min_count, "max_size": max_size, "sample_limit": sample_limit}
    log.info("hashtag vocabulary: %d of %d distinct tags seen on >= %d of %d samples (%.1f s)", len(kept),
             len(counts), min_count, samples, time.perf_counter() - start)
    return Vocabulary([t for t, _ in kept], [c for _, c in kept], samples, class_names, settings)


def ensure_vocabulary(path: str | Path, cfg: HashtagDataConfig, is_writer: bool, timeout_s: float = 24 * 3600,
                      poll_s: float = 5.0) -> Vocabulary:
    """The vocabulary of a run directory: read when ``path`` exists (a resumed run keeps its head), else counted
    from ``cfg.train_shards`` and written by the one process with ``is_writer`` (global rank 0) while the
    others wait for the file."""
    path = Path(path)
    settings = {"shards": cfg.train_shards, "min_count": cfg.min_count, "max_size": cfg.max_vocab,
                "sample_limit": cfg.vocab_sample_limit}
    if not path.exists() and is_writer:
        build_vocabulary(cfg.train_shards, cfg.min_count, cfg.max_vocab, cfg.vocab_sample_limit,
                         cfg.vocab_workers).save(path)
    waited = 0.0
    while not path.exists():
        if waited >= timeout_s:
            raise TimeoutError(f"Waited {waited:.0f} s for rank 0 to write the hashtag vocabulary {path}; did it fail?")
        if waited % 300 < poll_s:
            log.info("waiting for rank 0 to write %s", path)
        time.sleep(poll_s)
        waited += poll_s
    vocabulary = Vocabulary.load(path)
    changed = {k: (vocabulary.settings.get(k), v) for k, v in settings.items() if vocabulary.settings.get(k) != v}
    if changed and is_writer:
        log.warning("Keeping the run's hashtag vocabulary %s (the head is sized to it), although it was built with "
                    "other settings: %s (kept, now). Start a new run_dir to use the new ones.", path,
                    ", ".join(f"{k} {old!r}, {new!r}" for k, (old, new) in changed.items()))
    return vocabulary


# ----------------------------------------------------------------------------------------------------
# Samples


class HashtagSampleTransform:
    """Decoded sample -> ``{"image": uint8 (3, H, W), "hashtags": list[str], "label": int (if "cls"), "key"}``.

    Hashtags come from the sample's json (none without one), normalised and de-duplicated in order. A class,
    not a closure, so that it pickles for loader workers.
    """

    def __init__(self, image_transform: Callable):
        self.image_transform = image_transform

    def __call__(self, sample: dict) -> dict:
        meta = sample.get("json") or {}  # labelled shards without json (e.g. ImageNet val) serve the zero-shot metric
        if isinstance(meta, (bytes, str)):
            meta = json.loads(meta)
        tags = list(dict.fromkeys(t for t in map(normalize_tag, meta.get("hashtags") or ()) if t))
        out = {"image": self.image_transform(sample["jpg"]).as_subclass(torch.Tensor), "hashtags": tags}
        if "cls" in sample:
            out["label"] = int(sample["cls"])
        out["key"] = sample["__key__"]
        return out


def wsp_train_transform(size: int, min_crop_scale: float = 0.08) -> HashtagSampleTransform:
    """Random-resized crop (bicubic) + horizontal flip, the usual ImageNet-style augmentation (SWAG's exact
    augmentation is unpublished)."""
    return HashtagSampleTransform(v2.Compose([
        v2.RandomResizedCrop(size, scale=(min_crop_scale, 1.0), interpolation=BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(),
    ]))


class HashtagResampler:
    """Class balancing by rejection: a training sample is kept with probability

        keep(s) = w(s) / w_max,   w(s) = mean over the in-vocabulary hashtags h of s of count(h)^(-power),

    w_max = min_count^(-power) being the largest possible w. A sample that carries only tag h is then seen in
    proportion to count(h) * count(h)^(-power) = count(h)^(1 - power): power 0.5 is square-root frequency
    balancing, power 0 keeps every tagged sample. Samples without an in-vocabulary tag are dropped: they carry
    no training signal. The coin is a hash of (seed, epoch, sample key), so a rerun, and a resumed stream,
    drops exactly the same samples; a sample met twice in an epoch gets the same decision.

    SWAG resampled its 3.6B unique images so that one epoch is ~5B samples (Singh et al. 2022, as quoted by a
    secondary source, not checked against the paper): rare hashtags are up-sampled. The exact rule is
    unpublished. Rejection only drops samples, but on a resampled (infinite) shard stream it gives the same
    sample distribution at the cost of reading more data: ``expected_keep_fraction`` tells roughly how much.
    """

    def __init__(self, vocabulary: Vocabulary, power: float = 0.5, seed: int = 0):
        if power < 0:
            raise ValueError(f"HashtagResampler: power must be >= 0, got {power}")
        self.power = power
        self.seed = seed
        self.counts = dict(zip(vocabulary.tags, vocabulary.counts))
        self.weights = {tag: count ** -power for tag, count in self.counts.items()}
        self.w_max = max(self.weights.values())

    def keep_probability(self, hashtags: Iterable[str]) -> float:
        weights = [self.weights[t] for t in {normalize_tag(t) for t in hashtags} if t in self.weights]
        return sum(weights) / len(weights) / self.w_max if weights else 0.0

    def expected_keep_fraction(self) -> float:
        """The fraction of tagged samples kept if each carried one tag: sum_h count_h keep(h) / sum_h count_h."""
        return sum(c * self.weights[t] / self.w_max for t, c in self.counts.items()) / sum(self.counts.values())

    def __call__(self, sample: dict, epoch: int) -> bool:
        meta = sample.get("json")
        if meta is None:
            return False  # no hashtags: nothing to learn from
        try:
            meta = json.loads(meta) if isinstance(meta, (bytes, str)) else meta
        except ValueError:
            return True  # let the decoder count it as corrupt
        if not isinstance(meta, dict):
            return True
        p = self.keep_probability(meta.get("hashtags") or ())
        if p >= 1.0:
            return True
        return derive_seed("hashtag-balance", self.seed, epoch, sample.get("__key__")) / 2**63 < p


def hashtag_datamodule(cfg: HashtagDataConfig, vocabulary: Vocabulary, seed: int = 0,
                       mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> ShardedDataModule:
    """Shards -> batches of ``image``, ``hashtags``, ``label`` (when the shards have ``cls``) and ``key``; the
    training stream is class-balanced with ``cfg.balance_power`` (its resampler is ``.train_sample_filter``, which
    also drops samples without json). Validation shards need no json: ``label`` alone feeds the zero-shot metric."""
    resampler = HashtagResampler(vocabulary, cfg.balance_power, seed)
    log.info("hashtags: %d seen on >= %s of %d samples; balancing power %s keeps ~%.1f%% of the samples read",
             len(vocabulary), vocabulary.settings.get("min_count", "?"), vocabulary.num_samples, cfg.balance_power,
             100 * resampler.expected_keep_fraction())
    return ShardedDataModule(
        cfg, wsp_train_transform(cfg.image_size, cfg.min_crop_scale),
        HashtagSampleTransform(eval_pil_transform(cfg.image_size)), seed=seed, mean=mean, std=std,
        required_keys=("jpg",), train_sample_filter=resampler,
    )
