"""python -m benchmarks.sam2 on tiny settings: the figures are consistent with what was asked (timed steps and runs,
clips and frames counted, ratios equal to the ratios of the reported rates), Prism's video predictor and sam2's give
the same masks under the same weights, and the plain loop trains SAM 2 exactly as Lightning does. Timings never
gate a test."""

import copy
import json
import math

import pytest
import torch

from benchmarks import measure
from benchmarks import sam2 as bench
from benchmarks import training
from benchmarks.config import Config, ModelChoice
from benchmarks.methods import StepCountingSAM2, build_method
from trainers.build import LoggingConfig, TrainerConfig, build_trainer
from trainers.sam2 import OBJECTS_KEY, SAM2ModelConfig, SAM2Training

pytestmark = pytest.mark.filterwarnings("ignore:.*smaller than the logging interval", "ignore:.*no `val_dataloader`")

FRAMES, OBJECTS = 3, 2


def test_synthetic_clips_follow_the_batch_contract():
    batch = training.synthetic_batch(2, 32, "cpu", seed=3, num_frames=FRAMES, objects=OBJECTS)
    assert batch["frames"].shape == (2, FRAMES, 3, 32, 32) and batch["frames"].dtype == torch.float32
    assert batch["frame_masks"].shape == (2, FRAMES, 32, 32) and batch["frame_masks"].dtype == torch.uint8
    assert batch["frame_valid"].all() and batch[OBJECTS_KEY] == [OBJECTS, OBJECTS]
    for clip in batch["frame_masks"]:  # every object in frame 0, ids 1..K only
        assert set(clip[0].unique().tolist()) == {0, 1, 2} and int(clip.max()) == OBJECTS
    assert not torch.equal(batch["frames"][0], batch["frames"][1])  # two different clips
    again = training.synthetic_batch(2, 32, "cpu", seed=3, num_frames=FRAMES, objects=OBJECTS)
    assert torch.equal(again["frames"], batch["frames"]) and torch.equal(again["frame_masks"], batch["frame_masks"])
    frames, ids = training.synthetic_video(FRAMES, OBJECTS, 32, seed=3)  # the batch's first clip, as uint8 RGB
    assert frames.shape == (FRAMES, 32, 32, 3) and torch.equal(torch.from_numpy(ids), batch["frame_masks"][0])


def test_video_part_reports_and_agrees_with_sam2(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "configure_cpu_threads", lambda *args: "the test's threads")
    output = tmp_path / "report.json"
    report = bench.main(["--part", "video", "--frames", "2", "--objects", str(OBJECTS), "--repeats", "2",
                         "--warmup", "0", "--run_dir", str(tmp_path), "--output", str(output)])
    assert json.loads(output.read_text()) == json.loads(json.dumps(report)) and "train" not in report
    video = report["video"]
    assert [r["order"] for r in video["repeats"]] == [["official", "prism"], ["prism", "official"]]
    for side in ("official", "prism"):
        figures = video[side]
        assert figures["runs"] == 2 and len(figures["propagation_s"]) == 2
        # frames/s counts video frames over every timed run; object-frames/s multiplies by the objects tracked
        assert figures["frames_per_sec"] == pytest.approx(2 * 2 / sum(figures["propagation_s"]))
        assert figures["object_frames_per_sec"] == pytest.approx(OBJECTS * figures["frames_per_sec"])
        for r in video["repeats"]:
            assert r[side] == pytest.approx(2 / figures["propagation_s"][r["repeat"]])
    assert 0 < video["prism"]["frame_read_ms"] < 1000 * min(video["prism"]["propagation_s"])
    ratios = [r["ratio"] for r in video["repeats"]]
    assert ratios == pytest.approx([r["prism"] / r["official"] for r in video["repeats"]])
    assert video["ratio_prism_over_official"]["frames_per_sec"]["median"] == pytest.approx(sum(ratios) / 2)
    agreement = video["agreement"]
    assert len(agreement["mask_iou_per_object"]) == OBJECTS and agreement["agree"]
    assert agreement["mask_iou_min"] > 0.999 and agreement["max_abs_logit_diff"] < 1e-3
    assert 0.01 < agreement["foreground_prism"] < 0.99  # masks with something in them: the IoU can tell
    assert "2 object(s) on frame 0, masks" == video["how_measured"]["prompts"]


def test_click_prompts_agree_with_sam2(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "configure_cpu_threads", lambda *args: "the test's threads")
    report = bench.main(["--part", "video", "--frames", "2", "--objects", "1", "--prompt", "click", "--repeats", "1",
                         "--warmup", "0", "--run_dir", str(tmp_path)])
    assert report["video"]["agreement"]["agree"] and (tmp_path / "benchmark_sam2.json").is_file()


