"""PerceptionLM end to end, run as a user runs it, on tiny settings: one stage trains, validates, exports a Hugging
Face directory equal to its checkpoint and resumes; the pipeline runs PE -> lm -> stages 1-3 with the parts each
stage freezes left bit-identical, stage 2 starting from stage 1 with only the LayerScale gammas new, and a rerun
that trains nothing; DDP on two CPU processes; and the errors before compute."""

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from datamodules.chat import BEGIN_OF_TEXT, END_HEADER, END_OF_TURN, IMAGE_TOKEN, START_HEADER
from datamodules.shard_writer import ShardWriter
from models.plm import load_hf
from recipes.cli import parse_config
from recipes.plm import Config as PipelineConfig
from recipes.plm import stages as pipeline_stages
from recipes.plm_train import Config as PLMTrainConfig
from trainers.handoff import load_state_dict
from trainers.plm import PE_TRUNK

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"

LOADER = ["--data.batch_size", "2", "--data.num_workers", "1", "--data.val_batches", "1"]
TINY = [*LOADER, "--trainer.accelerator", "cpu", "--trainer.log_every_n_steps", "1", "--optim.warmup_steps", "1",
        "--trainer.cpu_threads", "1"]


def _summary(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^  (\S+)\s+(\S+)$", stdout, flags=re.M))


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")]


def test_a_stage_trains_validates_exports_and_resumes(run_recipe, tmp_path):
    run_dir = tmp_path / "stage"
    args = ["--run_dir", str(run_dir), *TINY, "--trainer.val_every_n_steps", "2",
            "--trainer.checkpoint_every_n_steps", "2", "--model.train", "[projector, language]",
            "--data.val_batches", "100", "--data.val_tasks", "[image_caption, image_count, video_motion]"]
    out = _summary(run_recipe("recipes.plm_train", *args, "--trainer.max_steps", "2").stdout)
    assert {"hf", "pe_lang", "answers", "vqa_accuracy", "mcq_accuracy", "caption_cider", "wandb"} <= set(out)
    assert {k for k in out if k.startswith("acc_")} == {"acc_image_caption", "acc_image_count", "acc_video_motion"}
    assert 0 <= float(out["vqa_accuracy"]) <= 100 and 0 <= float(out["mcq_accuracy"]) <= 100
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    table = Path(out["answers"]).read_text()
    assert "| key | task | prediction | answer | right |" in table and "<|eot_id|>" not in table

    trained = load_state_dict(run_dir, prefix="model.")
    exported = load_hf(out["hf"]).state_dict()
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    assert json.loads((Path(out["hf"]) / "tokenizer_config.json").read_text())  # the tokenizer travels with it

    second = run_recipe("recipes.plm_train", *args, "--trainer.max_steps", "4")
    assert "Resuming from" in second.stdout + second.stderr
    steps = [step for step, _ in _losses(run_dir)]
    assert steps == [0, 1, 2, 3]  # the resumed run logs steps 2 and 3, none twice


def _stage_flags(name: str, steps: int) -> list[str]:
    flags = [f"--{name}.trainer.max_steps", str(steps), f"--{name}.trainer.val_every_n_steps", str(steps),
             f"--{name}.trainer.log_every_n_steps", "1", f"--{name}.trainer.cpu_threads", "1",
             f"--{name}.optim.warmup_steps", "1"]
    return flags + [flag.replace("--data.", f"--{name}.data.") for flag in LOADER]


@pytest.fixture(scope="module")
def pipeline(run_recipe_module, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plm") / "pipeline"
    args = ["--run_dir", str(run_dir), "--trainer.accelerator", "cpu", "--layer_scale_init", "0.1",
            "--drop_path_rate", "0.1", "--pe.resolution", "null",
            "--pe.data.image_size", "64", *_stage_flags("pe", 2), "--pe.data.batch_size", "8"]
    for name in ("lm", "stage1", "stage2", "stage3"):
        args += _stage_flags(name, 2)
    first = run_recipe_module("recipes.plm", *args, timeout=900)
    return run_dir, args, first


def _weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    return load_state_dict(stage_dir, prefix="model.")


def test_each_stage_trains_its_parts_and_leaves_the_frozen_ones_bit_identical(pipeline):
    run_dir, _, _ = pipeline
    pe = load_state_dict(run_dir / "pe")
    lm, stage1, stage2 = (_weights(run_dir / name) for name in ("lm", "stage1", "stage2"))
    changed = lambda a, b, prefix: {k for k in b if k.startswith(prefix) and not torch.equal(a[k], b[k])}  # noqa: E731
    # lm trains the decoder alone: the tower is PE-Core's first blocks, untouched
    tower = {k: v for k, v in lm.items() if k.startswith("vision.")}
    assert tower and all(torch.equal(v, pe[PE_TRUNK + k.removeprefix("vision.")]) for k, v in tower.items())
    # stage 1 trains the projector alone
    assert changed(lm, stage1, "projector.") and not changed(lm, stage1, "vision.")
    assert not changed(lm, stage1, "language_model.")
    # stage 2 trains everything
    assert changed(stage1, stage2, "vision.blocks.0.attn") and changed(stage1, stage2, "language_model.")


def test_stage_two_starts_from_stage_one_with_exactly_the_gammas_new(pipeline):
    run_dir, _, first = pipeline
    stage1, stage2 = _weights(run_dir / "stage1"), _weights(run_dir / "stage2")
    assert stage2.keys() - stage1.keys() == {f"vision.blocks.{i}.gamma_{j}" for i in range(4) for j in (1, 2)}
    assert not stage1.keys() - stage2.keys()
    assert "LayerScale new at 0.1 (missing from the source)" in first.stdout + first.stderr


def test_the_pipeline_tabulates_every_stage_and_a_rerun_trains_nothing(pipeline, run_recipe):
    run_dir, args, first = pipeline
    table = (run_dir / "results.md").read_text()
    assert table.splitlines()[0] == "| held-out | majority answer | text-only prior | lm | stage1 | stage2 | stage3 |"
    assert all(json.loads((run_dir / name / "stage.json").read_text())["run_dir"] for name in
               ("pe", "lm", "stage1", "stage2", "stage3"))
    again = run_recipe("recipes.plm", *args)
    assert (again.stdout + again.stderr).count("finished before") == 5
    assert "Starting a new run" not in again.stdout + again.stderr and "Resuming" not in again.stdout + again.stderr


def test_ddp_on_two_cpu_processes(run_recipe, tmp_path):
    run_dir = tmp_path / "ddp"
    proc = run_recipe("recipes.plm_train", "--run_dir", str(run_dir), *TINY, "--trainer.max_steps", "2",
                      "--trainer.val_every_n_steps", "2", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                      timeout=400)
    assert "Strategy: DDP" in proc.stderr
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def _shard(tmp_path: Path, turns: list[dict]) -> str:
    with ShardWriter(str(tmp_path / "shards"), "bad") as writer:
        writer.write({"__key__": "q0", "json": json.dumps({"conversations": turns, "task": "t"}).encode()})
    return str(tmp_path / "shards" / "bad-000000.tar")


@pytest.mark.parametrize("case", ["no answer", "visual budget", "no image token", "tile size"])
def test_bad_input_stops_before_compute_with_the_reason(case, run_recipe, tmp_path):
    args = [*TINY, "--trainer.max_steps", "2"]
    if case == "no answer":
        args += ["--data.train_shards", _shard(tmp_path, [{"from": "human", "value": "Hello?"}])]
        expected = "its conversation has no assistant turn (speakers ['human'])"
    elif case == "visual budget":
        args += ["--data.vision_input", "thumb+tile", "--data.max_length", "1000"]  # 16 tiles + thumbnail x 64
        expected = "gives 17 tile(s) (thumbnail included) x 64 tokens per tile (--data.tokens_per_tile) = 1088 visual"
    elif case == "no image token":
        tokenizer = tmp_path / "tokenizer"
        tokenizer.mkdir()
        vocab = {token: i for i, token in enumerate(["a", "[UNK]", BEGIN_OF_TEXT, START_HEADER, END_HEADER,
                                                     END_OF_TURN])}  # Llama 3's chat tokens, no <|image|>
        model = {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
        (tokenizer / "tokenizer.json").write_text(json.dumps({"version": "1.0", "added_tokens": [], "model": model}))
        args += ["--data.tokenizer", str(tokenizer)]
        expected = IMAGE_TOKEN
    else:
        args += ["--data.tile_size", "48"]
        expected = "plm_nano takes 64 px tiles, but --data.tile_size is 48"
    proc = run_recipe("recipes.plm_train", "--run_dir", str(tmp_path / "run"), *args, check=False)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-3000:]
    assert not list((tmp_path / "run").glob("checkpoints/*"))


# (steps, peak lr, warmup, global batch, sequence, tiles, frames, trained parts, pooling, LayerScale, drop path)
PUBLISHED = {1: (8000, 1e-4, 20, 512, 1280, 1, 8, ["projector"], 1, None, 0.0),
             2: (35000, 4e-5, 120, 2048, 6144, 16, 16, ["vision", "projector", "language"], 2, 0.1, 0.1),
             3: (21000, 4e-5, 120, 1024, 11520, 36, 32, ["vision", "projector", "language"], 2, 0.1, 0.1)}


@pytest.mark.parametrize("size", ["1b", "3b", "8b"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_shipped_configs_have_the_published_stage_settings(size, stage):
    """perception_models apps/plm/configs/stage_{1,2,3}: the 8B's stage 3 peaks at 1e-5 and decays weights by 0.05."""
    from recipes.cli import parse_config
    from recipes.plm_train import Config, fit_to_model

    cfg, _ = parse_config(Config, ["--config", str(CONFIGS / f"plm_{size}_stage{stage}.yaml")])
    steps, lr, warmup, batch, seq, tiles, frames, train, pool, layer_scale, drop_path = PUBLISHED[stage]
    lr = 1e-5 if (size, stage) == ("8b", 3) else lr
    t, d, m, o = cfg.trainer, cfg.data, cfg.model, cfg.optim
    assert (t.max_steps, o.lr, o.warmup_steps, d.batch_size * t.devices * t.num_nodes) == (steps, lr, warmup, batch)
    assert (d.max_length, d.max_num_tiles, d.max_video_frames, d.tile_size) == (seq, tiles, frames, 448)
    assert (m.name, m.train, m.pooling_ratio, m.layer_scale_init, m.drop_path_rate) == (f"plm_{size}", train, pool,
                                                                                         layer_scale, drop_path)
    assert (o.betas, o.lr_min_ratio, o.weight_decay, t.gradient_clip_val) == ((0.9, 0.95), 0.01,
                                                                             0.05 if size == "8b" else 0.01, 1.0)
    assert d.vision_input == ("vanilla" if stage == 1 else "thumb+tile") and cfg.seed == 777
    assert fit_to_model(m, d).tokens_per_tile == d.tokens_per_tile == 1024 // pool ** 2  # 32 x 32 patches of 14 px


def test_the_recipe_takes_a_list_of_sources_on_the_command_line():
    cfg, _ = parse_config(PLMTrainConfig, ["--init_from", "[runs/pe, llama-3.2-1b]"])
    assert cfg.init_from == ["runs/pe", "llama-3.2-1b"]
    assert parse_config(PLMTrainConfig, ["--init_from", "runs/plm/stage1"])[0].init_from == "runs/plm/stage1"


def test_the_pipeline_starts_stage_one_from_a_list_of_sources(tmp_path):
    cfg, _ = parse_config(PipelineConfig, ["--run_dir", str(tmp_path / "plm"), "--skip", "[lm]",
                                           "--stage1.init_from", "[pe_core_dir, llama_dir]"])
    planned = {stage.name: stage for stage in pipeline_stages(cfg)}
    assert list(planned) == ["pe", "stage1", "stage2", "stage3"]  # no lm warm-up: the Llama directory replaces it
    assert planned["stage1"].config.init_from == ["pe_core_dir", "llama_dir"]
    assert planned["stage2"].config.init_from == str(tmp_path / "plm" / "stage1")
    assert "from ['pe_core_dir', 'llama_dir']" in planned["stage1"].about


def test_an_unknown_stage_to_skip_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_config(PipelineConfig, ["--skip", "[stage4]"])
    assert "--skip ['stage4']: not a PLM stage; choose among lm, stage1, stage2, stage3" in capsys.readouterr().err
