import json
import shutil

import pytest
import torch
from safetensors import safe_open

from trainers.checkpoint import AtomicCheckpointIO, find_resume_checkpoint, is_complete_checkpoint, save_safetensors


def _ckpt(step: int) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((64, 64), float(step))}}


def test_atomic_save_leaves_no_temporary_and_keeps_the_old_file_when_writing_fails(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(_ckpt(3), path)
    assert torch.load(path, weights_only=True)["global_step"] == 3

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"global_step": 4, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 3  # the complete old file is untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_resume_picks_the_newest_complete_checkpoint_of_any_kind(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint(_ckpt(5), tmp_path / "checkpoints" / "step-000005.ckpt")
    io.save_checkpoint(_ckpt(10), tmp_path / "checkpoints" / "last.ckpt")
    io.save_checkpoint(_ckpt(12), tmp_path / "hpc_ckpt_1.ckpt")
    # a newer checkpoint cut off mid-write (a kill -9 of a non-atomic writer) must never be chosen
    io.save_checkpoint(_ckpt(20), tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "checkpoints" / "step-000020.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "full.ckpt").unlink()

    assert not is_complete_checkpoint(tmp_path / "checkpoints" / "step-000020.ckpt")
    assert find_resume_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"
    (tmp_path / "hpc_ckpt_1.ckpt").unlink()
    assert find_resume_checkpoint(tmp_path) == tmp_path / "checkpoints" / "last.ckpt"


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert find_resume_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert find_resume_checkpoint(tmp_path) is None


def test_safetensors_export_round_trip_with_metadata(tmp_path):
    tensors = {"a": torch.arange(6.0).view(2, 3).t(), "b": torch.ones(2)}  # a non-contiguous view too
    path = save_safetensors(tensors, tmp_path / "export" / "w.safetensors", {"step": 7, "kw": {"x": 1}})
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["kw"]) == {"x": 1}
        assert json.loads(f.metadata()["step"]) == 7
        assert torch.equal(f.get_tensor("a"), tensors["a"])
    assert [p.name for p in path.parent.iterdir()] == ["w.safetensors"]
