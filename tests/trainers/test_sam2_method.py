"""The SAM 2 method: what freezing freezes, the optimizer groups against sam2's own optimizer construction, the
per-batch decisions, the decoder steps of the prompt simulation, image mode, activation checkpointing, and the
weights in and out in the official layouts."""

import copy

import pytest
import torch
from omegaconf import OmegaConf
from training.optimizer import construct_optimizer

from models.sam.sam2 import official_sam2_state
from tests.models.test_sam2_model import sam2_nano
from trainers.build import TrainerConfig
from trainers.optim import with_lr_scale
from trainers.sam2 import (
    OBJECTS_KEY,
    PARTS,
    SAM2ModelConfig,
    SAM2PromptConfig,
    SAM2Training,
    find_unused_parameters,
    model_parts,
    object_counts,
)
from trainers.sam_loss import MOSE_WEIGHTS, global_num_objects, sam2_loss

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 128
CORRECTED = {"prob_to_use_pt_input": 1.0, "prob_to_use_box_input": 0.0, "num_init_cond_frames": 1,
             "num_frames_to_correct": 2, "rand_frames_to_correct": False}
"""Every batch clicked on frame 0 and corrected there and on one other frame."""


def clip_batch(clips: int = 1, frames: int = 3, objects=(2,), side: int = SIDE, seed: int = 0) -> dict:
    """Random frames with moving rectangles as objects 1..K of each clip."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(clips, frames, side, side, dtype=torch.uint8)
    for b in range(clips):
        for k in range(1, objects[b] + 1):
            x, y = (int(v) for v in torch.randint(5, side // 2, (2,), generator=g))
            for t in range(frames):
                masks[b, t, y + 2 * t : y + 2 * t + side // 4, x + 3 * t : x + 3 * t + side // 5] = k
    return {"frames": torch.randn(clips, frames, 3, side, side, generator=g), "frame_masks": masks,
            "frame_valid": torch.ones(clips, frames, dtype=torch.bool)}


def method(seed: int = 0, **model) -> SAM2Training:
    torch.manual_seed(seed)
    return SAM2Training({"name": "sam2.1_hiera_nano", **model}, CORRECTED, {"lr": 1e-3, "warmup_steps": 0}, 1e-3, 10)


def test_objects_are_read_on_the_host_before_the_transfer():
    batch = clip_batch(2, objects=(2, 0))
    assert object_counts(batch["frame_masks"]) == [2, 0]
    assert SAM2Training().on_before_batch_transfer(dict(batch), 0)[OBJECTS_KEY] == [2, 0]


@pytest.mark.parametrize("part", PARTS)
def test_freezing_a_part_keeps_every_weight_of_it_while_the_rest_trains(part):
    module = method(freeze=[part])
    parts = model_parts(module.model)
    assert sorted(n for names in parts.values() for n in names) == sorted(n for n, _ in module.model.named_parameters())
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    optimizer = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for step in range(2):
        optimizer.zero_grad()
        module.compute_loss(clip_batch(seed=step)).backward()
        optimizer.step()
    after = dict(module.model.named_parameters())
    for name in parts[part]:
        assert not after[name].requires_grad and id(after[name]) not in in_optimizer, name
        assert torch.equal(after[name], before[name]), name
    for other in set(PARTS) - {part}:
        changed = [n for n in parts[other] if not torch.equal(after[n], before[n])]
        assert len(changed) > len(parts[other]) // 2, (other, len(changed), len(parts[other]))


def test_layer_decay_vision_rate_and_decay_exceptions_by_name():
    module = SAM2Training({}, {}, {"lr": 1e-3, "vision_lr_ratio": 0.6, "layer_decay": 0.9, "weight_decay": 0.1})
    groups = with_lr_scale(module.param_groups(), 1.0)
    by_name = {n: g for g in groups for n, p in module.model.named_parameters() for q in g["params"] if q is p}
    assert len(by_name) == len(list(module.model.parameters()))
    trunk = "image_encoder.trunk.model."
    expected_lr = {  # the nano trunk has 5 blocks: L + 1 = 6
        trunk + "patch_embed.proj.weight": 0.6 * 0.9**6, trunk + "blocks.0.attn.qkv.weight": 0.6 * 0.9**5,
        trunk + "blocks.2.mlp.fc1.weight": 0.6 * 0.9**3, trunk + "blocks.4.norm2.weight": 0.6 * 0.9**1,
        trunk + "pos_embed": 0.6, trunk + "pos_embed_window": 0.6, "image_encoder.neck.convs.0.conv.weight": 0.6,
        "sam_mask_decoder.iou_token.weight": 1.0, "memory_attention.layers.0.linear1.weight": 1.0,
        "no_mem_embed": 1.0}
    for name, lr in expected_lr.items():
        assert by_name[name]["lr"] == pytest.approx(lr, rel=1e-12), name
    spared = [trunk + "blocks.0.norm1.weight", trunk + "patch_embed.proj.bias", "memory_attention.layers.0.norm1.bias",
              "sam_mask_decoder.transformer.norm_final_attn.weight", "obj_ptr_proj.layers.0.bias"]
    decayed = ["sam_prompt_encoder.mask_downscaling.1.weight", "memory_encoder.fuser.layers.0.norm.weight",
               "no_mem_embed", "sam_prompt_encoder.point_embeddings.0.weight", trunk + "pos_embed"]
    assert all(by_name[n]["weight_decay"] == 0.0 for n in spared)
    assert all(by_name[n]["weight_decay"] == 0.1 for n in decayed)


class Constant:
    """A constant schedule for sam2's optimizer construction (its configs use fvcore's schedulers)."""

    def __init__(self, value: float):
        self.value = value

    def __call__(self, where: float) -> float:
        return self.value


def _scheduler(value: float, **names) -> dict:
    return {"scheduler": {"_target_": f"{__name__}.Constant", "value": value}, **names}


def test_every_parameters_rate_and_decay_equal_sam2s_mose_optimizer(tmp_path):
    """sam2 training/optimizer.py:construct_optimizer with the MOSE fine-tuning options, on sam2's own nano model."""
    torch.manual_seed(0)
    ref = sam2_nano()
    options = {"lr": [_scheduler(5e-6), _scheduler(3e-6, param_names=["image_encoder.*"])],
               "weight_decay": [_scheduler(0.1), _scheduler(0.0, param_names=["*bias*"],
                                                             module_cls_names=["torch.nn.LayerNorm"])]}
    modifiers = [{"_target_": "training.optimizer.layer_decay_param_modifier", "_partial_": True,
                  "layer_decay_value": 0.9, "apply_to": "image_encoder.trunk",
                  "overrides": [{"pattern": "*pos_embed*", "value": 1.0}]}]
    theirs = construct_optimizer(ref, OmegaConf.create({"_target_": "torch.optim.AdamW"}),
                                 OmegaConf.create(options), OmegaConf.create(modifiers)).optimizer
    ref_setting = {id(p): (g["lr"], g["weight_decay"]) for g in theirs.param_groups for p in g["params"]}
    module = SAM2Training({}, {}, {"lr": 5e-6, "vision_lr_ratio": 0.6, "layer_decay": 0.9, "weight_decay": 0.1})
    ours = {id(p): (g["lr"], g["weight_decay"]) for g in with_lr_scale(module.param_groups(), 5e-6)
            for p in g["params"]}
    # our name -> sam2's Parameter object, through the checkpoint mapping
    mapped = official_sam2_state(ref.state_dict(keep_vars=True), module.model)
    params = dict(module.model.named_parameters())
    assert len(ref_setting) == len(ours) == len(params)
    for name, param in params.items():
        lr, decay = ours[id(param)]
        ref_lr, ref_decay = ref_setting[id(mapped[name])]
        assert lr == pytest.approx(ref_lr, rel=1e-9) and decay == ref_decay, name


