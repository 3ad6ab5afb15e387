"""Shard specs: every accepted form, and the errors for specs that name nothing."""

import os

import fsspec
import pytest

from datamodules.shards import ShardSpecError, expand_shards


@pytest.fixture
def shard_dir(tmp_path):
    """tmp/train/train-00000{0..3}.tar, tmp/val/val-00000{0,1}.tar, plus a non-tar file to be ignored."""
    for split, n in (("train", 4), ("val", 2)):
        (tmp_path / split).mkdir()
        for i in range(n):
            (tmp_path / split / f"{split}-{i:06d}.tar").write_bytes(b"")
    (tmp_path / "train" / "train-index.json").write_text("{}")
    return tmp_path


def _train(root, *ids):
    return [str(root / "train" / f"train-{i:06d}.tar") for i in ids]


def test_single_file(shard_dir):
    path = _train(shard_dir, 2)[0]
    assert expand_shards(path) == [path]


def test_directory_lists_tar_files_sorted(shard_dir):
    assert expand_shards(str(shard_dir / "train")) == _train(shard_dir, 0, 1, 2, 3)


def test_glob(shard_dir):
    assert expand_shards(str(shard_dir / "train" / "train-00000[13].tar")) == _train(shard_dir, 1, 3)
    assert expand_shards(str(shard_dir / "train" / "*.tar")) == _train(shard_dir, 0, 1, 2, 3)


def test_braces(shard_dir):
    spec = str(shard_dir / "train" / "train-{000001..000003}.tar")
    assert expand_shards(spec) == _train(shard_dir, 1, 2, 3)


def test_double_colon_concatenates_in_order(shard_dir):
    val = str(shard_dir / "val" / "val-{000000..000001}.tar")
    spec = f"{val}::{_train(shard_dir, 3)[0]}"
    expected = [str(shard_dir / "val" / f"val-{i:06d}.tar") for i in (0, 1)] + _train(shard_dir, 3)
    assert expand_shards(spec) == expected


def test_file_url_is_a_local_path(shard_dir):
    spec = "file://" + str(shard_dir / "train" / "train-{000000..000001}.tar")
    assert expand_shards(spec) == _train(shard_dir, 0, 1)


def test_http_is_brace_expanded_but_not_checked():
    assert expand_shards("https://example.invalid/d/x-{00..02}.tar") == [
        "https://example.invalid/d/x-00.tar",
        "https://example.invalid/d/x-01.tar",
        "https://example.invalid/d/x-02.tar",
    ]


def test_pipe_is_passed_through_unchanged():
    spec = "pipe:aws s3 cp s3://bucket/train-{000..009}.tar -"
    assert expand_shards(spec) == [spec]


def test_remote_glob_goes_through_fsspec():
    fs = fsspec.filesystem("memory")
    for name in ("a-000.tar", "a-001.tar", "b-000.tar"):
        with fs.open(f"/prism-test-bucket/{name}", "wb") as f:
            f.write(b"")
    try:
        got = expand_shards("memory://prism-test-bucket/a-*.tar")
        assert [u.rsplit("/", 1)[-1] for u in got] == ["a-000.tar", "a-001.tar"]
        assert all(u.startswith("memory://") for u in got)
        with pytest.raises(ShardSpecError, match="matched nothing"):
            expand_shards("memory://prism-test-bucket/zzz-*.tar")
    finally:
        fs.rm("/prism-test-bucket", recursive=True)


@pytest.mark.parametrize(
    "spec, looked_for",
    [
        ("train/train-000009.tar", "the file"),
        ("train/nope-*.tar", "files matching the glob"),
        ("train/train-{000003..000004}.tar", "the file"),  # one brace member missing is an error too
        ("empty", "*.tar files in the directory"),
    ],
)
def test_spec_matching_nothing_is_a_clear_error(shard_dir, spec, looked_for):
    (shard_dir / "empty").mkdir()
    full = str(shard_dir / spec)
    with pytest.raises(ShardSpecError) as info:
        expand_shards(full)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert full in message and "matched nothing" in message
    assert looked_for in message
    assert "Example of a valid spec" in message


def test_empty_spec_is_an_error():
    with pytest.raises(ShardSpecError, match="Empty shard spec"):
        expand_shards("  ")


def test_relative_paths_work(shard_dir, monkeypatch):
    monkeypatch.chdir(shard_dir)
    assert expand_shards("val") == [os.path.join("val", "val-000000.tar"), os.path.join("val", "val-000001.tar")]

