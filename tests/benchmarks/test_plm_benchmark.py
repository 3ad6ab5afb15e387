"""--trainer plm: the FLOP formula agrees with torch's own counter of a real training step (forward and backward,
every part trained and parts frozen) and with the 1B model's parameter count, the synthetic batch is the data side's
training batch padded to a fixed length, the plain loop trains PLM exactly as Lightning does, tokens/s follows from
the step times, and the GPU suite's PLM-1B case builds on the meta device. Timings never gate a test."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from batch_contract import IGNORE_INDEX
from benchmarks import gpu_suite as suite
from benchmarks import measure, training
from benchmarks.config import Config, ModelChoice
from benchmarks.methods import PLM_STAGE2, PLM_STAGE2_DATA, build_method, plm_step_flops
from datamodules.conversations import ConversationDataConfig
from recipes.benchmark import Config as RecipeConfig
from recipes.cli import parse_config
from trainers.build import LoggingConfig, TrainerConfig, build_trainer
from trainers.plm import PLMModelConfig, PLMTraining

pytestmark = pytest.mark.filterwarnings("ignore:.*smaller than the logging interval", "ignore:.*no `val_dataloader`")

VISION, PROJECTOR, LANGUAGE = ["vision"], ["projector"], ["language"]


def stage2(**overrides) -> PLMTraining:
    torch.manual_seed(0)
    return PLMTraining(PLMModelConfig(**{**PLM_STAGE2, **overrides}), {"warmup_steps": 0}, 1e-3, 10)


def unpadded_batch(module: PLMTraining, tiles: tuple[int, ...], text: int) -> dict:
    """One row per entry of ``tiles``, each with that many tiles' placeholders and ``text`` text tokens, no padding
    (the counter then sees exactly the real tokens), the last ``text // 2`` tokens labelled."""
    cfg, per_tile = module.model.cfg, module.model.tokens_per_tile
    length = max(tiles) * per_tile + text
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.image_token_id, (len(tiles), length), generator=g)
    for row, n in enumerate(tiles):
        ids[row, 1:1 + n * per_tile] = cfg.image_token_id
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -(text // 2):] = ids[:, -(text // 2):]
    return {"media": torch.randn(sum(tiles), 3, cfg.image_size, cfg.image_size, generator=g), "input_ids": ids,
            "labels": labels}


def counted_step(module: PLMTraining, batch: dict) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of one training step as torch's FlopCounterMode counts them. The math
    attention backend decomposes attention into bmm, which the counter knows on every device (see
    tests/models/flop_count.py: the fused CPU kernel has no formula and would count 0)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss = module.compute_loss(batch)
        forward = counter.get_total_flops()
        loss.backward()
    return forward, counter.get_total_flops()


@pytest.mark.parametrize("train", [["vision", "projector", "language"], PROJECTOR, LANGUAGE, VISION])
def test_step_flops_equal_torchs_counter_of_a_real_step(train):
    """Stage 2 (every part) and single parts trained: weight gradients only where weights train, input gradients
    only from the first trained part on, never for the pixels."""
    module = stage2(train=train, drop_path_rate=0.1 if "vision" in train else 0.0)
    tiles = (2, 3)  # unequal tile counts: rows of different lengths would need padding, so both rows get the longest
    batch = unpadded_batch(module, tiles, text=20)
    length = batch["input_ids"].shape[1]
    forward, total = counted_step(module, batch)
    formula = plm_step_flops(module.model, [length] * len(tiles), sum(tiles), train)
    assert formula["forward"] == pytest.approx(forward, rel=1e-9)
    assert formula["train"] == pytest.approx(total, rel=1e-9)


def test_training_is_not_three_forwards_when_parts_are_frozen():
    module = stage2(train=PROJECTOR, drop_path_rate=0.0)
    flops = plm_step_flops(module.model, [100], 4, PROJECTOR)
    assert flops["train"] < 3 * flops["forward"]  # the frozen vision tower runs forward only
    with pytest.raises(ValueError, match="unknown part"):
        plm_step_flops(module.model, [100], 4, ["decoder"])


def test_1b_decoder_costs_six_flops_per_matmul_weight_per_token_on_the_meta_device():
    """PaLM's 6N per token for the decoder, with N counted from the built model's own linear layers (and the output
    head; not the embedding lookup), against the formula written from the config."""
    with torch.device("meta"):
        module = PLMTraining(PLMModelConfig(name="plm_1b", **PLM_STAGE2))
    lm = module.model.language_model
    matmul = sum(m.weight.numel() for m in lm.modules() if isinstance(m, torch.nn.Linear))
    assert module.model.tokens_per_tile == 256 and lm.lm_head.weight.shape == (128256, 2048)
    one, two = (plm_step_flops(module.model, [n], 0, PLM_STAGE2["train"])["train"] for n in (1, 2))
    # per token 6N plus 3 x 4 n^2 d L of attention: (two - 4 * 12 d L) - (one - 12 d L) = 6N
    d, layers = 2048, 16
    assert (two - 48 * d * layers) - (one - 12 * d * layers) == 6 * matmul


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    """plm's method on the built-in world: its tokenizer trained once into a run directory."""
    run_dir = tmp_path_factory.mktemp("plm-bench")
    cfg = Config(trainer="plm", batch_size=3, warmup_steps=0, steps=3)
    _, method = build_method(cfg, 3, run_dir)
    return method


def test_synthetic_batch_is_the_data_sides_training_batch_padded_to_a_fixed_length(conversations):
    spec = conversations.synthetic["conversations"]
    batch = training.synthetic_batch(3, 64, "cpu", **conversations.synthetic)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape[1] % training.PAD_MULTIPLE == 0 and ids.shape[1] < mask.sum(1).max() + training.PAD_MULTIPLE
    per_tile = conversations.module.model.tokens_per_tile
    placeholders = ids == spec["image_token_id"]
    assert int(placeholders.sum()) == len(batch["media"]) * per_tile  # every tile's visual tokens, in the text
    assert bool((placeholders <= mask).all()) and bool((labels[~mask] == IGNORE_INDEX).all())
    assert bool((mask.cumsum(1) == mask.sum(1, keepdim=True).clamp(max=torch.arange(1, ids.shape[1] + 1))).all())
    assert batch["media"].dtype == torch.float32 and -1.0 <= float(batch["media"].min()) < float(
        batch["media"].max()) <= 1.0  # PE's mean = std = 0.5
    fixed = training.synthetic_batch(3, 64, "cpu", conversations={**spec, "sequence_length": 512})
    assert fixed["input_ids"].shape == (3, 512) and torch.equal(fixed["attention_mask"].sum(1), mask.sum(1))
    cost = conversations.batch_cost(batch)
    assert cost.tokens == int(mask.sum()) and cost.flops["train_flops_per_image"] > 0


def test_plain_loop_trains_plm_as_lightning_does(conversations, tmp_path):
    """Drop path draws from the torch generator: the same weights after the same steps need the same seeding."""
    steps, seed = 3, 0
    module = conversations.module
    plain, start = copy.deepcopy(module), {k: v.clone() for k, v in module.state_dict().items()}
    batches = training.RepeatedBatch(training.synthetic_batch(3, 64, "cpu", **conversations.synthetic), steps)
    trainer = build_trainer(
        TrainerConfig(max_steps=steps, accelerator="cpu", devices=1, precision="32-true", log_every_n_steps=1,
                      checkpoint_every_n_steps=steps + 1, val_every_n_steps=steps + 1),
        LoggingConfig(), tmp_path, callbacks=[measure.StepTimer("cpu")], batch_size_per_device=3, seed=seed)
    trainer.fit(module, train_dataloaders=batches)
    trainer.loggers[0].experiment.finish()
    training.plain_loop(plain, batches, steps, "cpu", "32-true", seed)
    lightning, moved = module.state_dict(), 0.0
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(value, lightning[key], rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
        moved = max(moved, float((lightning[key] - start[key]).abs().max()))
    assert moved > 1e-6  # they did train (lr 4e-5 warming up over 120 steps: small moves)


def test_token_rates_follow_the_step_times():
    # 2 timed steps of 500 ms for 4 conversations = 4 conversations/s; 1000 real tokens per step = 1000 tokens/s
    run = {"images_per_sec": 4.0}
    report = {"lightning": dict(run), "plain": None, "repeats": [{"lightning": dict(run), "order": ["lightning"]}],
              "flops": {"train_flops_per_image": 3e9, "source": "s"}}
    training.add_token_rates(report, 1000, 4)
    assert report["lightning"]["tokens_per_sec"] == report["repeats"][0]["lightning"]["tokens_per_sec"] == 1000.0
    assert report["flops"]["train_flops_per_token"] == 3e9 * 4 / 1000 and report["tokens_per_step"] == 1000
    assert "Lightning 1000" in training.token_lines(report) and "plain" not in training.token_lines(report)


def test_settings_that_cannot_run_are_refused(tmp_path):
    with pytest.raises(ValueError, match="takes 64 x 64 tiles: add --image_size 64"):
        build_method(Config(trainer="plm", image_size=32), 2, tmp_path)
    with pytest.raises(ValueError, match="--model.name must be one of plm_"):
        build_method(Config(trainer="plm", model=ModelChoice("pe_core_nano")), 2, tmp_path)
    with pytest.raises(ValueError, match="--data synthetic"):
        build_method(Config(trainer="plm", data="shards"), 2, tmp_path)
    with pytest.raises(ValueError, match="--sequence_length must be >= 1"):
        Config(trainer="plm", sequence_length=0)


def test_the_gpu_suites_plm_case_is_stage_2_of_the_1b_model_in_bf16(tmp_path):
    (case,) = [c for c in suite.make_cases(tmp_path) if c.part == "plm"]
    cfg, _ = parse_config(RecipeConfig, list(case.args))
    assert (cfg.trainer, cfg.model.name, cfg.image_size, cfg.precision) == ("plm", "plm_1b", 448, "bf16-mixed")
    assert cfg.plain and cfg.data == "synthetic" and case.kind == "training"
    with torch.device("meta"):  # the 1B stage-2 module builds without memory; its tiles are 448 px
        module = PLMTraining(PLMModelConfig(name="plm_1b", **PLM_STAGE2))
    assert module.model.cfg.image_size == cfg.image_size and all(p.requires_grad for p in module.parameters())
    data = ConversationDataConfig(**PLM_STAGE2_DATA, tokens_per_tile=module.model.tokens_per_tile, tile_size=448)
    assert data.vision_input == "thumb+tile" and data.max_length == 6144


@pytest.mark.gpu
def test_gpu_suite_runs_the_plm_part_end_to_end(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--part", "plm", "--smoke", "--run-root",
                           str(tmp_path / "runs"), "--out", str(out)],
                          cwd=suite.ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    record = json.loads((tmp_path / "runs" / "results.json").read_text())["cases"]["plm_1b_stage2"]
    assert record["status"] == "ok", record.get("error")
    report = record["report"]
    assert report["lightning"]["mfu"] > 0 and report["lightning"]["tokens_per_sec"] > 0
    assert "| plm_1b_stage2 |" in out.read_text() and "### Tokens" in out.read_text()