def test_the_decisions_are_the_same_on_every_rank_and_after_a_resume():
    ranks = [SAM2Training(seed=3), SAM2Training(seed=3)]
    plans = [[m.prompt_plan(8, step=s) for s in range(40)] for m in ranks]
    assert plans[0] == plans[1]
    assert [SAM2Training(seed=3).prompt_plan(8, step=s) for s in (17, 5)] == [plans[0][17], plans[0][5]]
    assert [SAM2Training(seed=4).prompt_plan(8, step=s) for s in range(40)] != plans[0]
    assert sum(p.use_points for p in plans[0]) not in (0, 40)  # both prompt kinds occur
    for plan in plans[0]:
        assert plan.init_cond_frames[0] == 0 and 1 <= len(plan.init_cond_frames) <= 2
        if plan.use_points:
            assert set(plan.init_cond_frames) <= set(plan.frames_to_correct) and len(plan.frames_to_correct) <= 2
            assert all(len(clicks) == 7 for clicks in plan.from_gt.values())
        else:
            assert not plan.frames_to_correct and not plan.box_frames
    # micro-batches of one optimizer step (gradient accumulation) get their own decisions
    assert any(ranks[0].prompt_plan(8, step=2, micro_batch=m) != plans[0][2] for m in range(1, 12))


