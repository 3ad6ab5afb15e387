"""Checkpoint files: atomic writes, finding the checkpoint to resume from, and weight export."""

import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors.torch import save_file

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"


def _replace_atomically(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a crash too
    finally:
        os.close(dir_fd)


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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(checkpoint, tmp)
            _replace_atomically(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def is_complete_checkpoint(path: Path) -> bool:
    """A torch checkpoint is a zip archive; a truncated one has no central directory."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def checkpoint_step(path: Path) -> int:
    """The global step a checkpoint was written at, read without loading its tensors."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(state.get("global_step", -1))


def find_resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in a run directory: ``last``, ``step-*`` or an HPC checkpoint.

    Candidates are ordered by the step recorded inside them (file times lie after a copy), and a
    checkpoint that does not open is skipped with a warning, never resumed from.
    """
    run_dir = Path(run_dir)
    candidates = sorted((run_dir / CHECKPOINT_DIR).glob("*.ckpt")) + sorted(run_dir.glob("hpc_ckpt_*.ckpt"))
    best, best_key = None, None
    for path in candidates:
        if not is_complete_checkpoint(path):
            log.warning("Ignoring incomplete checkpoint %s", path)
            continue
        try:
            step = checkpoint_step(path)
        except Exception as err:  # unreadable pickle: same as incomplete
            log.warning("Ignoring unreadable checkpoint %s (%s)", path, err)
            continue
        key = (step, path.stat().st_mtime)
        if best_key is None or key > best_key:
            best, best_key = path, key
    return best


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, Any]) -> Path:
    """Atomic safetensors export; metadata values are JSON-encoded strings as the format requires."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    try:
        save_file(contiguous, str(tmp), metadata={k: json.dumps(v) for k, v in metadata.items()})
        _replace_atomically(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

