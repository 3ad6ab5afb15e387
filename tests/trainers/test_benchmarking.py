"""trainers/benchmarking.py: FLOP formulas against performance.md, step timing on a fake clock, and the plain loop
against Lightning (the same weights after the same steps)."""

import copy
from types import SimpleNamespace

import pytest
import torch

import models
from trainers import benchmarking as bench
from trainers.build import LoggingConfig, TrainerConfig, build_trainer
from trainers.classification import ImageClassification
from trainers.mae import MAEPretraining
from trainers.weakly_supervised import WeaklySupervisedPretraining

pytestmark = pytest.mark.filterwarnings("ignore:.*smaller than the logging interval", "ignore:.*no `val_dataloader`")


# ---- FLOP formulas: the numbers of shared references performance.md §2 ---------------------------------------

def test_block_formula_by_hand():
    # N = 2 tokens, d = 3, m = 4: 8*2*9 + 4*4*2*9 + 4*4*3 = 144 + 288 + 48
    assert bench.vit_block_flops(2, 3) == 480
    # patch embed of one 2x2 patch into d = 3, then one block on 2 tokens, then a 5-class head: 2*1*12*3 + 480 + 30
    assert bench.vit_forward_flops(2, 2, 3, 1, num_classes=5) == 72 + 480 + 30


@pytest.mark.parametrize("patch, dim, depth, forward_gf", [(16, 768, 12, 35.13), (16, 1024, 24, 123.11),
                                                            (14, 1024, 24, 162.02), (14, 1280, 32, 334.59)])
def test_vit_forward_at_224_matches_performance_md(patch, dim, depth, forward_gf):
    assert bench.vit_forward_flops(224, patch, dim, depth) / 1e9 == pytest.approx(forward_gf, abs=0.005)


@pytest.mark.parametrize("patch, dim, depth, encoder_gf, decoder_gf, forward_gf, train_gf", [
    (16, 768, 12, 8.82, 10.75, 19.56, 58.7),     # MAE ViT-B/16
    (16, 1024, 24, 30.75, 10.76, 41.51, 124.5),  # MAE ViT-L/16
    (14, 1280, 32, 82.87, 14.26, 97.12, 291.4),  # MAE ViT-H/14
])
def test_mae_forward_at_224_matches_performance_md(patch, dim, depth, encoder_gf, decoder_gf, forward_gf, train_gf):
    encoder, decoder = bench.mae_forward_flops(224, patch, dim, depth)
    assert encoder / 1e9 == pytest.approx(encoder_gf, abs=0.005)
    assert decoder / 1e9 == pytest.approx(decoder_gf, abs=0.005)
    assert (encoder + decoder) / 1e9 == pytest.approx(forward_gf, abs=0.005)
    assert 3 * (encoder + decoder) / 1e9 == pytest.approx(train_gf, abs=0.05)


def test_mae_large_with_a_one_block_decoder_matches_performance_md():
    assert sum(bench.mae_forward_flops(224, 16, 1024, 24, decoder_depth=1)) / 1e9 == pytest.approx(32.28, abs=0.005)


def test_formula_reads_the_model_config_and_agrees_with_the_models_own_count():
    with torch.device("meta"):
        mae = models.create("mae_vit_base_patch16")
        vit = models.create("vit_base_patch16", num_classes=1000)
        regnet = models.create("regnety_200mf")
    mae_check = bench.flop_check(mae)
    assert mae_check["formula_forward_flops_per_image"] / 1e9 == pytest.approx(19.56, abs=0.005)
    assert "§2.2" in mae_check["formula_source"]
    vit_check = bench.flop_check(vit)
    assert vit_check["formula_forward_flops_per_image"] == pytest.approx(35.126120448e9 + 2 * 768 * 1000)
    for check in (mae_check, vit_check):  # two independent implementations of the same counting convention
        assert abs(check["relative_difference"]) < 1e-3
        assert check["train_flops_per_image"] == 3 * check["model_forward_flops_per_image"]
    cnn = bench.flop_check(regnet)
    assert cnn["formula_forward_flops_per_image"] is None and cnn["relative_difference"] is None
    assert cnn["model_forward_flops_per_image"] > 0


def test_spec_peak_by_device_name():
    assert bench.spec_peak("NVIDIA H200") == 989.4e12 and bench.spec_peak("NVIDIA H100 80GB HBM3") == 989.4e12
    assert bench.spec_peak("NVIDIA A100-SXM4-40GB") == 312e12 and bench.spec_peak("Tesla T4") is None