def test_eight_supervised_steps_on_corrected_frames_one_elsewhere():
    module = method()
    plan = module.prompt_plan(4, step=0)
    steps, targets, count = module.simulate(clip_batch(frames=4))
    assert plan.frames_to_correct[0] == 0 and len(plan.frames_to_correct) == 2 and count == 2
    assert targets.shape == (4, 2, SIDE, SIDE)
    for t, frame in enumerate(steps):
        masks = [s.mask_logits.shape[1] for s in frame]
        if t == 0:  # a click: three candidates, one mask once a correction click joins it
            assert masks == [3] + [1] * 7
        elif t in plan.frames_to_correct:  # tracked (no click), one click, then single masks
            assert masks == [3, 3] + [1] * 6
        else:
            assert masks == [3]


def test_a_mask_prompt_is_the_frames_output_and_is_not_corrected():
    torch.manual_seed(0)
    module = SAM2Training({}, {"prob_to_use_pt_input": 0.0, "num_init_cond_frames": 1})
    batch = clip_batch(frames=3)
    steps, targets, _ = module.simulate(batch)
    assert [len(frame) for frame in steps] == [1, 1, 1]
    assert torch.equal(steps[0][0].mask_logits[:, 0], targets[0].float() * 20 - 10)


def test_the_loss_is_sam2_loss_of_the_simulated_steps():
    a = method()
    b = copy.deepcopy(a)
    batch = clip_batch(2, objects=(2, 1))
    torch.manual_seed(5)
    loss = a.compute_loss(batch)
    torch.manual_seed(5)
    steps, targets, count = b.simulate(batch)
    want = sam2_loss(steps, targets, global_num_objects(count, "cpu"), MOSE_WEIGHTS)
    assert count == 3 and torch.equal(loss, want["core_loss"])
    assert set(a.training_metrics()) == {"train/loss_mask", "train/loss_dice", "train/loss_iou", "train/loss_class"}


