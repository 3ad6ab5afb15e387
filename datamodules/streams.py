"""Shard streams: reading WebDataset shards with error accounting, and the loader Lightning iterates.

Training (``ResampledShardStream``): every (rank, worker) draws shards with replacement from its own
partition and yields a fixed share of ``batches_per_epoch``, so every rank yields exactly the same number
of batches and DDP never waits on a rank that ran dry (PL#20404, wds#250). All randomness (shard choice,
shuffle buffer, crop) is seeded from (seed, epoch, rank, worker): a rerun reproduces the stream, a new
epoch reorders it.

Validation (``FiniteShardStream``): every sample is read exactly once across all ranks and workers,
whatever the shard count. The set is split by rank, then each rank's part by worker (``split_pieces``):
whole shards where there are at least as many as parts, otherwise the parts that share a shard each keep
every m-th of its samples. Each worker's last batch may be partial, so ranks may run different numbers of
batches; that is safe for Lightning's epoch-level ``sync_dist`` (see ``FiniteShardStream``), but a rank
with no sample at all is not, and is an error.

Lightning calls ``set_epoch`` only on ``dataloader.sampler``; ``ShardLoader`` is its own sampler so the
epoch reaches the stream, and non-persistent workers pick it up at the next ``iter()``.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import multiprocessing
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlparse

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from .device_decode import read_header

log = logging.getLogger(__name__)


class CorruptDataError(RuntimeError):
    """Too many unreadable samples in a shard: the data, not the code, needs fixing."""


# ----------------------------------------------------------------------------------------------------
# Small helpers


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of ints/strings, stable across processes and Python runs
    (unlike ``hash()``, which is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def worker_share(total: int, worker: int, num_workers: int) -> int:
    """Worker ``worker``'s part of ``total`` items; the parts of all workers sum to ``total``."""
    return total // num_workers + (1 if worker < total % num_workers else 0)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _TorchRngScope:
    """Run code under a private torch CPU RNG state and leave the global one as it was.

    torchvision transforms draw from the global torch generator; scoping it keeps the crops a function
    of where the sample sits in the stream and, with num_workers=0, keeps data loading from perturbing
    the training process's random stream (dropout, masking).
    """

    def __init__(self, seed: int):
        self._state = torch.Generator().manual_seed(seed).get_state()
        self._outer: torch.Tensor | None = None

    def __enter__(self) -> None:
        self._outer = torch.get_rng_state()
        torch.set_rng_state(self._state)

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self._outer)


def collate(samples: list[dict]) -> dict:
    """List of transformed samples -> batch dict: tensors stacked, ints -> int64, floats -> float32,
    anything else kept as a list. ``__key__`` becomes ``key``; other ``__*__`` fields are dropped."""
    keys = list(samples[0])
    for sample in samples[1:]:
        if list(sample) != keys:
            raise ValueError(
                f"Cannot batch samples with different fields: {keys} vs {list(sample)} "
                f"(keys {samples[0].get('key')!r} and {sample.get('key')!r}); the transform must return "
                "the same fields for every sample"
            )
    batch: dict = {}
    for k in keys:
        if k.startswith("__") and k != "__key__":
            continue
        values = [s[k] for s in samples]
        first = values[0]
        if isinstance(first, torch.Tensor):
            value = torch.stack(values)
        elif isinstance(first, bool):
            value = torch.tensor(values, dtype=torch.bool)
        elif isinstance(first, int):
            value = torch.tensor(values, dtype=torch.int64)
        elif isinstance(first, float):
            value = torch.tensor(values, dtype=torch.float32)
        else:
            value = values
        batch["key" if k == "__key__" else k] = value
    return batch


_IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "ppm", "bmp"}