# ---- step timing -------------------------------------------------------------------------------------------

def _fake_clock(*ticks: float):
    ticks = iter(ticks)
    return lambda: next(ticks)


def test_step_clock_and_stats_on_a_fake_clock():
    clock = bench.StepClock("cpu", _fake_clock(10.0, 10.1, 10.3, 10.6, 11.0))
    for _ in range(5):
        clock.mark()
    assert clock.step_ms() == pytest.approx([100, 200, 300, 400])
    stats = bench.step_stats(clock.step_ms(), warmup_steps=1, batch_size=4)
    # timed: 200, 300 and 400 ms, 3 x 4 images in 0.9 s
    assert stats["timed_steps"] == 3 and stats["step_ms"] == pytest.approx([200, 300, 400])
    assert stats["images_per_sec"] == pytest.approx(12 / 0.9)
    assert (stats["step_ms_median"], stats["step_ms_min"], stats["step_ms_max"]) == pytest.approx((300, 200, 400))
    with pytest.raises(ValueError, match="No timed steps"):
        bench.step_stats([1.0, 2.0], warmup_steps=2, batch_size=4)


def test_step_timer_marks_every_batch_start_and_the_end_of_the_last_step():
    timer = bench.StepTimer("cpu", _fake_clock(0.0, 1.0, 3.0, 6.0))
    trainer = SimpleNamespace(global_step=0, max_steps=3)
    for batch_idx in range(3):
        timer.on_train_batch_start(trainer, None, {}, batch_idx)
        trainer.global_step += 1  # the optimizer step
        timer.on_train_batch_end(trainer, None, None, {}, batch_idx)
    assert timer.step_ms() == pytest.approx([1000, 2000, 3000])


def test_run_figures_and_ratio():
    memory = SimpleNamespace(bytes=123)
    flops, peak = {"train_flops_per_image": 1e9}, {"flops_per_sec": 1e11}
    report = bench.benchmark_report({}, flops, peak, 1, 10, lightning=([5.0, 100.0, 100.0], memory),
                                    plain=([5.0, 50.0, 50.0], memory))
    # Lightning: 20 images in 0.2 s = 100 img/s = 1e11 FLOP/s = MFU 1; plain: 200 img/s
    assert report["lightning"]["images_per_sec"] == pytest.approx(100)
    assert report["lightning"]["achieved_flops_per_sec"] == pytest.approx(1e11)
    assert report["lightning"]["mfu"] == pytest.approx(1.0) and report["plain"]["mfu"] == pytest.approx(2.0)
    assert report["ratio_lightning_over_plain"] == pytest.approx({"images_per_sec": 0.5, "step_ms_median": 2.0})
    assert report["plain"]["peak_memory_bytes"] == 123
    text = bench.format_report({**report, "how_measured": {"device": "x"},
                                "flops": {**flops, "model_forward_flops_per_image": 1e9 / 3,
                                          "formula_forward_flops_per_image": None, "formula_source": "none",
                                          "relative_difference": None},
                                "peak": {**peak, "dtype": "float32", "size": 8, "repetitions": 1, "seconds": 1.0}})
    assert "Lightning / plain" in text and "0.500" in text and "2.000" in text


def test_repeated_batch_serves_fresh_copies():
    batch = {"image": torch.zeros(2, 3, 4, 4), "hashtags": [["a"], ["b"]]}
    served = list(bench.RepeatedBatch(batch, 3))
    assert len(served) == 3 and len(bench.RepeatedBatch(batch, 3)) == 3
    served[0]["image"].add_(1)  # mixup and random erasing write into their input
    served[0]["hashtags"][0].append("c")
    assert batch["image"].abs().sum() == 0 and served[1]["image"].abs().sum() == 0 and batch["hashtags"][0] == ["a"]


def test_synthetic_batch_follows_the_batch_contract():
    batch = bench.synthetic_batch(4, 8, "cpu", num_classes=5, vocab=["x", "y"])
    assert batch["image"].shape == (4, 3, 8, 8) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64 and 0 <= int(batch["label"].min()) <= int(batch["label"].max()) < 5
    assert len(batch["hashtags"]) == 4 and all(1 <= len(t) <= 3 and set(t) <= {"x", "y"} for t in batch["hashtags"])


