"""The SWAG recipe end to end, run as a user runs it, on tiny settings; and its shipped configs."""

import json
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from datamodules.hashtags import Vocabulary
from recipes.cli import parse_config
from recipes.swag_pretrain import Config
from trainers.weakly_supervised import WeaklySupervisedPretraining

TINY = ["--data.batch_size", "4", "--data.num_workers", "0", "--data.image_size", "32", "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "3", "--trainer.val_every_n_steps", "2", "--trainer.checkpoint_every_n_steps", "2",
        "--data.val_batches", "2", "--trainer.log_every_n_steps", "1", "--optim.warmup_steps", "1"]
METRICS = ("precision@1", "precision@5", "zero_shot_top1")
CONFIGS = sorted((Path(__file__).resolve().parents[2] / "recipes" / "configs").glob("swag_*.yaml"))


def _summary(stdout: str) -> dict[str, str]:
    names = "|".join(re.escape(n) for n in ("run_dir", "checkpoint", "encoder", "wandb", *METRICS))
    return dict(re.findall(rf"^  ({names})\s+(\S+)$", stdout, flags=re.M))


@pytest.mark.slow
def test_train_export_and_rerun(run_recipe, tmp_path):
    run_dir = tmp_path / "swag"
    first = run_recipe("recipes.swag_pretrain", "--run_dir", str(run_dir), *TINY)
    out = _summary(first.stdout)
    assert set(out) == {"run_dir", "checkpoint", "encoder", "wandb", *METRICS}, first.stdout
    assert all(0.0 <= float(out[m]) <= 1.0 for m in METRICS)
    # the lr printed is blr x effective batch / 256
    assert f"adamw lr {4e-3 * 4 / 256:.3e} = blr 4.000e-03 x 4 / 256" in first.stdout + first.stderr

    # The vocabulary of the synthetic world: its class names are hashtags, and the run keeps the file.
    vocab = Vocabulary.load(run_dir / "hashtag_vocab.json")
    assert {"circle", "square", "heart"} <= set(vocab.tags) and vocab.class_names[0] == "circle"
    assert vocab.counts == sorted(vocab.counts, reverse=True) and min(vocab.counts) >= 5  # default min_count

    # The checkpoint loads back on its own, with its vocabulary and hashtag prior.
    ckpts = run_dir / "checkpoints"
    assert {p.name for p in ckpts.glob("*.ckpt")} == {"step-000002.ckpt", "step-000003.ckpt", "last.ckpt"}
    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3 and last["hashtag_vocab"] == vocab.tags
    module = WeaklySupervisedPretraining.load_from_checkpoint(ckpts / "last.ckpt", map_location="cpu")
    assert module.vocab == vocab.tags and module.model.head.out_features == len(vocab)
    assert torch.allclose(module.hashtag_prior, torch.tensor(vocab.training_prior(0.5)))

    # The export is the trunk without the hashtag head, timm keys, equal to the checkpoint's weights.
    encoder = load_file(out["encoder"])
    assert not any(k.startswith("head.") for k in encoder)
    with safe_open(out["encoder"], "pt") as f:
        kwargs = json.loads(f.metadata()["timm_kwargs"])
    timm.models.VisionTransformer(**kwargs).load_state_dict(encoder, strict=True)
    assert torch.equal(encoder["blocks.0.attn.qkv.weight"], last["state_dict"]["model.blocks.0.attn.qkv.weight"])

    # The same command again: resumes at max_steps, trains nothing, and still reports the same metrics.
    stamps = {p.name: p.stat().st_mtime_ns for p in ckpts.glob("*.ckpt")}
    second = run_recipe("recipes.swag_pretrain", "--run_dir", str(run_dir), *TINY)
    assert re.search(r"Resuming from \S+(step-000003|last)\.ckpt", second.stdout + second.stderr)
    assert {p.name: p.stat().st_mtime_ns for p in ckpts.glob("*.ckpt")} == stamps
    again = _summary(second.stdout)
    assert all(again[m] == out[m] for m in METRICS)  # validation is deterministic


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_swag_config_parses(path):
    cfg, _ = parse_config(Config, ["--config", str(path)])
    eff = cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes
    assert eff == 8192 and cfg.data.image_size == 224
    assert cfg.trainer.max_steps == 5_000_000_000 // eff == cfg.data.batches_per_epoch  # one epoch of ~5B samples
    assert cfg.data.max_vocab == 27_000  # SWAG#13
    assert cfg.optim.name == ("sgd" if cfg.model.name.startswith("regnety") else "adamw")


def test_the_shipped_configs_cover_the_paper_models():
    assert {parse_config(Config, ["--config", str(p)])[0].model.name for p in CONFIGS} >= {
        "vit_base_patch16", "vit_large_patch16", "vit_huge_patch14", "regnety_16gf"}


def test_help_documents_the_hashtag_settings(capsys):
    with pytest.raises(SystemExit):
        parse_config(Config, ["--help"])
    text = capsys.readouterr().out
    for flag in ("--data.min_count", "--data.balance_power", "--optim.name", "--eval.class_hashtags", "--init_from"):
        assert flag in text, flag
    assert "square-root balancing" in text