class _ImageHandler:
    """wds decoder handler: the image fields in ``keys`` -> loaded PIL RGB (``mask.png`` keeps its mode: it holds
    ids, not colours). Other image fields stay bytes: decoding an unused field (the synthetic world's mask.png
    next to an MAE image) cost about a third more decode time, measured with ``recipes.benchmark --trainer none``.
    Fields in ``header_only`` (decode="device") are only opened: ``device_decode.read_header``."""

    def __init__(self, keys: Sequence[str], header_only: Sequence[str] = ()):
        self.keys = frozenset(keys)
        self.header_only = frozenset(header_only)

    def __call__(self, key: str, data: bytes):
        field = key.lstrip(".")  # wds passes ".jpg", ".mask.png"
        if field in self.header_only:
            return read_header(key, data)
        if field not in self.keys:
            return None
        return _decode_image(key, data)


def _decode_image(key: str, data: bytes):
    extension = key.rsplit(".", 1)[-1].lower()
    if extension not in _IMAGE_EXTENSIONS:
        return None
    with io.BytesIO(data) as stream:
        image = Image.open(stream)
        image.load()  # decode now, inside the try that counts corrupt samples
    return image if key.lower().endswith("mask.png") else image.convert("RGB")


def _open_shard(url: str):
    scheme = urlparse(url).scheme.lower()
    if url.startswith("pipe:") or scheme in ("", "file", "http", "https") or len(scheme) == 1:
        return wds.gopen(url, "rb")
    import fsspec  # s3://, gs://, ...: whatever fsspec backend is installed

    return fsspec.open(url, "rb").open()


def json_members(url: str) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of the .json members of a tar shard, read as a stream; other members are skipped
    (images are not even read into memory)."""
    stream = _open_shard(url)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    yield member.name, tar.extractfile(member).read()
    finally:
        stream.close()


# ----------------------------------------------------------------------------------------------------
# Reading shards with error accounting


@dataclass
class ShardStats:
    seen: int = 0
    """Samples (and unreadable tar entries) read from this shard."""
    corrupt: int = 0
    """Of those, skipped as corrupt."""
    last_error: str = ""
    """The latest corrupt sample's key and error, for the message that stops the run."""


