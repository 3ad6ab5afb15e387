"""Checkpoints: atomic writes, finding the checkpoint to resume from, and weight export.

A checkpoint is either a file (DDP, FSDP with full state dicts) or a directory that several ranks write
into (DeepSpeed). A directory cannot be renamed into place as a whole once every rank has written its part,
so it counts as complete only when it holds the marker ``prism_complete.json``: the writer removes the marker
before it starts and writes it, atomically, after every rank has finished (trainers/strategies.py).
"""

import json
import logging
import os
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors.torch import save_file

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
COMPLETE_MARKER = "prism_complete.json"


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """Yields a temporary name next to ``path`` to write to; once the block has written it, it is fsynced
    and renamed onto ``path``. Readers see the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # the rename itself must survive a crash too
    finally:
        tmp.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint next to its target under a temporary name, then renames it into place.

    Lightning's own save goes through an fsspec transaction whose temporary file lives in the system
    temp dir; moving it onto another filesystem is a copy, so a kill mid-copy leaves a truncated
    file under the real name. A rename within one directory cannot.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        if "://" in str(path):  # remote storage: fall back to Lightning's writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        with written_atomically(path) as tmp:
            torch.save(checkpoint, tmp)


def write_json_atomically(path: str | Path, obj: Any) -> Path:
    """JSON written under a temporary name in the same directory, fsynced, then renamed into place."""
    path = Path(path)
    with written_atomically(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    return path


def write_complete_marker(ckpt_dir: str | Path, info: dict[str, Any]) -> Path:
    """Declare a checkpoint directory complete; ``info`` must carry the integer ``global_step``."""
    if not isinstance(info.get("global_step"), int):
        raise ValueError(f"The completeness marker needs an integer 'global_step', got {info.get('global_step')!r}")
    return write_json_atomically(Path(ckpt_dir) / COMPLETE_MARKER, info)


def read_complete_marker(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """The marker of a checkpoint directory, or None when it is missing or unreadable (= incomplete)."""
    try:
        info = json.loads((Path(ckpt_dir) / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("global_step"), int):
        return None
    return info


def remove_complete_marker(ckpt_dir: str | Path) -> None:
    """Mark a checkpoint directory incomplete (before overwriting or deleting it); durable once this returns."""
    marker = Path(ckpt_dir) / COMPLETE_MARKER
    if marker.exists():
        marker.unlink()
        _fsync_dir(marker.parent)


def is_complete_checkpoint(path: str | Path) -> bool:
    """A file: a torch zip archive with its central directory (a truncated one has none).
    A directory: holds a readable completeness marker."""
    path = Path(path)
    if path.is_dir():
        return read_complete_marker(path) is not None
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def checkpoint_step(path: str | Path) -> int:
    """The global step a checkpoint was written at, read without loading its tensors
    (for a directory: from its completeness marker)."""
    path = Path(path)
    if path.is_dir():
        info = read_complete_marker(path)
        if info is None:
            raise ValueError(f"Checkpoint directory {path} is incomplete: {COMPLETE_MARKER} is missing or unreadable.")
        return info["global_step"]
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(state.get("global_step", -1))


def find_resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in a run directory: ``last``, ``step-*`` or an HPC checkpoint,
    each a file or (DeepSpeed) a directory.

    Candidates are ordered by the step recorded inside them (file times lie after a copy), and a
    checkpoint that does not open, or a directory without its completeness marker, is skipped with a
    warning, never resumed from.
    """
    run_dir = Path(run_dir)
    candidates = sorted((run_dir / CHECKPOINT_DIR).glob("*.ckpt")) + sorted(run_dir.glob("hpc_ckpt_*.ckpt"))
    best, best_key = None, None
    for path in candidates:
        if not is_complete_checkpoint(path):
            why = f" (no readable {COMPLETE_MARKER}: its save was cut off)" if path.is_dir() else ""
            log.warning("Ignoring incomplete checkpoint %s%s", path, why)
            continue
        try:
            step = checkpoint_step(path)
        except Exception as err:  # unreadable pickle: same as incomplete
            log.warning("Ignoring unreadable checkpoint %s (%s)", path, err)
            continue
        stamp = path / COMPLETE_MARKER if path.is_dir() else path  # a directory's own mtime moves with its files
        key = (step, stamp.stat().st_mtime)
        if best_key is None or key > best_key:
            best, best_key = path, key
    return best


def bring_last_up_to_date(run_dir: str | Path, newest: Path) -> None:
    """Make ``last.ckpt`` a copy of ``newest`` when it is older.

    A step's checkpoint and ``last`` are two writes; a kill between them leaves ``last`` one save behind.
    Training rewrites it at the next save, but a run whose newest checkpoint is already its final step
    trains no more and would keep the stale ``last``. Call on one rank, before fitting.
    """
    last = Path(run_dir) / CHECKPOINT_DIR / LAST
    if newest == last or (is_complete_checkpoint(last) and checkpoint_step(last) >= checkpoint_step(newest)):
        return
    log.info("%s is older than %s (a save was cut off): copying the newer one over it", last, newest)
    if newest.is_file():
        with written_atomically(last) as tmp:
            shutil.copyfile(newest, tmp)
        return
    # A directory is copied, not hard-linked: DeepSpeed rewrites its files in place on the next save.
    staging = last.with_name(f".{last.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(newest, staging)
    if last.is_dir():
        remove_complete_marker(last)
        shutil.rmtree(last)
    elif last.exists():
        last.unlink()
    os.replace(staging, last)
    _fsync_dir(last.parent)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, Any]) -> Path:
    """Atomic safetensors export; metadata values are JSON-encoded strings as the format requires."""
    path = Path(path)
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with written_atomically(path) as tmp:
        save_file(contiguous, str(tmp), metadata={k: json.dumps(v) for k, v in metadata.items()})
    return path


def save_timm_tower(tower: torch.nn.Module, state: dict[str, torch.Tensor], out_dir: str | Path, architecture: str,
                    image_size: int, model_args: dict[str, Any], prism: dict[str, Any]) -> Path:
    """A timm vision trunk without head, pooling or final norm as a timm model directory: ``model.safetensors``
    (``state``, timm's keys) and ``config.json`` in timm's layout, so that ``timm.create_model(
    config["architecture"], **config["model_args"])`` loads it strictly. ``model_args`` adds to the headless
    arguments (depth, LayerScale, RoPE reference); ``prism`` records where the tower came from."""
    data = {k: tower.pretrained_cfg[k] for k in ("mean", "std", "interpolation") if k in tower.pretrained_cfg}
    config = {"architecture": architecture, "num_classes": 0, "num_features": tower.embed_dim,
              "model_args": {"img_size": image_size, "num_classes": 0, "global_pool": "",
                             "use_post_transformer_norm": False, **model_args},
              "pretrained_cfg": {**data, "input_size": [3, image_size, image_size], "num_classes": 0},
              "prism": prism}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    save_safetensors(state, out_dir / "model.safetensors", {"architecture": architecture, "image_size": image_size})
    return out_dir

