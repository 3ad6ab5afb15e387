"""Strategy building (no CUDA needed to construct them) and the marked DeepSpeed checkpoint directories."""

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import DeepSpeedPrecision
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, StrategyRegistry
from timm.models.vision_transformer import Block
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

import models
from trainers import lightning_compat as compat
from trainers.checkpoint import COMPLETE_MARKER, checkpoint_step, find_resume_checkpoint, is_complete_checkpoint
from trainers.strategies import PrismDeepSpeedStrategy, build_strategy, describe_strategy

DEEPSPEED_NAMES = ["deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3",
                   "deepspeed_stage_3_offload"]


def _keys(tree) -> set[str]:
    if not isinstance(tree, dict):
        return set()
    return set(tree) | {k for v in tree.values() for k in _keys(v)}


def test_every_trainer_strategy_name_builds():
    from trainers.build import STRATEGIES

    for name in STRATEGIES:
        assert build_strategy(name, batch_size_per_device=4, precision="32-true") is not None
    with pytest.raises(ValueError, match="Unknown strategy 'deepspeed_stage_4'.*deepspeed_stage_3_offload.*fsdp"):
        build_strategy("deepspeed_stage_4", batch_size_per_device=4, precision="32-true")


@pytest.mark.parametrize("name", DEEPSPEED_NAMES)
def test_deepspeed_names_give_the_stage_and_offload_lightning_registers(name):
    # The reference is Lightning's own registry entry for the name, not our table.
    registered = StrategyRegistry[name]["init_params"]
    strategy = build_strategy(name, batch_size_per_device=8, precision="bf16-mixed", accumulate_grad_batches=4)
    assert isinstance(strategy, PrismDeepSpeedStrategy)
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == registered["stage"]
    assert ("offload_optimizer" in zero) == registered.get("offload_optimizer", False)
    assert ("offload_param" in zero) == registered.get("offload_parameters", False)
    assert strategy.config["train_micro_batch_size_per_gpu"] == 8  # PL#19460: not read from the loader
    assert "gradient_accumulation_steps" not in _keys(strategy.config)  # PL#19891: Lightning injects it
    # ZeRO-Offload takes our torch AdamW instead of refusing it
    assert strategy.config.get("zero_force_ds_cpu_optimizer", True) is not registered.get("offload_optimizer", False)


def _cpu_trainer(**kwargs) -> L.Trainer:
    """Carries the accumulation and clipping that Lightning copies into the DeepSpeed config at setup."""
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


def test_lightning_accepts_the_config_and_fills_accumulation_clipping_and_bf16():
    strategy = build_strategy("deepspeed_stage_2", batch_size_per_device=8, precision="bf16-mixed",
                              accumulate_grad_batches=4, gradient_clip_val=1.0)
    strategy.precision_plugin = DeepSpeedPrecision("bf16-mixed")
    # raises if the config already had gradient_accumulation_steps
    compat.deepspeed_config_for(strategy, _cpu_trainer(accumulate_grad_batches=4, gradient_clip_val=1.0))
    assert strategy.config["gradient_accumulation_steps"] == 4
    assert strategy.config["gradient_clipping"] == 1.0
    assert strategy.config["train_micro_batch_size_per_gpu"] == 8
    assert strategy.config["bf16"] == {"enabled": True} and "fp16" not in strategy.config


@pytest.mark.parametrize("precision, key", [("16-mixed", "fp16"), ("32-true", None)])
def test_other_deepspeed_precisions_map_to_fp16_or_nothing(precision, key):
    strategy = build_strategy("deepspeed_stage_1", batch_size_per_device=2, precision=precision)
    strategy.precision_plugin = DeepSpeedPrecision(precision)
    compat.deepspeed_config_for(strategy, _cpu_trainer())
    assert {k for k in ("fp16", "bf16") if strategy.config.get(k, {}).get("enabled")} == ({key} if key else set())


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "64-true"])
def test_deepspeed_refuses_precisions_it_does_not_honour(precision):
    with pytest.raises(ValueError, match=f"{precision}.*32-true, 16-mixed, bf16-mixed"):
        build_strategy("deepspeed_stage_2", batch_size_per_device=8, precision=precision)