def test_plain_loop_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="bf16-mixed or 32-true"):
        bench.autocast_for("16-mixed", torch.device("cpu"))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="interval"):
        bench.optimizer_and_scheduler({"optimizer": optimizer,
                                       "lr_scheduler": {"scheduler": None, "interval": "epoch"}})


# ---- the plain loop trains exactly as Lightning does ------------------------------------------------------------

TINY = {"img_size": 16, "depth": 2, "embed_dim": 32, "num_heads": 2}
STEPS, BATCH = 4, 4


def _module(kind: str):
    torch.manual_seed(0)
    optim = {"warmup_steps": 1}
    if kind == "mae":  # random masks from the torch generator
        return MAEPretraining({"name": "mae_vit_tiny_patch8", **TINY, "decoder_embed_dim": 16, "decoder_depth": 1,
                               "decoder_num_heads": 2}, optim, 1e-3, STEPS), {}
    if kind == "finetune":  # mixup/CutMix (numpy), random erasing (python random), drop path (torch), layer decay
        return ImageClassification({"name": "vit_tiny_patch8", **TINY, "num_classes": 5, "global_pool": "avg",
                                    "drop_path_rate": 0.1}, optim, 1e-3, STEPS), {"num_classes": 5}
    vocab = [f"tag{i}" for i in range(6)]  # hashtag targets built on the host
    return WeaklySupervisedPretraining({"name": "vit_tiny_patch8", **TINY, "num_classes": 6}, optim, 1e-3, STEPS,
                                       vocab=vocab), {"vocab": vocab}


@pytest.mark.parametrize("kind", ["mae", "finetune", "swag"])
def test_plain_loop_makes_the_same_weights_as_lightning(kind, tmp_path):
    module, extra = _module(kind)
    plain = copy.deepcopy(module)
    start = {k: v.clone() for k, v in module.state_dict().items()}
    batches = bench.RepeatedBatch(bench.synthetic_batch(BATCH, 16, "cpu", seed=1, **extra), STEPS)
    timer = bench.StepTimer("cpu")
    trainer = build_trainer(
        TrainerConfig(max_steps=STEPS, accelerator="cpu", devices=1, precision="32-true", log_every_n_steps=1,
                      checkpoint_every_n_steps=STEPS + 1, val_every_n_steps=STEPS + 1),
        LoggingConfig(), tmp_path, callbacks=[timer], batch_size_per_device=BATCH, seed=7)
    trainer.fit(module, train_dataloaders=batches)
    trainer.loggers[0].experiment.finish()
    assert len(timer.step_ms()) == STEPS

    step_ms = bench.plain_loop(plain, batches, STEPS, "cpu", "32-true", seed=7)
    assert len(step_ms) == STEPS and all(t > 0 for t in step_ms)
    lightning, ours = module.state_dict(), plain.state_dict()
    assert lightning.keys() == ours.keys()
    moved = 0.0
    for key, value in lightning.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
        if value.is_floating_point():
            moved = max(moved, (value - start[key]).abs().max().item())
    assert moved > 1e-4  # the weights did train: agreement is not two untouched copies

    if kind == "mae":  # another seed draws other masks: the comparison above can tell
        other = copy.deepcopy(_module(kind)[0])
        bench.plain_loop(other, batches, STEPS, "cpu", "32-true", seed=8)
        assert any(not torch.allclose(other.state_dict()[k], v, rtol=1e-5, atol=1e-6) for k, v in lightning.items())


# ---- the GPU path ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_timing_peak_and_memory():
    device = torch.device("cuda")
    peak = bench.matmul_peak(device, min_seconds=0.2)
    assert peak["dtype"] == "bfloat16" and peak["size"] == 8192 and peak["repetitions"] >= 10
    assert peak["flops_per_sec"] > 1e12
    with bench.PeakMemory(device) as memory:
        x = torch.empty(256, 1024, 1024, dtype=torch.uint8, device=device)  # 256 MiB
        del x
    assert memory.bytes >= 256 * 2**20 and "cuda" in memory.kind
    module, extra = _module("mae")
    batches = bench.RepeatedBatch(bench.synthetic_batch(BATCH, 16, device, **extra), STEPS)
    step_ms = bench.plain_loop(module, batches, STEPS, device, "bf16-mixed", seed=0)
    assert len(step_ms) == STEPS and all(t > 0 for t in step_ms)
    assert next(module.parameters()).is_cuda
