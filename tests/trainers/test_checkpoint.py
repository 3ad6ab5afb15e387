import json
import shutil

import pytest
import torch
from safetensors import safe_open

from trainers.checkpoint import (COMPLETE_MARKER, AtomicCheckpointIO, bring_last_up_to_date, checkpoint_step,
                                 find_resume_checkpoint, is_complete_checkpoint, read_complete_marker, save_safetensors, write_complete_marker)


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


def _ds_dir(path, step: int | None):
    """A checkpoint directory as DeepSpeed leaves it; marked complete when ``step`` is given."""
    (path / "checkpoint").mkdir(parents=True)
    (path / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"shard")
    (path / "latest").write_text("checkpoint")
    if step is not None:
        write_complete_marker(path, {"global_step": step, "format": "deepspeed"})
    return path


def test_directory_checkpoints_count_only_with_their_marker(tmp_path):
    io = AtomicCheckpointIO()
    ckpts = tmp_path / "checkpoints"
    io.save_checkpoint(_ckpt(10), ckpts / "step-000010.ckpt")  # a file from an earlier DDP run
    _ds_dir(ckpts / "last.ckpt", 12)
    _ds_dir(ckpts / "step-000016.ckpt", None)  # its save was cut off before the marker
    _ds_dir(tmp_path / "hpc_ckpt_2.ckpt", 14)

    assert is_complete_checkpoint(ckpts / "last.ckpt") and checkpoint_step(ckpts / "last.ckpt") == 12
    assert not is_complete_checkpoint(ckpts / "step-000016.ckpt")
    with pytest.raises(ValueError, match="incomplete.*prism_complete.json"):
        checkpoint_step(ckpts / "step-000016.ckpt")
    assert find_resume_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_2.ckpt"

    (tmp_path / "hpc_ckpt_2.ckpt" / COMPLETE_MARKER).write_text('{"global_step": 1')  # torn marker
    assert not is_complete_checkpoint(tmp_path / "hpc_ckpt_2.ckpt")
    assert find_resume_checkpoint(tmp_path) == ckpts / "last.ckpt"
    shutil.rmtree(ckpts / "last.ckpt")
    assert find_resume_checkpoint(tmp_path) == ckpts / "step-000010.ckpt"


def test_marker_is_written_atomically_and_needs_an_integer_step(tmp_path):
    marker = write_complete_marker(tmp_path, {"global_step": 7, "zero_stage": 2})
    assert marker.name == COMPLETE_MARKER and json.loads(marker.read_text())["zero_stage"] == 2
    assert read_complete_marker(tmp_path) == {"global_step": 7, "zero_stage": 2}
    assert [p.name for p in tmp_path.iterdir()] == [COMPLETE_MARKER]  # no temporary left behind
    with pytest.raises(ValueError, match="integer 'global_step'"):
        write_complete_marker(tmp_path, {"global_step": "7"})
    marker.write_text('{"global_step": "7"}')
    assert read_complete_marker(tmp_path) is None


def test_a_last_checkpoint_left_behind_by_a_kill_between_two_saves_is_brought_up_to_date(tmp_path):
    io = AtomicCheckpointIO()
    ckpts = tmp_path / "checkpoints"
    io.save_checkpoint(_ckpt(8), ckpts / "last.ckpt")
    io.save_checkpoint(_ckpt(12), ckpts / "step-000012.ckpt")  # killed before last.ckpt of step 12
    newest = find_resume_checkpoint(tmp_path)
    assert newest == ckpts / "step-000012.ckpt"
    bring_last_up_to_date(tmp_path, newest)
    assert checkpoint_step(ckpts / "last.ckpt") == 12
    assert torch.equal(torch.load(ckpts / "last.ckpt", weights_only=True)["state_dict"]["w"], torch.full((64, 64), 12.0))
    assert checkpoint_step(ckpts / "step-000012.ckpt") == 12  # the source is untouched
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step-000012.ckpt"]

    io.save_checkpoint(_ckpt(14), ckpts / "last.ckpt")  # a newer last is left alone
    bring_last_up_to_date(tmp_path, ckpts / "step-000012.ckpt")
    assert checkpoint_step(ckpts / "last.ckpt") == 14


def test_a_stale_last_directory_is_replaced_by_a_copy_of_the_newest(tmp_path):
    ckpts = tmp_path / "checkpoints"
    _ds_dir(ckpts / "last.ckpt", 8)
    _ds_dir(ckpts / "step-000012.ckpt", 12)
    (ckpts / "step-000012.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"step 12")
    bring_last_up_to_date(tmp_path, find_resume_checkpoint(tmp_path))
    assert checkpoint_step(ckpts / "last.ckpt") == 12
    copied = ckpts / "last.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt"
    assert copied.read_bytes() == b"step 12"
    copied.write_bytes(b"overwritten in place")  # as DeepSpeed's next save does: the source must not change
    assert (ckpts / "step-000012.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt").read_bytes() == b"step 12"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step-000012.ckpt"]