@pytest.mark.slow
def test_train_part_reports_clips_and_frames(run_benchmark, tmp_path):
    output = tmp_path / "report.json"
    proc = run_benchmark("benchmarks.sam2", "--part", "train", "--frames", str(FRAMES), "--objects", str(OBJECTS),
                         "--batch_size", "1", "--steps", "2", "--warmup", "1", "--repeats", "1", "--run_dir",
                         str(tmp_path), "--output", str(output))
    train = json.loads(output.read_text())["train"]
    assert "Lightning / plain clips/s" in proc.stdout and "video" not in json.loads(output.read_text())
    assert train["how_measured"]["clip"] == f"{FRAMES} frames, {OBJECTS} objects"
    assert train["how_measured"]["batch_per_step"] == 1 and train["how_measured"]["model"] == bench.NANO
    for loop in ("lightning", "plain"):
        figures = train[loop]
        assert figures["timed_steps"] == 2 and len(figures["step_ms"]) == 2 and figures["runs"] == 1
        assert figures["clips_per_sec"] == pytest.approx(2 * 1 / (sum(figures["step_ms"]) / 1000))
        assert figures["frames_per_sec"] == pytest.approx(FRAMES * figures["clips_per_sec"])
        assert math.isfinite(figures["peak_memory_bytes"]) and figures["peak_memory_bytes"] > 0
    (repeat,) = train["repeats"]
    assert repeat["order"] == ["lightning", "plain"]
    assert repeat["ratio"] == pytest.approx(train["lightning"]["clips_per_sec"] / train["plain"]["clips_per_sec"])
    assert train["ratio_lightning_over_plain"]["clips_per_sec"]["median"] == pytest.approx(repeat["ratio"])


def test_plain_loop_trains_sam2_as_lightning_does(tmp_path):
    """The prompt decisions follow the step in the plain loop too: the same weights after steps that draw a mask
    prompt, another mask prompt and clicks with corrections (seed 0), unlike a module that repeats step 0's."""
    steps, seed = 3, 0
    torch.manual_seed(0)
    module = StepCountingSAM2(SAM2ModelConfig(multimask_output_for_tracking=False), total_steps=steps)
    plans = [module.prompt_plan(FRAMES, step=s) for s in range(steps)]
    assert len({(p.use_points, p.init_cond_frames, p.frames_to_correct) for p in plans}) == steps
    plain, repeating = copy.deepcopy(module), SAM2Training(module.model_cfg, total_steps=steps)
    repeating.load_state_dict(module.state_dict())
    batches = training.RepeatedBatch(training.synthetic_batch(1, 128, "cpu", num_frames=FRAMES, objects=OBJECTS),
                                     steps)
    trainer = build_trainer(
        TrainerConfig(max_steps=steps, accelerator="cpu", devices=1, precision="32-true", log_every_n_steps=1,
                      checkpoint_every_n_steps=steps + 1, val_every_n_steps=steps + 1),
        LoggingConfig(), tmp_path, callbacks=[measure.StepTimer("cpu")], batch_size_per_device=1, seed=seed)
    trainer.fit(module, train_dataloaders=batches)
    trainer.loggers[0].experiment.finish()
    training.plain_loop(plain, batches, steps, "cpu", "32-true", seed)
    training.plain_loop(repeating, batches, steps, "cpu", "32-true", seed)
    lightning = module.state_dict()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(value, lightning[key], rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    assert plain.plain_steps == steps
    assert any(not torch.allclose(repeating.state_dict()[k], v, rtol=1e-5, atol=1e-6) for k, v in lightning.items())


def test_settings_that_cannot_run_are_refused(tmp_path):
    with pytest.raises(SystemExit):  # argparse's error
        bench.parse_args(["--frames", "0"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.parse_args(["--device", "cuda"])
    with pytest.raises(ValueError, match="takes 128 x 128 frames: add --image_size 128"):
        build_method(Config(trainer="sam2", image_size=64), 2, tmp_path)
    with pytest.raises(ValueError, match="--model.name must be one of"):
        build_method(Config(trainer="sam2", model=ModelChoice("vit_tiny_patch8"), image_size=128), 2, tmp_path)
    assert bench.official_config("sam2.1_hiera_base_plus") == "configs/sam2.1/sam2.1_hiera_b+.yaml"
    assert bench.official_config("sam2_hiera_large") == "configs/sam2/sam2_hiera_l.yaml"
