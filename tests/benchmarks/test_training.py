"""benchmarks/training.py: the batches both loops get, the order of the runs, and the plain loop against Lightning
(the same weights after the same steps)."""

import copy

import pytest
import torch

from benchmarks import measure
from benchmarks import training as bench
from trainers.build import LoggingConfig, TrainerConfig, build_trainer
from trainers.classification import ImageClassification
from trainers.contrastive import ContrastivePretraining
from trainers.mae import MAEPretraining
from trainers.weakly_supervised import WeaklySupervisedPretraining

pytestmark = pytest.mark.filterwarnings("ignore:.*smaller than the logging interval", "ignore:.*no `val_dataloader`")


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


def test_the_loops_alternate_which_runs_first():
    assert bench.run_order(3, plain=True) == [(0, "lightning"), (0, "plain"), (1, "plain"), (1, "lightning"),
                                              (2, "lightning"), (2, "plain")]
    assert bench.run_order(2, plain=False) == [(0, "lightning"), (1, "lightning")]


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
    if kind == "pe":  # text tokens in the batch; the temperature's clamp after each step
        return ContrastivePretraining({"name": "pe_core_nano"}, optim, 1e-3, STEPS), {"context_length": 32}
    vocab = [f"tag{i}" for i in range(6)]  # hashtag targets built on the host
    return WeaklySupervisedPretraining({"name": "vit_tiny_patch8", **TINY, "num_classes": 6}, optim, 1e-3, STEPS,
                                       vocab=vocab), {"vocab": vocab}


@pytest.mark.parametrize("kind", ["mae", "finetune", "swag", "pe"])
def test_plain_loop_makes_the_same_weights_as_lightning(kind, tmp_path):
    module, extra = _module(kind)
    plain = copy.deepcopy(module)
    start = {k: v.clone() for k, v in module.state_dict().items()}
    batches = bench.RepeatedBatch(bench.synthetic_batch(BATCH, 16, "cpu", seed=1, **extra), STEPS)
    timer = measure.StepTimer("cpu")
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
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
        if value.is_floating_point():
            moved = max(moved, (value - start[key]).abs().max().item())
    assert moved > 1e-4  # the weights did train: agreement is not two untouched copies

    if kind == "mae":  # another seed draws other masks: the comparison above can tell
        other = copy.deepcopy(_module(kind)[0])
        bench.plain_loop(other, batches, STEPS, "cpu", "32-true", seed=8)
        assert any(not torch.allclose(other.state_dict()[k], v, rtol=1e-5, atol=1e-6) for k, v in lightning.items())


@pytest.mark.gpu
def test_plain_loop_on_cuda():
    device = torch.device("cuda")
    module, extra = _module("mae")
    batches = bench.RepeatedBatch(bench.synthetic_batch(BATCH, 16, device, **extra), STEPS)
    step_ms = bench.plain_loop(module, batches, STEPS, device, "bf16-mixed", seed=0)
    assert len(step_ms) == STEPS and all(t > 0 for t in step_ms)
    assert next(module.parameters()).is_cuda