@pytest.mark.parametrize("name, side", [("sam2.1_hiera_nano", 128), ("sam_vit_nano", 256)])
def test_image_mode_is_sams_eleven_step_loop(name, side):
    torch.manual_seed(0)
    module = SAM2Training({"name": name, "mode": "image"})
    steps, targets, count = module.simulate(clip_batch(2, frames=1, objects=(1, 2), side=side))
    assert len(steps) == 1 and count == 3 and targets.shape == (1, 3, side, side)
    assert [s.mask_logits.shape[1] for s in steps[0]] == [3] + [1] * 10
    module.compute_loss(clip_batch(1, frames=1, side=side)).backward()
    with pytest.raises(ValueError, match="set --data.num_frames 1"):
        module.simulate(clip_batch(1, frames=2, side=side))


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    plain = method()
    checkpointed = copy.deepcopy(plain)
    checkpointed.model.set_grad_checkpointing(True)
    losses = []
    for module in (plain, checkpointed):
        torch.manual_seed(1)
        loss = module.compute_loss(clip_batch())
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (name, p), q in zip(plain.model.named_parameters(), checkpointed.model.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert SAM2Training({"grad_checkpointing": True}).model.image_encoder.trunk.model.grad_checkpointing


def test_export_loads_into_sam2s_build_and_back(tmp_path):
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    tiny = SAM2Training({"name": "sam2.1_hiera_tiny"})
    path = tiny.export(tmp_path / "tiny")["sam2"]
    official = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=str(path), device="cpu")  # strict
    theirs = "image_encoder.trunk.blocks.3.mlp.layers.0.weight"
    ours = "image_encoder.trunk.model.blocks.3.mlp.fc1.weight"
    assert torch.equal(official.state_dict()[theirs], tiny.model.state_dict()[ours])
    nano = SAM2Training()
    exported = nano.export(tmp_path / "nano")["sam2"]
    fresh = SAM2Training(seed=1)
    assert "official checkpoint" in fresh.init_from(exported)[0]
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.state_dict().values(), nano.model.state_dict().values()))


def test_an_official_checkpoint_of_the_other_version_is_refused_with_the_fix(tmp_path):
    old = SAM2Training({"version": "2.0"})
    path = old.export(tmp_path)["sam2"]
    with pytest.raises(ValueError, match=r"checkpoint is SAM 2.0 but the model is built as SAM 2.1.*version 2.0"):
        SAM2Training().init_from(path)
    assert "official" in SAM2Training({"version": "2.0"}).init_from(path)[0]


def test_configs_refuse_what_cannot_train():
    with pytest.raises(ValueError, match="unknown part"):
        SAM2ModelConfig(freeze=["trunk"])
    with pytest.raises(ValueError, match="mode image only"):
        SAM2ModelConfig(name="sam_vit_nano")
    with pytest.raises(ValueError, match="num_init_cond_frames <= num_frames_to_correct"):
        SAM2PromptConfig(num_init_cond_frames=3)
    with pytest.raises(ValueError, match=r"frames must be \(B, T, 3, 128, 128\)"):
        SAM2Training().simulate(clip_batch(side=64))


def test_ddp_looks_for_unused_parameters():
    unused = "ddp_find_unused_parameters_true"
    assert find_unused_parameters(TrainerConfig(strategy="ddp", devices=2)).strategy == unused
    assert find_unused_parameters(TrainerConfig(strategy="auto", devices=2, accelerator="cpu")).strategy == unused
    assert find_unused_parameters(TrainerConfig(strategy="auto", devices=1)).strategy == "auto"
    assert find_unused_parameters(TrainerConfig(strategy="fsdp", devices=2)).strategy == "fsdp"


def test_a_clip_made_only_of_mask_prompts_trains_nothing_and_still_steps():
    """Both frames of a 2-frame clip ground-truth mask prompts: the outputs are the masks, no weight can learn, and
    the step must still run backward (and DDP's reduction) with zero gradients. (1-frame clips always get clicks or
    a box, as in sam2's SAM2Train.prepare_prompt_inputs.)"""
    torch.manual_seed(0)
    module = SAM2Training(prompts={"prob_to_use_pt_input": 0.0, "num_init_cond_frames": 2,
                                   "rand_init_cond_frames": False})
    loss = module.compute_loss(clip_batch(1, frames=2, objects=(2,)))
    loss.backward()
    grads = [p.grad for p in module.model.parameters() if p.requires_grad]
    assert loss.requires_grad and float(loss) > 0  # the masks' own loss is still reported
    assert grads and all(g is not None and not g.any() for g in grads)
