"""How fast the datamodule feeds training, against the decode-only floor of the same shards
(``python -m recipes.benchmark --trainer none``).

Two rates, measured in the same process on the same cores, for each worker count:

* ``datamodule_rate``: the training path users get: ``ShardedDataModule`` -> ``ShardLoader`` (DataLoader workers
  from a forkserver, resampled stream, shuffle buffer, decoding of every image field of a sample, the real
  transform, collate, pinned memory when a GPU is present). Not included with ``decode="host"``: the
  host-to-device copy and the normalisation on the device. With ``decode="device"`` (``device_decode.py``) the
  workers only read JPEG headers and draw crops, so the rate counts the whole path to a normalised batch on the
  device: workers, transfer, decode, crop and resize, normalisation.
* ``raw_decode_rate``: the floor: read the tar members (``ShardReader``) and decode each ``jpg`` to RGB pixels
  with PIL, nothing else (no other field, no crop, flip, tensor or collate), over the same number of processes.

``ratio`` = datamodule / raw decode: the share of pure decoding capacity that reaches the training step. Published
PIL and WebDataset pipelines reach about a quarter to a third of it: about 155-184 images/s per core in
libffcv/ffcv docs/benchmarks.rst (PyTorch DataLoader and WebDataset, random-resized crop and flip) against 540-860
images/s of single-thread decoding in ternaus/imread_benchmark. The raw decode is always PIL on the host, so with
``decode="device"`` the ratio shows what moving the decode to the device buys.

Both clocks (``time.perf_counter``) start when the warm-up items have arrived, and there is at least one per
worker, so worker start-up (forkserver fork, imports, first shard open) is excluded. Items that workers
prefetched while the others started still count: this flatters short runs, so time tens of batches.
"""

from __future__ import annotations

import io
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from benchmarks.config import Config
from benchmarks.measure import format_how, how_measured
from datamodules.sharded import DataConfig, ShardedDataModule, resolve_shards
from datamodules.shards import expand_shards
from datamodules.streams import ShardReader, _worker_context
from datamodules.transforms import mae_train_transform
from trainers.run import compute_begins

__all__ = ["datamodule_rate", "default_device", "format_loader_table", "loader_benchmark", "loader_report",
           "raw_decode_rate"]

IMAGE_KEY = "jpg"  # the field the training transforms read (ShardedDataModule's default required key)


def _check(where: str, **values: int) -> None:
    for name, value in values.items():
        minimum = 0 if name.startswith("warmup") or name.endswith("workers") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")


def _rate(workers: int, images: int, seconds: float) -> dict:
    return {"workers": workers, "images": images, "seconds": seconds,
            "images_per_sec": images / seconds if seconds > 0 else float("inf")}


def _with_train_shards(cfg: DataConfig) -> DataConfig:
    """A copy of ``cfg`` whose train_shards name real shards (the built-in synthetic world when None)."""
    cfg = replace(cfg)
    if cfg.train_shards is None:
        resolve_shards(cfg)  # fills in the synthetic world's shards (built once, cached)
    return cfg


def _timed(items: Iterator, warmup: int, count: Callable, finish: Callable[[], None] | None = None
           ) -> tuple[int, float]:
    """Consume ``items``; return (sum of ``count(item)`` after the first ``warmup`` items, seconds from the arrival of
    the last warm-up item, or from the first request when ``warmup`` is 0, to the arrival of the last item).
    ``finish`` (a device synchronise) runs after the last item and before the clock stops, when items were timed."""
    total, start = 0, time.perf_counter()
    end = start
    timed = False
    for index, item in enumerate(items):
        if index < warmup:
            if finish is not None:
                finish()  # the warm-up's device work must not spill into the timed window
            start = end = time.perf_counter()
            continue
        total += count(item)
        timed = True
        if finish is None:
            end = time.perf_counter()
    if finish is not None and timed:
        finish()
        end = time.perf_counter()
    return total, end - start