def test_fsdp_full_shard_wraps_each_transformer_block_of_the_mae():
    strategy = build_strategy("fsdp", batch_size_per_device=8, precision="bf16-mixed")
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert compat.fsdp_state_dict_type(strategy) == "full" and not compat.fsdp_activation_checkpointing(strategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and strategy.kwargs["use_orig_params"]
    with torch.device("meta"):
        mae = models.create("mae_vit_tiny_patch8", img_size=64)
    wrapped = policy._run_policy(mae, set(), {})
    # ViT-Ti encoder: 12 blocks (models/vit.py "tiny" = 192 wide, 12 deep); its decoder: 4 blocks (models/mae.py)
    assert sum(isinstance(m, Block) for m in wrapped) == 12 + 4
    assert wrapped.keys() - {mae} == {m for m in mae.modules() if isinstance(m, Block)}


def test_fsdp_refuses_clipping_and_fp64_with_what_to_do():
    with pytest.raises(ValueError, match="gradient_clip_val.*deepspeed_stage_3"):
        build_strategy("fsdp", batch_size_per_device=8, precision="bf16-mixed", gradient_clip_val=1.0)
    with pytest.raises(ValueError, match="64-true.*fsdp"):
        build_strategy("fsdp", batch_size_per_device=8, precision="64-true")


def test_ddp_keeps_gradients_in_the_buckets_and_auto_stays_lightnings():
    for name, unused in [("ddp", False), ("ddp_find_unused_parameters_true", True)]:
        strategy = build_strategy(name, batch_size_per_device=8, precision="32-true")
        assert isinstance(strategy, DDPStrategy)
        assert compat.ddp_kwargs(strategy) == {"find_unused_parameters": unused, "gradient_as_bucket_view": True}
    assert build_strategy("auto", batch_size_per_device=8, precision="32-true") == "auto"
    with pytest.raises(ValueError, match="batch_size_per_device"):
        build_strategy("ddp", batch_size_per_device=0, precision="32-true")


def test_description_names_stage_offload_precision_and_batch():
    line = describe_strategy("deepspeed_stage_2_offload", "bf16-mixed", 32, 2)
    assert "ZeRO-2" in line and "CPU" in line and "bf16" in line and "32 x 2" in line
    assert "parameters" not in describe_strategy("deepspeed_stage_2_offload", "bf16-mixed", 32)
    assert "FULL_SHARD" in describe_strategy("fsdp", "bf16-mixed", 8)


# ---- marked checkpoint directories, with a stand-in for the DeepSpeed engine -----------------------------

class FakeEngine:
    """Writes what DeepSpeed writes (a 'latest' file and a tag folder); can die halfway like a killed job."""

    def __init__(self, die_after_first_file: bool = False):
        self.die = die_after_first_file
        self.marker_seen_while_writing: list[bool] = []
        self.client_states: list[dict] = []

    def save_checkpoint(self, save_dir, client_state, tag, exclude_frozen_parameters=False):
        save_dir = Path(save_dir)
        self.marker_seen_while_writing.append((save_dir / COMPLETE_MARKER).exists())
        self.client_states.append(client_state)
        (save_dir / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"module": {}}, save_dir / tag / "mp_rank_00_model_states.pt")
        if self.die:
            raise KeyboardInterrupt("killed mid-save")
        torch.save({}, save_dir / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        (save_dir / "latest").write_text(tag)


def _strategy(engine) -> PrismDeepSpeedStrategy:
    strategy = build_strategy("deepspeed_stage_2", batch_size_per_device=2, precision="32-true")
    strategy.model = engine  # what Lightning's setup leaves there: the engine
    return strategy


def _lightning_checkpoint(step: int) -> dict:
    return {"global_step": step, "epoch": 0, "state_dict": {"w": torch.ones(2)}, "optimizer_states": [{}]}


def test_save_marks_the_directory_only_after_the_engine_wrote_it(tmp_path):
    engine = FakeEngine()
    strategy = _strategy(engine)
    last = tmp_path / "checkpoints" / "last.ckpt"
    strategy.save_checkpoint(_lightning_checkpoint(4), last)
    strategy.save_checkpoint(_lightning_checkpoint(4), tmp_path / "checkpoints" / "step-000004.ckpt")
    strategy.save_checkpoint(_lightning_checkpoint(8), last)  # overwriting last.ckpt
    assert engine.marker_seen_while_writing == [False, False, False]  # the old marker went before writing
    assert "state_dict" not in engine.client_states[0]  # weights travel through DeepSpeed, not client state
    assert is_complete_checkpoint(last) and checkpoint_step(last) == 8
    assert find_resume_checkpoint(tmp_path) == last


def test_a_save_killed_midway_leaves_a_directory_that_is_never_resumed(tmp_path):
    ckpts = tmp_path / "checkpoints"
    _strategy(FakeEngine()).save_checkpoint(_lightning_checkpoint(4), ckpts / "step-000004.ckpt")
    _strategy(FakeEngine()).save_checkpoint(_lightning_checkpoint(4), ckpts / "last.ckpt")
    with pytest.raises(KeyboardInterrupt):
        _strategy(FakeEngine(die_after_first_file=True)).save_checkpoint(_lightning_checkpoint(8), ckpts / "last.ckpt")
    assert not is_complete_checkpoint(ckpts / "last.ckpt")
    with pytest.raises(ValueError, match="incomplete"):
        checkpoint_step(ckpts / "last.ckpt")
    assert find_resume_checkpoint(tmp_path) == ckpts / "step-000004.ckpt"


def test_remove_checkpoint_handles_directories_and_files(tmp_path):
    strategy = _strategy(FakeEngine())
    directory = tmp_path / "step-000002.ckpt"
    strategy.save_checkpoint(_lightning_checkpoint(2), directory)
    strategy.remove_checkpoint(directory)
    file = tmp_path / "step-000001.ckpt"
    file.write_bytes(b"x")
    strategy.remove_checkpoint(file)
    strategy.remove_checkpoint(tmp_path / "never-written.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_fsdp_full_shard_wraps_each_vision_block_and_decoder_layer_of_perception_lm():
    policy = build_strategy("fsdp", batch_size_per_device=8, precision="bf16-mixed").kwargs["auto_wrap_policy"]
    with torch.device("meta"):
        plm = models.create("plm_1b")
    wrapped = policy._run_policy(plm, set(), {})
    # PLM-1B: 23 kept blocks of PE-Core-L's tower, the 16 layers of Llama 3.2 1B
    assert len(plm.vision.blocks) == 23 and len(plm.language_model.model.layers) == 16
    assert wrapped.keys() - {plm} == {*plm.vision.blocks, *plm.language_model.model.layers}
