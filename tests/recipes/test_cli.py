"""The recipe command line: the documented interface, config files, and clear errors before compute."""

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import models
import trainers.run
from recipes.cli import parse_config, run_command
from recipes.mae_prepretrain import Config, main

INTERFACE = ["--run_dir", "--seed", "--trainer.max_steps", "--trainer.checkpoint_every_n_steps", "--trainer.devices",
             "--trainer.num_nodes", "--trainer.strategy", "--trainer.precision", "--data.train_shards",
             "--data.val_shards", "--data.batch_size", "--data.num_workers", "--model.name", "--optim.blr"]
CONFIGS = sorted((Path(__file__).resolve().parents[2] / "recipes" / "configs").glob("*.yaml"))


def test_help_lists_the_interface_with_docstrings(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_config(Config, ["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in INTERFACE:
        assert flag in text, flag
    assert "Base learning rate" in text and "Optimizer steps to train for" in text


def test_dotted_overrides_and_print_config(capsys):
    cfg, yaml_text = parse_config(Config, ["--optim.blr", "3e-4", "--trainer.devices", "2", "--data.batch_size", "4"])
    assert (cfg.optim.blr, cfg.trainer.devices, cfg.data.batch_size) == (3e-4, 2, 4)
    assert "blr: 0.0003" in yaml_text
    with pytest.raises(SystemExit):
        parse_config(Config, ["--print_config", "--model.mask_ratio", "0.6"])
    assert "mask_ratio: 0.6" in capsys.readouterr().out


# The recipe a shipped config is for, by the start of its file name (the longest match wins).
RECIPE_BY_PREFIX = {"mae_": "mae_prepretrain", "maws_mae_": "mae_prepretrain", "swag_": "swag_pretrain",
                    "finetune_": "finetune", "linear_probe_": "linear_probe", "maws_vit_": "maws",
                    "pe_core_": "pe_pretrain", "sam2.1_": "sam2_train", "sam_vit_": "sam2_train", "plm_": "plm_train"}


def _recipe_of(path: Path):
    prefixes = [p for p in RECIPE_BY_PREFIX if path.name.startswith(p)]
    assert prefixes, f"{path.name}: name it after its recipe ({', '.join(RECIPE_BY_PREFIX)}...)"
    return importlib.import_module(f"recipes.{RECIPE_BY_PREFIX[max(prefixes, key=len)]}")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_parses(path):
    recipe = _recipe_of(path)
    cfg, _ = parse_config(recipe.Config, ["--config", str(path)])
    stages = [cfg.mae, cfg.swag, cfg.finetune, cfg.linear_probe] if recipe.__name__ == "recipes.maws" else [cfg]
    for stage in stages:
        assert stage.model.name in models.list_models(), f"{path.name}: unknown model {stage.model.name}"
        assert stage.trainer.max_steps > 1000 and getattr(stage.data, "tile_size", stage.data.image_size) >= 224


def test_shipped_pe_configs_have_the_published_settings():
    """LAMB at 2e-3, a 64K global batch, progressive resolution ending at the model's native size (Bolya et al.)."""
    for path in CONFIGS:
        if _recipe_of(path).__name__ == "recipes.pe_pretrain":
            cfg, _ = parse_config(_recipe_of(path).Config, ["--config", str(path)])
            assert (cfg.optim.name, cfg.optim.lr) == ("lamb", 2e-3), path.name
            assert cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes == 65536, path.name
            with torch.device("meta"):
                native = models.create(cfg.model.name).cfg.image_size
            sizes = [size for _, size in cfg.resolution]
            assert sizes == sorted(sizes) and sizes[-1] == cfg.data.image_size == native, path.name
            patch = 14 if cfg.model.name == "pe_core_large" else 16
            assert all(size % patch == 0 for size in sizes), path.name


def test_shipped_mae_configs_have_the_paper_settings():
    for path in CONFIGS:
        if _recipe_of(path).__name__ == "recipes.mae_prepretrain":
            cfg, _ = parse_config(Config, ["--config", str(path)])
            assert cfg.model.name.startswith("mae_vit_") and cfg.optim.blr == 1.5e-4, path.name


def test_paper_config_has_the_paper_numbers():
    cfg, _ = parse_config(Config, ["--config", str(CONFIGS[[p.name for p in CONFIGS].index("mae_vit_large_in1k.yaml")])])
    eff = cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes
    assert eff == 4096 and cfg.model.name == "mae_vit_large_patch16" and cfg.model.norm_pix_loss
    assert cfg.trainer.max_steps == 800 * (1281167 // 4096) and cfg.optim.warmup_steps == 40 * (1281167 // 4096)


@pytest.mark.parametrize("argv, message", [
    (["--trainer.strategy", "dpp"], "Unknown trainer.strategy 'dpp'"),
    (["--trainer.max_step", "3"], "max_step"),
    (["--model.mask_ratio", "1.0"], "mask_ratio"),
])
def test_bad_flags_exit_with_a_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_config(Config, argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_key_in_a_config_file_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_stepz: 10\n")
    with pytest.raises(SystemExit):
        parse_config(Config, ["--config", str(bad)])
    assert "max_stepz" in capsys.readouterr().err


def test_unknown_model_fails_before_any_data_or_compute(tmp_path):
    cfg, _ = parse_config(Config, ["--model.name", "mae_vit_bsae_patch16", "--run_dir", str(tmp_path / "r")])
    with pytest.raises(ValueError, match="mae_vit_base_patch16"):
        main(cfg)
    assert not (tmp_path / "r").exists()


def test_wrong_shard_path_fails_before_training_naming_the_spec(tmp_path):
    spec = str(tmp_path / "nowhere" / "train-{000000..000003}.tar")
    cfg, _ = parse_config(Config, ["--data.train_shards", spec, "--run_dir", str(tmp_path / "r")])
    with pytest.raises(ValueError, match="nowhere"):
        main(cfg)
    assert not (tmp_path / "r" / "checkpoints").exists()


@dataclass
class OneField:
    size: int = 1
    """A size."""


@pytest.fixture
def before_compute(monkeypatch):
    """A fresh process's state: no compute yet, no PRISM_TRACEBACK, a command line without flags."""
    monkeypatch.setattr(trainers.run, "_compute_started", False)
    monkeypatch.delenv("PRISM_TRACEBACK", raising=False)
    monkeypatch.setattr(sys, "argv", ["prog"])
    return monkeypatch


def refuse(cfg, config_yaml):
    raise FileNotFoundError(f"--init_from nowhere (size {cfg.size}) does not exist: pass a run directory")


def test_bad_input_before_compute_is_one_line_with_status_2(before_compute, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_command(refuse, OneField, None)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error: --init_from nowhere (size 1) does not exist: pass a run directory" in err
    assert "Traceback" not in err and "PRISM_TRACEBACK=1" in err


def test_prism_traceback_keeps_the_traceback(before_compute):
    before_compute.setenv("PRISM_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_command(refuse, OneField, None)


def test_an_error_once_compute_began_is_a_failure_with_its_traceback(before_compute):
    def fails_while_training(cfg):
        trainers.run.compute_begins()
        raise ValueError("a shape mismatch in step 7")

    with pytest.raises(ValueError, match="step 7"):
        run_command(fails_while_training, OneField, None, with_yaml=False)


def test_a_recipe_reports_bad_input_without_a_traceback(run_recipe, tmp_path):
    proc = run_recipe("recipes.pe_align_spatial", "--init_from", str(tmp_path / "missing"), "--teacher", "x.pt",
                      check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    missing = tmp_path / "missing"
    assert f"python -m recipes.pe_align_spatial: error: --init_from {missing} does not exist" in proc.stderr