@dataclass
class ShardReader:
    """tar -> decoded samples for one worker, skipping and counting corrupt samples per shard.

    Only the image fields among ``required_keys`` are decoded; any other field is passed on as bytes. Fields in
    ``header_only_keys`` are read up to their image header only (decode="device": pixels are decoded on the
    training device); a header that does not parse counts as a corrupt sample.
    """

    required_keys: Sequence[str]
    max_corrupt_fraction: float
    min_samples_for_corrupt_check: int
    stats: dict[str, ShardStats] = field(default_factory=dict)
    header_only_keys: Sequence[str] = ()

    def __post_init__(self) -> None:
        self._decoder = wds.autodecode.Decoder([_ImageHandler(self.required_keys, self.header_only_keys)])
        self._current_url = "<no shard opened yet>"
        self._opens_without_sample = 0

    # -- shard sources -------------------------------------------------------------------------------
    def resampled_urls(self, shards: Sequence[str], rng: random.Random) -> Iterator[dict]:
        # A shard list whose every member is empty or unreadable would otherwise loop forever.
        limit = 10 * len(shards) + 50
        while True:
            self._opens_without_sample += 1
            if self._opens_without_sample > limit:
                raise CorruptDataError(
                    f"{limit} shard reads in a row produced no samples; the shards of this worker are empty "
                    f"or unreadable (e.g. {shards[:3]}). Check them with `tar tf <shard>`."
                )
            yield {"url": rng.choice(shards)}

    @staticmethod
    def finite_urls(shards: Sequence[str]) -> Iterator[dict]:
        for url in shards:
            yield {"url": url}

    # -- tar -> raw samples --------------------------------------------------------------------------
    def _open_streams(self, src: Iterator[dict]) -> Iterator[dict]:
        for item in src:
            url = item["url"]
            self._current_url = url
            try:
                stream = _open_shard(url)
            except Exception as exc:  # noqa: BLE001 - counted, and fatal past the threshold
                self._on_tar_error(exc)
                continue
            try:
                yield {"url": url, "stream": stream}
            finally:
                stream.close()

    def tar_samples(self, src: Iterator[dict]) -> Iterator[dict]:
        files = tar_file_expander(self._open_streams(src), handler=self._on_tar_error)
        for sample in group_by_keys(files, handler=self._on_tar_error):
            self._opens_without_sample = 0
            yield sample

    def _on_tar_error(self, exc: Exception) -> bool:
        # Exceptions from tar reading carry no reliable shard name; tar files are read one at a time,
        # so the error belongs to the shard opened last.
        self._record(self._current_url, "?", f"{type(exc).__name__}: {exc}", exc)
        return True  # skip and go on

    # -- raw -> decoded samples ----------------------------------------------------------------------
    def decode(self, samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            url = sample.get("__url__", self._current_url)
            key = sample.get("__key__", "?")
            self._stats(url).seen += 1
            missing = [k for k in self.required_keys if k not in sample]
            if missing:
                present = sorted(k for k in sample if not k.startswith("__"))
                self._record(url, key, f"missing field(s) {missing}; the sample has {present}", count_seen=False)
                continue
            try:
                decoded = self._decoder(sample)
            except Exception as exc:  # noqa: BLE001 - bad image bytes, bad json, ...
                cause = exc.__cause__ or exc  # wds wraps decoder errors in DecodingError
                where = f"field {exc.k!r}: " if getattr(exc, "k", None) else ""
                self._record(url, key, f"{where}{type(cause).__name__}: {cause}", exc, count_seen=False)
                continue
            yield decoded

    # -- accounting ----------------------------------------------------------------------------------
    def _stats(self, url: str) -> ShardStats:
        if url not in self.stats:
            self.stats[url] = ShardStats()
        return self.stats[url]

    def _record(self, url: str, key: str, message: str, exc: Exception | None = None,
                count_seen: bool = True) -> None:
        stats = self._stats(url)
        stats.seen += int(count_seen)
        stats.corrupt += 1
        stats.last_error = f"sample {key!r}: {message}"
        if _is_power_of_ten(stats.corrupt):  # 1, 10, 100, ...: one line per shard, rate-limited
            log.warning(
                "Skipped %d corrupt sample(s) of %d read from shard %s (latest: %s)",
                stats.corrupt, stats.seen, url, stats.last_error,
            )
        too_many = stats.corrupt > self.max_corrupt_fraction * stats.seen
        if stats.seen >= self.min_samples_for_corrupt_check and too_many:
            raise CorruptDataError(
                f"Shard {url}: {stats.corrupt} of {stats.seen} samples read are corrupt "
                f"({stats.corrupt / stats.seen:.1%} > max_corrupt_fraction {self.max_corrupt_fraction:.1%}). "
                f"Last error: {stats.last_error}. To fix: re-write this shard or remove it from the shard spec; "
                "if losing these samples is acceptable, raise --data.max_corrupt_fraction."
            ) from exc


def _is_power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


# ----------------------------------------------------------------------------------------------------
# The streams


class _ShardStream(IterableDataset):
    def __init__(
        self,
        shards: Sequence[str],
        transform: Callable[[dict], dict],
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        required_keys: Sequence[str] = ("jpg",),
        max_corrupt_fraction: float = 0.01,
        min_samples_for_corrupt_check: int = 100,
        header_only_keys: Sequence[str] = (),
    ):
        super().__init__()
        if not shards:
            raise ValueError("A shard stream needs at least one shard")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.shards = list(shards)
        self.transform = transform
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.required_keys = tuple(required_keys)
        self.max_corrupt_fraction = max_corrupt_fraction
        self.min_samples_for_corrupt_check = min_samples_for_corrupt_check
        self.header_only_keys = tuple(header_only_keys)
        self.epoch = 0
        self.reader: ShardReader | None = None  # of the last iteration in this process (tests, num_workers=0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _new_reader(self) -> ShardReader:
        self.reader = ShardReader(self.required_keys, self.max_corrupt_fraction, self.min_samples_for_corrupt_check,
                                  header_only_keys=self.header_only_keys)
        return self.reader

    def _seeded_transform(self, *where: object) -> Callable[[tuple[int, dict]], dict]:
        """The transform of the n-th decoded sample, seeded from (where, n): its random crop depends on its
        place in the stream alone, so a resumed stream can skip samples without transforming them."""

        def apply(indexed: tuple[int, dict]) -> dict:
            index, sample = indexed
            with _TorchRngScope(derive_seed("transform", *where, index)):
                return self.transform(sample)

        return apply


class ResampledShardStream(_ShardStream):
    """Infinite-source training stream cut into epochs of exactly ``batches_per_epoch`` batches per rank.

    ``skip_batches`` resumes an epoch exactly: the first ``skip_batches`` batches this rank would have
    yielded in this epoch are read and dropped (without their transforms), and the rest come in the
    order an uninterrupted run would have produced them.
    """

    def __init__(self, shards: Sequence[str], transform: Callable[[dict], dict], batch_size: int,
                 batches_per_epoch: int, *, shuffle_buffer: int = 1000,
                 sample_filter: Callable[[dict, int], bool] | None = None, **kwargs):
        super().__init__(shards, transform, batch_size, **kwargs)
        self.batches_per_epoch = batches_per_epoch
        self.shuffle_buffer = shuffle_buffer
        # (raw sample, epoch) -> keep? Applied before decoding (a rejected sample costs no image decode) and
        # before the resume count, so it must be a pure function of the sample and the epoch: a resumed
        # stream then drops the same samples and skips exactly the ones already trained on.
        self.sample_filter = sample_filter
        self.skip_batches = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip_batches = 0  # a resume's skip belongs to the epoch it was recorded in
        super().set_epoch(epoch)

    def partition(self, worker: int, num_workers: int) -> list[str]:
        """The shards this (rank, worker) draws from: a disjoint slice when there are enough shards
        (so ranks see different samples), else all of them (each reader with its own seed)."""
        if len(self.shards) < self.world_size * num_workers:
            return self.shards
        return self.shards[self.rank :: self.world_size][worker::num_workers]

    def __iter__(self) -> Iterator[dict]:
        loader_worker, num_workers = _worker()
        # The DataLoader takes batch i from worker i % num_workers. After skipping S batches the next one
        # belongs to worker S % num_workers, but a new DataLoader starts at its worker 0: so loader worker
        # w plays the stream of worker (w + S) % num_workers, which keeps the uninterrupted order.
        skip = min(self.skip_batches, self.batches_per_epoch)
        worker = (loader_worker + skip) % num_workers
        done = worker_share(skip, worker, num_workers)
        quota = worker_share(self.batches_per_epoch, worker, num_workers) - done
        if quota <= 0:
            return iter(())
        where = (self.seed, self.epoch, self.rank, worker)
        reader = self._new_reader()
        shard_rng = random.Random(derive_seed("shards", *where))
        partition = self.partition(worker, num_workers)
        shuffle = None
        if self.shuffle_buffer > 1:
            sample_rng = random.Random(derive_seed("samples", *where))
            shuffle = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=sample_rng)
        pipeline = wds.DataPipeline(
            lambda: reader.resampled_urls(partition, shard_rng),
            reader.tar_samples,
            shuffle,
            _filtered(self.sample_filter, self.epoch),
            reader.decode,
            _enumerate_from(done * self.batch_size),
            wds.map(self._seeded_transform(*where)),
            wds.batched(self.batch_size, collation_fn=collate, partial=False),
        )
        return itertools.islice(iter(pipeline), quota)


