"""Shard specs: turn what a user types after ``--data.train_shards`` into a list of shard URLs.

Accepted forms (any of them may be joined with ``::`` to concatenate lists)::

    /data/train-000000.tar                 one file
    /data/train/                           every *.tar in the directory, sorted
    /data/train-*.tar                      a glob
    /data/train-{000000..000099}.tar       brace notation (braceexpand)
    file:///data/train-{000..009}.tar      a local fsspec URL (treated as a local path)
    s3://bucket/train-{000..099}.tar       a remote fsspec URL; wildcards are globbed through fsspec
    https://host/train-{000..099}.tar      http(s): brace-expanded, never listed (servers cannot glob)
    pipe:aws s3 cp s3://bucket/x.tar -     a shell command, passed through unchanged

Local paths are checked here so that a typo fails at ``setup()``, before any GPU time is spent.
"""

from __future__ import annotations

import glob
import os
import re
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand

EXAMPLE_SPEC = (
    "/data/imagenet/train-{000000..000099}.tar (or a directory of .tar files, or a glob like /data/train-*.tar)"
)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_WILDCARDS = re.compile(r"[*?\[]")


class ShardSpecError(ValueError):
    """A shard spec that names no shards, or names them in a way we cannot read."""


def expand_shards(spec: str) -> list[str]:
    """Expand a shard spec (see the module docstring) into an ordered list of shard paths or URLs."""
    if not isinstance(spec, str) or not spec.strip():
        raise ShardSpecError(f"Empty shard spec {spec!r}. Example of a valid spec: {EXAMPLE_SPEC}")
    shards: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if part:
            shards.extend(_expand_one(part))
    if not shards:
        raise ShardSpecError(f"Shard spec {spec!r} names no shards. Example of a valid spec: {EXAMPLE_SPEC}")
    return shards


def _expand_one(part: str) -> list[str]:
    if part.startswith("pipe:"):
        # The command may itself contain braces or globs meant for the shell: leave it alone.
        return [part]
    match = _SCHEME.match(part)
    if match is None:
        return _expand_local(part, shown=part)
    scheme = match.group(1).lower()
    if scheme == "file":
        return _expand_local(url2pathname(urlparse(part).path), shown=part)
    urls = list(braceexpand.braceexpand(part))
    if scheme in ("http", "https"):
        return urls
    return [u for url in urls for u in _expand_remote(url, part)]


def _expand_local(pattern: str, shown: str) -> list[str]:
    out: list[str] = []
    for path in braceexpand.braceexpand(os.path.expanduser(pattern)):
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
            looked_for = f"*.tar files in the directory {path!r}"
        elif _WILDCARDS.search(path):
            found = sorted(p for p in glob.glob(path) if os.path.isfile(p))
            looked_for = f"files matching the glob {path!r}"
        else:
            found = [path] if os.path.isfile(path) else []
            looked_for = f"the file {path!r}"
        if not found:
            raise ShardSpecError(
                f"Shard spec {shown!r} matched nothing: looked for {looked_for}. "
                f"Check the path (cwd is {os.getcwd()!r}). Example of a valid spec: {EXAMPLE_SPEC}"
            )
        out.extend(found)
    return out


def _expand_remote(url: str, shown: str) -> list[str]:
    if not _WILDCARDS.search(url):
        # Not listed: checking every remote object at setup costs a round trip per shard.
        return [url]
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        found = sorted(fs.glob(path))
    except ImportError as exc:
        raise ShardSpecError(
            f"Shard spec {shown!r} needs an fsspec backend that is not installed ({exc}). "
            "Install it (s3fs for s3://, gcsfs for gs://) or list the shards with braces instead of a glob, "
            "e.g. s3://bucket/train-{000000..000099}.tar"
        ) from exc
    if not found:
        raise ShardSpecError(
            f"Shard spec {shown!r} matched nothing: fsspec found no objects for the glob {url!r}. "
            f"Example of a valid spec: s3://bucket/train-{{000000..000099}}.tar"
        )
    return [fs.unstrip_protocol(p) for p in found]

