"""trainers.contrastive_loss against the written-out formulas, open_clip's ClipLoss and SigLipLoss, and real
2-process runs."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from trainers.contrastive_loss import clip_loss, siglip_loss

WORLD, PER_RANK, DIM, IN = 2, 4, 6, 5


def test_the_loss_is_the_written_out_formula_on_hand_made_embeddings():
    # two pairs in 2-D: image 0 at 0 degrees, image 1 at 90; text 0 at 30 degrees, text 1 at 120
    deg = math.radians
    images = [(1.0, 0.0), (0.0, 1.0)]
    texts = [(math.cos(deg(30)), math.sin(deg(30))), (math.cos(deg(120)), math.sin(deg(120)))]
    scale = 10.0
    cos = [[sum(a * b for a, b in zip(i, t)) for t in texts] for i in images]  # cos[i][j] = <image i, text j>

    def cross_entropy(rows):  # mean over rows of -log softmax at the diagonal
        return sum(-scale * row[k] + math.log(sum(math.exp(scale * v) for v in row)) for k, row in enumerate(rows)) / 2

    by_image = cross_entropy(cos)
    by_text = cross_entropy([[cos[i][j] for i in range(2)] for j in range(2)])
    expected = (by_image + by_text) / 2
    got = clip_loss(torch.tensor(images, dtype=torch.float64), torch.tensor(texts, dtype=torch.float64), scale)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert 0 < expected < math.log(2)  # the matching pairs are the closer ones: better than chance


def test_equals_open_clips_clip_loss():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(8, 16, generator=g, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(8, 16, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    reference = open_clip_loss.ClipLoss()(images, texts, scale)
    torch.testing.assert_close(clip_loss(images, texts, scale), reference, rtol=1e-12, atol=0)
    torch.testing.assert_close(clip_loss(images, texts, scale, local_loss=True), reference, rtol=1e-12, atol=0)


def test_features_of_different_shapes_are_an_error():
    with pytest.raises(ValueError, match=r"same shape \(N, D\); got \(4, 8\) and \(3, 8\)"):
        clip_loss(torch.zeros(4, 8), torch.zeros(3, 8), 1.0)
    with pytest.raises(ValueError, match=r"siglip_loss needs .* got \(4, 8\) and \(4, 8, 1\)"):
        siglip_loss(torch.zeros(4, 8), torch.zeros(4, 8, 1), 1.0, 0.0)


def test_siglip_is_the_written_out_sigmoid_loss_on_hand_made_embeddings():
    # SigLIP Algorithm 1: every (image, text) pair a binary problem; the sum over pairs divided by the batch
    deg = math.radians
    images = [(1.0, 0.0), (0.0, 1.0)]
    texts = [(math.cos(deg(30)), math.sin(deg(30))), (math.cos(deg(120)), math.sin(deg(120)))]
    scale, bias = 10.0, -3.0
    total = 0.0
    for i, image in enumerate(images):
        for j, text in enumerate(texts):
            logit = scale * sum(a * b for a, b in zip(image, text)) + bias
            label = 1.0 if i == j else -1.0
            total += math.log(1 + math.exp(-label * logit))  # -log sigmoid(label * logit)
    got = siglip_loss(torch.tensor(images, dtype=torch.float64), torch.tensor(texts, dtype=torch.float64),
                      scale, bias)
    assert got.item() == pytest.approx(total / 2, rel=1e-12)


def test_siglip_equals_open_clips_siglip_loss():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(8, 16, generator=g, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(8, 16, generator=g, dtype=torch.float64), dim=-1)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    reference = open_clip_loss.SigLipLoss()(images, texts, scale, bias)
    torch.testing.assert_close(siglip_loss(images, texts, scale, bias), reference, rtol=1e-12, atol=0)


# ---- the distributed gradients ----------------------------------------------------------------------------------

def _data():
    """A tiny two-tower model (one linear layer each) and the global batch, the same in every process."""
    g = torch.Generator().manual_seed(1)
    towers = {name: torch.randn(DIM, IN, generator=g, dtype=torch.float64) for name in ("image", "text")}
    batch = {name: torch.randn(WORLD * PER_RANK, IN, generator=g, dtype=torch.float64) for name in ("image", "text")}
    return towers, batch, math.log(1 / 0.07)


BIAS = -2.0


def _loss_and_grads(towers, batch, log_scale, variant="clip", siglip=None):
    """The loss and the gradients of the towers, the log-scale and (SigLIP) the bias. ``siglip``: the loss function
    of the SigLIP variant (ours by default, or open_clip's)."""
    params = {name: w.clone().requires_grad_(True) for name, w in towers.items()}
    scale = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
    features = {name: F.normalize(batch[name] @ params[name].T, dim=-1) for name in params}
    if variant == "siglip":
        loss = (siglip or siglip_loss)(features["image"], features["text"], scale.exp(), bias)
    else:
        loss = clip_loss(features["image"], features["text"], scale.exp(), local_loss=variant == "local")
    loss.backward()
    grads = {**{name: p.grad for name, p in params.items()}, "log_scale": scale.grad}
    return loss.detach(), grads | ({"bias": bias.grad} if variant == "siglip" else {})


def _ddp_loss_and_grads(*args):
    loss, grads = _loss_and_grads(*args)
    for grad in grads.values():  # what DDP does to every parameter's gradient
        dist.all_reduce(grad)
        grad /= WORLD
    return loss, grads


def _rank(rank, init_file, variant, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        towers, batch, log_scale = _data()
        mine = {name: rows[rank * PER_RANK:(rank + 1) * PER_RANK] for name, rows in batch.items()}
        loss, grads = _ddp_loss_and_grads(towers, mine, log_scale, variant)
        if variant == "siglip":  # open_clip's ring exchange of the texts, on the same rank
            from open_clip.loss import SigLipLoss
            results[f"open_clip{rank}"] = _ddp_loss_and_grads(towers, mine, log_scale, variant,
                                                              SigLipLoss(rank=rank, world_size=WORLD))
        # gather=False: this rank's pairs only, and no collective, so ranks may hold different numbers of them
        uneven = {name: F.normalize(rows[: rank + 2] @ towers[name].T, dim=-1) for name, rows in mine.items()}
        alone = clip_loss(uneven["image"], uneven["text"], math.exp(log_scale), gather=False)
        results[rank] = {"loss": loss, **grads, "alone": alone}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("variant", ["clip", "local", "siglip"])
def test_two_ranks_give_the_full_batch_loss_and_after_averaging_its_gradients(variant, tmp_path):
    towers, batch, log_scale = _data()
    full_loss, full_grads = _loss_and_grads(towers, batch, log_scale, variant)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(str(tmp_path / "init"), variant, results), nprocs=WORLD, join=True)
        results = dict(results)
    losses = [results[r]["loss"] for r in range(WORLD)]
    if variant == "clip":  # the full-batch loss on every rank
        for loss in losses:
            torch.testing.assert_close(loss, full_loss, rtol=1e-12, atol=0)
    else:  # each rank its own rows: the ranks' mean is the full-batch loss, and they differ
        torch.testing.assert_close(sum(losses) / WORLD, full_loss, rtol=1e-12, atol=0)
        assert not torch.equal(losses[0], losses[1])
    if variant == "siglip":  # each rank's loss and the averaged gradients are open_clip's on that rank
        for rank in range(WORLD):
            reference_loss, reference_grads = results[f"open_clip{rank}"]
            torch.testing.assert_close(losses[rank], reference_loss, rtol=1e-12, atol=0)
            for name, grad in reference_grads.items():
                torch.testing.assert_close(results[rank][name], grad, rtol=1e-10, atol=1e-14)
    for rank in range(WORLD):
        rows = {name: F.normalize(batch[name][rank * PER_RANK:rank * PER_RANK + rank + 2] @ towers[name].T, dim=-1)
                for name in towers}
        expected = clip_loss(rows["image"], rows["text"], math.exp(log_scale))  # one process: nothing to gather
        torch.testing.assert_close(results[rank]["alone"], expected, rtol=1e-12, atol=0)
        for name, grad in full_grads.items():
            torch.testing.assert_close(results[rank][name], grad, rtol=1e-10, atol=1e-14, msg=lambda m: f"{name}: {m}")
    assert full_grads["image"].abs().max() > 1e-3  # the comparison is of gradients that are there
