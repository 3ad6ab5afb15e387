"""Shard writing shared by every producer of WebDataset shards in Prism.

A thin layer over ``webdataset.ShardWriter`` that adds what a training pipeline needs to trust a
shard set:

* names ``{output_dir}/{prefix}-{index:06d}.tar``;
* each shard is written as ``<name>.tar.tmp`` and renamed when complete, so a crash never leaves a
  file that a ``*.tar`` glob or a brace spec would pick up as finished;
* on a clean close, an index ``{output_dir}/{prefix}-index.json``::

      {"num_samples": N, "shards": {"<name>.tar": count, ...}, "skipped": {reason: count}, "source": "..."}

  which the datamodule reads (``read_index``) to know how many samples a shard set holds without
  opening the tars. The index is written last and atomically: its presence means the set is whole.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Any, BinaryIO

import fsspec
import webdataset as wds

INDEX_SUFFIX = "-index.json"


def shard_pattern(output_dir: str, prefix: str) -> str:
    """printf-style pattern of the shard names (what ``webdataset.ShardWriter`` expects)."""
    return os.path.join(output_dir, f"{prefix}-%06d.tar")


def index_path(output_dir: str, prefix: str) -> str:
    return os.path.join(output_dir, f"{prefix}{INDEX_SUFFIX}")


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


class ShardWriter:
    """Write samples (WebDataset dicts with ``__key__``) into size- and count-limited shards.

    A shard is closed once it holds ``max_count`` samples (``shard_sizes[i]`` for shard i where given, e.g.
    from ``balanced_shard_sizes``) or ``max_size`` bytes of payload (tar headers not counted), so it may
    exceed ``max_size`` by one sample. Use as a context manager: a clean exit writes the index; an
    exception deletes the shard in progress and writes no index, so the set does not claim to be complete.
    """

    def __init__(
        self,
        output_dir: str,
        prefix: str = "train",
        max_count: int = 1000,
        max_size: float = 1e9,
        source: str = "",
        overwrite: bool = False,
        shard_sizes: list[int] | None = None,
    ) -> None:
        if max_count < 1 or max_size <= 0:
            raise ValueError(f"max_count must be >= 1 and max_size > 0, got {max_count} and {max_size}")
        if shard_sizes is not None and min(shard_sizes, default=0) < 1:
            raise ValueError(f"shard_sizes must be counts >= 1, got {shard_sizes}")
        if os.sep in prefix or "%" in prefix:
            raise ValueError(f"prefix {prefix!r} must be a plain file-name prefix (no '/' or '%')")
        os.makedirs(output_dir, exist_ok=True)
        self.output_dir, self.prefix, self.source = output_dir, prefix, source
        shard_re = re.compile(re.escape(prefix) + r"-\d{6,}\.tar(\.tmp)?")
        stale = [os.path.join(output_dir, n) for n in os.listdir(output_dir) if shard_re.fullmatch(n)]
        if os.path.exists(index_path(output_dir, prefix)):
            stale.append(index_path(output_dir, prefix))
        if stale and not overwrite:
            raise FileExistsError(
                f"{output_dir} already holds a shard set with prefix {prefix!r} ({len(stale)} files, e.g. "
                f"{os.path.basename(sorted(stale)[0])}); delete them, pick another output/prefix, or overwrite"
            )
        for path in stale:  # stale shards would otherwise mix into a glob of the new set
            os.remove(path)
        self.shard_sizes = list(shard_sizes or [])
        self.max_count = max_count
        self.shards: dict[str, int] = {}
        self.skipped: Counter[str] = Counter()
        self.num_samples = 0
        self._in_shard = 0
        self._file: BinaryIO | None = None
        self._closed = self._aborting = False
        # mtime fixed so that the same samples give byte-identical tars (reproducible builds).
        self._writer = wds.ShardWriter(
            shard_pattern(output_dir, prefix),
            maxcount=self._count_limit(0),
            maxsize=max_size,
            post=self._finish_shard,
            opener=self._open_tmp,
            verbose=0,
            mtime=0.0,
        )

    def _open_tmp(self, fname: str) -> BinaryIO:
        self._file = open(f"{fname}.tmp", "wb")
        return self._file

    def _finish_shard(self, fname: str) -> None:
        # Called by webdataset after it closed the tar stream; it does not close a file it did not open.
        assert self._file is not None
        self._file.close()
        self._file = None
        if self._in_shard == 0 or self._aborting:  # webdataset opens shard 0 eagerly: an empty set leaves no file
            os.remove(f"{fname}.tmp")
        else:
            os.replace(f"{fname}.tmp", fname)
            self.shards[os.path.basename(fname)] = self._in_shard
        self._in_shard = 0
        # webdataset's ShardWriter.write compares its `maxcount` with the open shard's count before every
        # write (webdataset/writer.py:ShardWriter.write), so the limit set here is the next shard's.
        self._writer.maxcount = self._count_limit(len(self.shards))

    def _count_limit(self, shard: int) -> int:
        return self.shard_sizes[shard] if shard < len(self.shard_sizes) else self.max_count

    def write(self, sample: dict[str, Any]) -> None:
        if "__key__" not in sample:
            raise ValueError(f"sample has no '__key__' (keys: {sorted(sample)})")
        self._writer.write(sample)  # may finish the previous shard first (post runs before this write)
        self._in_shard += 1
        self.num_samples += 1

    def skip(self, reason: str, count: int = 1) -> None:
        """Record that ``count`` inputs were not written, and why (goes into the index)."""
        self.skipped[reason] += count

    def close(self) -> dict[str, Any]:
        """Finish the last shard and write the index; returns the index dict."""
        if self._closed:
            raise RuntimeError("ShardWriter.close() called twice")
        self._writer.close()
        self._closed = True
        index = {
            "num_samples": self.num_samples,
            "shards": dict(sorted(self.shards.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "source": self.source,
        }
        _write_json_atomic(index_path(self.output_dir, self.prefix), index)
        return index

    def abort(self) -> None:
        """Drop the shard in progress; finished shards stay, no index is written."""
        if self._closed:
            return
        self._closed = self._aborting = True
        try:
            self._writer.finish()  # closes the tar stream, then _finish_shard deletes the file
        finally:
            if self._file is not None:  # finish failed half-way (disk full, ...)
                name = self._file.name
                self._file.close()
                os.remove(name)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _split_shard_name(path: str) -> tuple[str, str, str]:
    """``/d/train-000003.tar`` -> (``/d``, ``train``, ``train-000003.tar``)."""
    directory, name = path.rstrip("/").rsplit("/", 1) if "/" in path else (".", path)
    prefix = name.rsplit("-", 1)[0] if "-" in name else ""
    return directory, prefix, name


def read_shard_counts(shard_paths: list[str]) -> list[int] | None:
    """Sample count of each of ``shard_paths``, in order, from the index files next to them.

    Paths may be local or fsspec URLs. Returns None when any shard has no entry in its index
    (no index, unreadable index, or a shard the index does not list): callers then fall back to
    counting, to a configured epoch length, or skip a check.
    """
    cache: dict[tuple[str, str], dict[str, int] | None] = {}
    counts = []
    for path in shard_paths:
        directory, prefix, name = _split_shard_name(path)
        if (directory, prefix) not in cache:
            try:
                with fsspec.open(f"{directory}/{prefix}{INDEX_SUFFIX}", "r") as f:
                    cache[directory, prefix] = json.load(f)["shards"]
            except (OSError, ValueError, KeyError, TypeError, ImportError):
                cache[directory, prefix] = None
        shards = cache[directory, prefix]
        if shards is None or name not in shards:
            return None
        counts.append(int(shards[name]))
    return counts


def read_index(shard_paths: list[str]) -> int | None:
    """Total sample count of ``shard_paths`` from the index files next to them (None: see read_shard_counts)."""
    counts = read_shard_counts(shard_paths)
    return None if counts is None else sum(counts)


def balanced_shard_sizes(num_samples: int, max_count: int, min_shards: int) -> list[int] | None:
    """Samples per shard for a set of ``num_samples``: None (every shard ``max_count``, the last one smaller)
    for a set of at least ``min_shards`` x ``max_count`` samples; a smaller set is cut into ``min_shards``
    shards whose sizes differ by at most one (one sample each when there are fewer samples).

    Many loader processes read a set at once (ranks x workers): a small set in one shard gives whole
    shards to one of them only, and a training stream then cannot give each reader its own shards.
    """
    if max_count < 1 or min_shards < 1:
        raise ValueError(f"max_count and min_shards must be >= 1, got {max_count} and {min_shards}")
    if num_samples == 0 or num_samples >= min_shards * max_count:
        return None
    num_shards = max(1, min(min_shards, num_samples))
    base, extra = divmod(num_samples, num_shards)
    return [base + 1] * extra + [base] * (num_shards - extra)
