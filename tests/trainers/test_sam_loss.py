"""The SAM 2 loss: hand-computed vectors, and parity of every term and of the gradients with sam2's own training
loss (facebookresearch/sam2 training/loss_fns.py:MultiStepMultiMasksAndIous)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainers.sam_loss import LOSS_KEYS, MOSE_WEIGHTS, StepPrediction, global_num_objects, sam2_loss

TARGET = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # one object, (O, H, W)


def _check(losses, expected):
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value, abs=1e-5), key


def test_single_step_vector():
    step = StepPrediction(torch.zeros(1, 1, 2, 2), torch.full((1, 1), 0.5), torch.zeros(1, 1))
    losses = sam2_loss([[step]], [TARGET], num_objects=1.0)
    # focal: ln2 * 0.5^2 * (0.25 + 3 * 0.75) / 4; dice: 1 - (1 + 1) / (2 + 1 + 1); nothing > 0 predicted: IoU 0
    _check(losses, {"loss_mask": 0.108304, "loss_dice": 0.5, "loss_iou": 0.5, "loss_class": 0.693147,
                    "core_loss": 3.859232})


def test_multimask_step_vector():
    logits = torch.tensor([[[[5.0, -5.0], [-5.0, -5.0]], [[5.0, 5.0], [5.0, 5.0]], [[-5.0, -5.0], [-5.0, -5.0]]]])
    step = StepPrediction(logits, torch.full((1, 3), 0.5), torch.full((1, 1), 2.0))
    losses = sam2_loss([[step]], [TARGET], num_objects=1.0)
    # candidate 0 is best; IoU errors |.5 - 1|, |.5 - .25|, |.5 - 0| averaged; class ln(1 + e^-2)
    _check(losses, {"loss_mask": 0.0, "loss_dice": 0.008884, "loss_iou": 0.416667, "loss_class": 0.126928,
                    "core_loss": 0.552483})


def test_an_absent_object_only_trains_the_object_score():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    ious = torch.rand(1, 3, requires_grad=True)
    losses = sam2_loss([[StepPrediction(logits, ious, torch.zeros(1, 1))]], [torch.zeros(1, 2, 2)], 1.0)
    _check(losses, {"loss_mask": 0.0, "loss_dice": 0.0, "loss_iou": 0.0, "loss_class": 0.693147,
                    "core_loss": 0.693147})
    mask_grad, iou_grad = torch.autograd.grad(losses["core_loss"], (logits, ious))
    assert not mask_grad.any() and not iou_grad.any()


def test_ties_go_to_the_first_candidate_and_only_it_learns_the_mask():
    logits = torch.tensor([[1.0, -2.0], [0.5, -1.0]]).expand(1, 2, 2, 2).clone().requires_grad_()
    step = StepPrediction(logits, torch.full((1, 2), 0.5), torch.zeros(1, 1))
    (grad,) = torch.autograd.grad(sam2_loss([[step]], [TARGET], 1.0)["core_loss"], logits)
    assert grad[0, 0].abs().min() > 0 and not grad[0, 1].any()


def test_terms_add_up_over_frames_and_steps_and_divide_by_num_objects():
    torch.manual_seed(1)
    step = StepPrediction(torch.randn(2, 3, 4, 4), torch.rand(2, 3), torch.randn(2, 1))
    target = torch.rand(2, 4, 4) > 0.5
    one = sam2_loss([[step]], [target], 1.0)
    many = sam2_loss([[step, step], [step]], torch.stack([target, target]), num_objects=torch.tensor(2.0))
    for key in (*LOSS_KEYS, "core_loss"):
        torch.testing.assert_close(many[key], one[key] * 3 / 2)


def test_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="iou_pred"):
        StepPrediction(torch.zeros(2, 3, 4, 4), torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="object_score_logits"):
        StepPrediction(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3), torch.zeros(1, 1))
    step = StepPrediction(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="targets"):
        sam2_loss([[step]], [torch.zeros(2, 4, 5)], 1.0)
    with pytest.raises(ValueError, match="frames"):
        sam2_loss([[step], [step]], [torch.zeros(2, 4, 4)], 1.0)
    with pytest.raises(ValueError, match="loss_class"):
        sam2_loss([[step]], [torch.zeros(2, 4, 4)], 1.0, weights={"loss_mask": 1, "loss_dice": 1, "loss_iou": 1})


def _case(dtype, seed=0, frames=2, objects=4, size=(12, 10), candidates=(3, 1, 3)):
    """Leaves for several frames x steps (multimask and single-mask steps mixed), and targets where object 1 is
    absent from every frame and object 3 from the first."""
    gen = torch.Generator().manual_seed(seed)
    leaves = []
    for _ in range(frames):
        leaves.append([(3 * torch.randn(objects, m, *size, generator=gen, dtype=dtype),
                        torch.rand(objects, m, generator=gen, dtype=dtype),
                        2 * torch.randn(objects, 1, generator=gen, dtype=dtype)) for m in candidates])
    leaves = [[tuple(t.requires_grad_() for t in step) for step in frame] for frame in leaves]
    targets = torch.rand(frames, objects, *size, generator=gen) > 0.6
    targets[:, 1] = False
    targets[0, 3] = False
    return leaves, targets


def _reference_losses(leaves, targets, supervise_all_iou, iou_use_l1):
    from training.loss_fns import MultiStepMultiMasksAndIous

    loss = MultiStepMultiMasksAndIous(dict(MOSE_WEIGHTS), supervise_all_iou=supervise_all_iou,
                                      iou_use_l1_loss=iou_use_l1, pred_obj_scores=True, focal_gamma_obj_score=0.0,
                                      focal_alpha_obj_score=-1)
    outs = [{"multistep_pred_multimasks_high_res": [s[0] for s in frame], "multistep_pred_ious": [s[1] for s in frame],
             "multistep_object_score_logits": [s[2] for s in frame]} for frame in leaves]
    return loss(outs, targets)


@pytest.mark.parametrize("dtype,supervise_all_iou,iou_use_l1", [(torch.float64, True, True),
                                                                (torch.float32, True, True),
                                                                (torch.float64, False, False)])
def test_matches_sam2_training_loss(dtype, supervise_all_iou, iou_use_l1):
    leaves, targets = _case(dtype)
    flat = [t for frame in leaves for step in frame for t in step]
    expected = _reference_losses(leaves, targets, supervise_all_iou, iou_use_l1)
    steps = [[StepPrediction(*step) for step in frame] for frame in leaves]
    num_objects = global_num_objects(targets.shape[1], "cpu")
    losses = sam2_loss(steps, targets, num_objects, supervise_all_iou=supervise_all_iou, iou_use_l1=iou_use_l1)
    assert set(losses) == {*LOSS_KEYS, "core_loss"} and all(v.dtype == dtype for v in losses.values())
    # upstream casts the targets to float32, so with float64 logits its focal term is computed in float32
    for key in losses:
        torch.testing.assert_close(losses[key], expected[key].to(dtype), rtol=1e-6, atol=1e-6)
    assert all(losses[key] > 0 for key in LOSS_KEYS)
    grads = torch.autograd.grad(losses["core_loss"], flat)
    expected_grads = torch.autograd.grad(expected["core_loss"], flat)
    worst = max((g - e).abs().max().item() for g, e in zip(grads, expected_grads))
    assert worst <= (1e-6 if dtype == torch.float64 else 1e-5)
    assert all(g.abs().max() > 0 for g in grads)


def test_global_num_objects_without_distributed():
    assert not dist.is_initialized()
    count = global_num_objects(0, "cpu")
    assert count.dtype == torch.float32 and count.shape == () and count.item() == 1.0
    assert global_num_objects(7, torch.device("cpu")).item() == 7.0


def _rank(rank, tmp_path, counts):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=rank, world_size=len(counts[0]))
    try:
        torch.save([global_num_objects(per_rank[rank], "cpu") for per_rank in counts], tmp_path / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_global_num_objects_is_the_mean_over_ranks_clamped(tmp_path):
    counts = [(3, 6), (1, 0), (0, 0)]  # per call, each rank's local count
    # forked ranks: two fresh interpreters would spend seconds importing torch
    mp.start_processes(_rank, args=(tmp_path, counts), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        assert [n.item() for n in torch.load(tmp_path / f"rank{rank}.pt")] == [4.5, 1.0, 1.0]


@pytest.mark.gpu
def test_loss_on_gpu_never_waits_for_the_device():
    leaves, targets = _case(torch.float32)
    leaves = [[tuple(t.detach().cuda().requires_grad_() for t in step) for step in frame] for frame in leaves]
    targets = targets.cuda()
    num_objects = global_num_objects(targets.shape[1], "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = sam2_loss([[StepPrediction(*s) for s in frame] for frame in leaves], targets, num_objects)
        losses["core_loss"].backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = _reference_losses([[tuple(t.detach().cpu() for t in s) for s in f] for f in leaves], targets.cpu(),
                                 True, True)
    torch.testing.assert_close(losses["core_loss"].cpu(), expected["core_loss"], rtol=1e-5, atol=1e-5)