def _filtered(keep: Callable[[dict, int], bool] | None,
              epoch: int) -> Callable[[Iterator[dict]], Iterator[dict]] | None:
    """Pipeline stage: the raw samples ``keep(sample, epoch)`` accepts; None (no stage) without a filter."""
    if keep is None:
        return None

    def stage(samples: Iterator[dict]) -> Iterator[dict]:
        return (sample for sample in samples if keep(sample, epoch))

    return stage


def _enumerate_from(skip: int) -> Callable[[Iterator[dict]], Iterator[tuple[int, dict]]]:
    """Pipeline stage: number the decoded samples and drop the first ``skip`` (already trained on)."""

    def stage(samples: Iterator[dict]) -> Iterator[tuple[int, dict]]:
        return itertools.islice(enumerate(samples), skip, None)

    return stage


@dataclass(frozen=True)
class ShardPiece:
    """The samples of shard ``url`` at positions p (0-based, in tar order) with p % stride == offset."""

    url: str
    stride: int = 1
    offset: int = 0

    def count(self, samples_in_shard: int) -> int:
        return len(range(self.offset, samples_in_shard, self.stride))


def split_pieces(pieces: Sequence[ShardPiece], parts: int, part: int) -> list[ShardPiece]:
    """Part ``part`` of ``parts`` disjoint parts that together hold every sample of ``pieces`` exactly once.

    With at least as many pieces as parts, whole pieces go round robin (no shard is opened twice). With
    fewer, piece ``part % len(pieces)`` is shared by the parts that map to it, each keeping every m-th of
    its samples: a small set then reads each shard m times instead of leaving readers idle (wds#65).
    """
    if not 0 <= part < parts:
        raise ValueError(f"part {part} is outside 0..{parts - 1}")
    if not pieces:
        return []
    if len(pieces) >= parts:
        return list(pieces[part::parts])
    first = part % len(pieces)
    piece = pieces[first]
    sharing = len(range(first, parts, len(pieces)))  # parts first, first + len(pieces), ...
    nth = part // len(pieces)
    return [ShardPiece(piece.url, piece.stride * sharing, piece.offset + nth * piece.stride)]