def default_device() -> torch.device:
    """Where ``decode="device"`` benchmarks decode: the current CUDA device when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _on_device(batches: Iterator[dict], datamodule: ShardedDataModule, device: torch.device) -> Iterator[dict]:
    """The batches as a training step receives them: moved to ``device`` and through ``on_after_batch_transfer``
    (decode, crop, resize, normalise), without a synchronisation per batch."""
    for batch in batches:
        yield datamodule.on_after_batch_transfer(datamodule.transfer_batch_to_device(batch, device, 0), 0)


# ----------------------------------------------------------------------------------------------------
# The datamodule


def datamodule_rate(cfg: DataConfig, train_transform: Callable[[dict], dict], num_workers: int, batches: int,
                    warmup_batches: int = 2, seed: int = 0, device: torch.device | str | None = None) -> dict:
    """Images per second out of ``ShardedDataModule(cfg with num_workers).train_dataloader()``.

    Built as ``recipes/mae_prepretrain.py`` builds it, with the training stream only, as rank 0 of 1. The epoch is
    cut to exactly warm-up + ``batches`` batches; the warm-up is raised to ``num_workers`` batches when smaller, so
    that every worker has started before the clock does. Timed: the ``batches`` batches after the warm-up
    (reading, shuffle buffer, decoding, transform, collate, transfer to this process, pinning). Not timed: setup,
    worker start-up and shutdown. Returns ``{"workers", "images", "seconds", "images_per_sec"}``, images counted
    from the batches received.

    With ``cfg.decode == "device"`` every batch is also moved to ``device`` (default: ``default_device()``) and
    decoded, cropped and normalised there (``on_after_batch_transfer``); on CUDA the timed window ends with a
    ``torch.cuda.synchronize()`` so that it holds the device work of every timed batch.
    """
    _check("datamodule_rate", num_workers=num_workers, batches=batches, warmup_batches=warmup_batches)
    warmup = max(warmup_batches, num_workers)
    cfg = replace(_with_train_shards(cfg), val_shards=None, num_workers=num_workers,
                  batches_per_epoch=warmup + batches)
    datamodule = ShardedDataModule(cfg, train_transform, train_transform, seed=seed)
    datamodule.world_size, datamodule.rank = 1, 0  # one loader, whatever process group this runs in
    datamodule.setup("fit")
    batches_in = iter(datamodule.train_dataloader())
    finish = None
    if cfg.decode == "device":
        device = torch.device(device) if device is not None else default_device()
        datamodule.decode_device = device
        batches_in = _on_device(batches_in, datamodule, device)
        if device.type == "cuda":
            finish = lambda: torch.cuda.synchronize(device)  # noqa: E731
    images, seconds = _timed(batches_in, warmup, lambda batch: len(batch["image"]), finish)
    return _rate(num_workers, images, seconds)


# ----------------------------------------------------------------------------------------------------
# The decode-only floor


class _DecodeOnly(IterableDataset):
    """Decodes chunks of JPEGs and yields the number decoded per chunk, not the pixels: what crosses between
    processes is an int, so the rate is the decoding alone.

    Chunk i belongs to worker i % readers, the order in which the DataLoader collects them, so the i-th item
    received is chunk i. A worker reads its own slice of the shards when there are enough, else all of them (as
    ``ResampledShardStream.partition``), drawing shards with replacement.
    """

    def __init__(self, shards: Sequence[str], chunks: list[int]):
        super().__init__()
        self.shards = list(shards)
        self.chunks = list(chunks)

    def __iter__(self) -> Iterator[int]:
        info = get_worker_info()
        worker, readers = (0, 1) if info is None else (info.id, info.num_workers)
        shards = self.shards[worker::readers] if len(self.shards) >= readers else self.shards
        reader = ShardReader(required_keys=(IMAGE_KEY,), max_corrupt_fraction=0.01, min_samples_for_corrupt_check=100)
        samples = reader.tar_samples(reader.resampled_urls(shards, random.Random(worker)))
        for size in self.chunks[worker::readers]:
            yield self._decode(samples, size)

    @staticmethod
    def _decode(samples: Iterator[dict], size: int) -> int:
        decoded = failed = 0
        error = ""
        while decoded < size:
            sample = next(samples)
            try:
                with io.BytesIO(sample[IMAGE_KEY]) as stream:
                    image = Image.open(stream)
                    image.load()  # the full decode; convert alone may return before decoding some modes
                    image.convert("RGB")
                decoded += 1
            except Exception as exc:  # noqa: BLE001 - a missing field or bad bytes: skipped, like the datamodule
                failed += 1
                error = f"sample {sample.get('__key__')!r} of {sample.get('__url__')}: {type(exc).__name__}: {exc}"
                if failed > max(100, decoded):
                    raise ValueError(
                        f"raw_decode_rate: {failed} samples without a decodable '{IMAGE_KEY}' field against "
                        f"{decoded} decoded (last: {error}). The shards must hold JPEGs under '{IMAGE_KEY}'; "
                        "check them with `tar tf <shard> | head`."
                    ) from exc
        return decoded


def _chunks(images: int, chunk: int) -> list[int]:
    return [chunk] * (images // chunk) + ([images % chunk] if images % chunk else [])


def raw_decode_rate(shards: list[str], num_workers: int, images: int, warmup_images: int = 64,
                    chunk: int = 32) -> dict:
    """Images per second of JPEG decoding alone over ``shards``, in ``num_workers`` DataLoader workers (0: here).

    Workers start from the same forkserver as the datamodule's. Each decodes chunks of ``chunk`` images and
    reports only their count. The warm-up is ``warmup_images`` rounded up to whole chunks, and at least one chunk
    per worker; the clock starts when the warm-up chunks have arrived and stops at the last of ``images``.
    Timed: tar reading and full decoding to RGB of the timed images. Not timed: worker start-up and shutdown.
    Returns ``{"workers", "images", "seconds", "images_per_sec"}``.
    """
    _check("raw_decode_rate", num_workers=num_workers, images=images, warmup_images=warmup_images, chunk=chunk)
    if not shards:
        raise ValueError("raw_decode_rate: no shards given; pass a list of shard paths (e.g. expand_shards(spec))")
    warmup = max(math.ceil(warmup_images / chunk), num_workers)
    dataset = _DecodeOnly(shards, [chunk] * warmup + _chunks(images, chunk))
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers,
                        multiprocessing_context=_worker_context() if num_workers > 0 else None)
    decoded, seconds = _timed(iter(loader), warmup, int)
    return _rate(num_workers, decoded, seconds)


# ----------------------------------------------------------------------------------------------------
# Both, per worker count


def loader_benchmark(cfg: DataConfig, train_transform: Callable[[dict], dict], worker_counts: Sequence[int],
                     batches: int, device: torch.device | str | None = None) -> list[dict]:
    """For each worker count: the datamodule rate and the raw decode rate of the same shards, one after the other.

    The raw decode times ``batches x batch_size`` images in chunks of ``batch_size`` with the same warm-up, so both
    sides read as many images. Rows: ``workers``, ``datamodule_images_per_sec``, ``raw_decode_images_per_sec``,
    ``ratio`` (datamodule / raw decode), ``datamodule_images``, ``datamodule_seconds``, ``raw_decode_images``,
    ``raw_decode_seconds``, ``decode`` (``cfg.decode``: "host", or "device" when the datamodule side decodes on
    ``device``, default ``default_device()``; the raw decode is PIL on the host either way).
    """
    counts = list(worker_counts)
    if not counts:
        raise ValueError("loader_benchmark: worker_counts is empty; pass e.g. [0, 1, 2]")
    _check("loader_benchmark", batches=batches)
    for workers in counts:
        _check(f"loader_benchmark: worker_counts {counts}", num_workers=workers)
    cfg = _with_train_shards(cfg)
    shards = expand_shards(cfg.train_shards)
    rows = []
    for workers in counts:
        module = datamodule_rate(cfg, train_transform, workers, batches, device=device)
        raw = raw_decode_rate(shards, workers, batches * cfg.batch_size, warmup_images=2 * cfg.batch_size,
                              chunk=cfg.batch_size)
        rows.append({
            "workers": workers,
            "datamodule_images_per_sec": module["images_per_sec"],
            "raw_decode_images_per_sec": raw["images_per_sec"],
            "ratio": module["images_per_sec"] / raw["images_per_sec"],
            "datamodule_images": module["images"],
            "datamodule_seconds": module["seconds"],
            "raw_decode_images": raw["images"],
            "raw_decode_seconds": raw["seconds"],
            "decode": cfg.decode,
        })
    return rows


_COLUMNS = (  # header, width, cell
    ("workers", 7, lambda r: f"{r['workers']}"),
    ("datamodule img/s", 16, lambda r: f"{r['datamodule_images_per_sec']:.1f}"),
    ("raw decode img/s", 16, lambda r: f"{r['raw_decode_images_per_sec']:.1f}"),
    ("ratio", 6, lambda r: f"{r['ratio']:.3f}"),
    ("datamodule images / s", 21, lambda r: f"{r['datamodule_images']} / {r['datamodule_seconds']:.3f}"),
    ("raw decode images / s", 21, lambda r: f"{r['raw_decode_images']} / {r['raw_decode_seconds']:.3f}"),
    ("decode", 6, lambda r: r.get("decode", "host")),
)


def format_loader_table(rows: list[dict], how: str) -> str:
    """``how`` (one line: cores, batch size, image size, ...), a header, then one line per row."""
    if "\n" in how:
        raise ValueError(f"format_loader_table: `how` must be one line, got {how!r}")
    lines = [how, "  ".join(f"{name:>{width}}" for name, width, _ in _COLUMNS)]
    lines += ["  ".join(f"{cell(row):>{width}}" for _, width, cell in _COLUMNS) for row in rows]
    return "\n".join(lines)


def loader_report(cfg: Config, device: torch.device) -> tuple[dict, str]:
    """``--trainer none``: the loader benchmark of ``cfg`` with the MAE training transform; the report and its
    text."""
    data = DataConfig(train_shards=cfg.shards, batch_size=cfg.batch_size, image_size=cfg.image_size,
                      decode=cfg.decode)
    resolve_shards(data)
    compute_begins()
    rows = loader_benchmark(data, mae_train_transform(cfg.image_size), cfg.worker_counts, cfg.steps)
    how = how_measured(device, shards=data.train_shards, transform="MAE training", image_size=cfg.image_size,
                       batch=cfg.batch_size, timed_batches=cfg.steps, decode=cfg.decode)
    table = format_loader_table(rows, f"MAE training transform, {cfg.image_size} px, batch {cfg.batch_size}, "
                                      f"{cfg.decode} decode")
    return {"how_measured": how, "loader": rows}, f"{format_how(how)}\n\n{table}"