def finite_split(shards: Sequence[str], world_size: int, rank: int, num_workers: int = 1,
                 worker: int = 0) -> list[ShardPiece]:
    """What (rank, worker) reads of a finite set: split by rank, then that rank's part by worker."""
    of_rank = split_pieces([ShardPiece(url) for url in shards], world_size, rank)
    return split_pieces(of_rank, max(1, num_workers), worker)


class FiniteShardStream(_ShardStream):
    """Validation stream: this (rank, worker)'s part of the set (``finite_split``), read once, in order.

    Ranks may yield different numbers of batches (shards and workers' last batches differ in size). Lightning
    reduces what validation logs with ``sync_dist`` once, at the end of the epoch, not per batch
    (lightning/pytorch/trainer/connectors/logger_connector/result.py:_ResultMetric.update syncs on_step values
    only, and validation logs on_epoch), and DDP's buffer broadcast, a collective, runs in a validation's first
    forward only: a forward under no_grad turns it off for the next (torch/nn/parallel/distributed.py:
    DistributedDataParallel._post_forward). So every rank must run at least one batch, not the same number. A
    rank with no sample would miss the epoch-end reductions and leave the others waiting, so ``ShardLoader``
    stops with an error instead.
    """

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        mine = finite_split(self.shards, self.world_size, self.rank, num_workers, worker)
        if not mine:
            return iter(())
        reader = self._new_reader()
        pipeline = wds.DataPipeline(
            lambda: _piece_samples(reader, mine),
            reader.decode,
            _enumerate_from(0),
            wds.map(self._seeded_transform("eval", self.seed, self.rank, worker)),
            wds.batched(self.batch_size, collation_fn=collate, partial=True),
        )
        return iter(pipeline)


def _piece_samples(reader: ShardReader, pieces: Sequence[ShardPiece]) -> Iterator[dict]:
    """The raw (undecoded) samples of ``pieces``: the ones another reader keeps cost no image decode."""
    for piece in pieces:
        samples = reader.tar_samples(reader.finite_urls([piece.url]))
        yield from itertools.islice(samples, piece.offset, None, piece.stride)


def _worker_init(worker_id: int) -> None:
    from ._worker_signals import ignore_cluster_signals as ignore  # importing it in the training process would apply it there

    ignore(worker_id)


def _worker_context():
    context = multiprocessing.get_context("forkserver")
    # The server imports the stream and transform code (torch, torchvision, PIL, the caption tokenizer's open_clip)
    # once; each worker forked from it starts warm instead of paying those imports at every epoch.
    context.set_forkserver_preload([__name__, "datamodules.transforms", "datamodules.text",
                                    "datamodules._worker_signals"])
    return context


class ShardLoader:
    """A DataLoader over a shard stream with the length and ``set_epoch`` Lightning looks for.

    Not a DataLoader subclass on purpose: Lightning leaves it alone (no sampler injection) and uses its
    ``__len__``. ``length=None`` means unknown: ``len()`` raises TypeError, which Lightning reads as
    "iterate until exhausted". ``max_batches`` caps the number of batches taken per ``iter()``.
    """

    # Batches come pre-made from the stream. Lightning reads this to decide whether a loader shuffles;
    # DeepSpeed reads `.batch_size` from it, so pass `logging_batch_size_per_gpu` there (PL#19460).
    batch_sampler = None

    def __init__(self, stream: _ShardStream, num_workers: int, length: int | None = None,
                 max_batches: int | None = None):
        self.stream = stream
        self.length = length
        self.max_batches = max_batches
        # persistent_workers=False: workers are restarted at every iter() and so see the new epoch.
        # Workers start from a forkserver, not by fork(): under DDP the training process runs gloo/NCCL
        # threads, and a child forked while one of them holds a lock can deadlock before its first batch.
        self.loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            multiprocessing_context=_worker_context() if num_workers > 0 else None,
            worker_init_fn=_worker_init,
            # Creating a loader iterator draws a base seed; without a generator of its own it draws from the
            # global torch RNG and so shifts the training process's random stream (masks, dropout) by
            # whether a validation ran. Our streams seed themselves, so this seed is never used.
            generator=torch.Generator().manual_seed(0),
        )

    @property
    def sampler(self) -> ShardLoader:
        # Lightning's fit loop calls set_epoch on `dataloader.sampler` only
        # (lightning/fabric/utilities/data.py::_set_sampler_epoch).
        return self

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("this ShardLoader's length is unknown (a finite stream without an index)")
        return self.length

    def __iter__(self) -> Iterator[dict]:
        # Lazy: Lightning calls iter() once just to check that the loader is iterable; workers start (and a
        # resume's skip is used up) only when the first batch is asked for.
        batches = self._batches()
        return batches if self.max_batches is None else itertools.islice(batches, self.max_batches)

    def _batches(self) -> Iterator[dict]:
        batches = iter(self.loader)  # workers have their copy of the stream once this returns
        if isinstance(self.stream, ResampledShardStream):
            self.stream.skip_batches = 0  # a resume skips within its first epoch only
        yielded = 0
        for batch in batches:
            yielded += 1
            yield batch
        if yielded == 0 and isinstance(self.stream, FiniteShardStream):
            raise _no_sample_error(self.stream)


def _no_sample_error(stream: FiniteShardStream) -> RuntimeError:
    # Under DDP the other ranks would wait for this one in the epoch-end reductions: fail loudly instead.
    where = f"rank {stream.rank} of {stream.world_size}" if stream.world_size > 1 else "this process"
    return RuntimeError(
        f"The finite (validation) stream gave {where} no sample: its {len(stream.shards)} shard(s) (e.g. "
        f"{stream.shards[0]}) hold fewer readable samples than there are ranks, or are empty or unreadable "
        "(see the warnings above). To fix: check the shards with `tar tf <shard>`, run with fewer ranks, or "
        "drop --data.val_shards."
    )
