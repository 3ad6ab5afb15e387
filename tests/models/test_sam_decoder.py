"""SAM / SAM 2 prompt encoder and mask decoder: reference state dicts load strictly and every output equals the
official sam2 / segment-anything modules on random weights and embeddings (small 16x16 grid, 256-px image)."""

import pytest
import segment_anything.modeling as sam1_ref
import torch
from sam2.modeling.sam.mask_decoder import MaskDecoder as Sam2RefDecoder
from sam2.modeling.sam.prompt_encoder import PromptEncoder as Sam2RefPromptEncoder
from sam2.modeling.sam.transformer import TwoWayTransformer as Sam2RefTransformer

from models.sam.mask_decoder import MaskDecoder, MaskDecoderConfig
from models.sam.prompt_encoder import PromptEncoder, PromptEncoderConfig

D, GRID, IMAGE, BATCH = 256, 16, 256, 3
ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def perturb_(module: torch.nn.Module) -> None:
    """Noise on the parameters that start constant (norm weights, zero biases), so that all of them matter."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:  # LayerNorm / LayerNorm2d affine and all biases
                p.add_(0.1 * torch.randn_like(p))


def sam2_reference():
    """sam2's heads as sam2_base.py:_build_sam_heads builds them, with the SAM 2.1 flags and build_sam's
    dynamic-multimask overrides."""
    prompt = Sam2RefPromptEncoder(embed_dim=D, image_embedding_size=(GRID, GRID), input_image_size=(IMAGE, IMAGE),
                                  mask_in_chans=16)
    flags = {"use_high_res_features": True, "iou_prediction_use_sigmoid": True, "pred_obj_scores": True,
             "pred_obj_scores_mlp": True, "use_multimask_token_for_obj_ptr": True,
             "dynamic_multimask_via_stability": True, "dynamic_multimask_stability_delta": 0.05,
             "dynamic_multimask_stability_thresh": 0.98}
    transformer = Sam2RefTransformer(depth=2, embedding_dim=D, mlp_dim=2048, num_heads=8)
    decoder = Sam2RefDecoder(transformer_dim=D, transformer=transformer, num_multimask_outputs=3, iou_head_depth=3,
                             iou_head_hidden_dim=256, **flags)
    return prompt, decoder


def ours_from(ref_prompt, ref_decoder, prompt_cfg, decoder_cfg):
    prompt, decoder = PromptEncoder(prompt_cfg), MaskDecoder(decoder_cfg)
    prompt.load_state_dict(ref_prompt.state_dict(), strict=True)
    decoder.load_state_dict(ref_decoder.state_dict(), strict=True)
    return prompt.eval(), decoder.eval()


@pytest.fixture(scope="module")
def sam2_pair():
    torch.manual_seed(0)
    ref_prompt, ref_decoder = sam2_reference()
    perturb_(ref_prompt)
    perturb_(ref_decoder)
    cfg = PromptEncoderConfig(image_embedding_size=(GRID, GRID), input_image_size=(IMAGE, IMAGE))
    ours = ours_from(ref_prompt, ref_decoder, cfg, MaskDecoderConfig())
    return (ref_prompt.eval(), ref_decoder.eval()), ours


@pytest.fixture(scope="module")
def sam1_pair():
    torch.manual_seed(1)
    ref_prompt = sam1_ref.PromptEncoder(embed_dim=D, image_embedding_size=(GRID, GRID),
                                        input_image_size=(IMAGE, IMAGE), mask_in_chans=16)
    transformer = sam1_ref.TwoWayTransformer(depth=2, embedding_dim=D, mlp_dim=2048, num_heads=8)
    ref_decoder = sam1_ref.MaskDecoder(transformer_dim=D, transformer=transformer, num_multimask_outputs=3,
                                       iou_head_depth=3, iou_head_hidden_dim=256)
    perturb_(ref_prompt)
    perturb_(ref_decoder)
    cfg = PromptEncoderConfig.sam1(image_embedding_size=(GRID, GRID), input_image_size=(IMAGE, IMAGE))
    ours = ours_from(ref_prompt, ref_decoder, cfg, MaskDecoderConfig.sam1())
    return (ref_prompt.eval(), ref_decoder.eval()), ours


def make_prompts(kind: str, gen: torch.Generator, batch: int = BATCH) -> dict:
    """Random pixel-space prompts; labels mix positive, negative and (SAM 2) box-corner points."""
    coords = torch.rand(batch, 3, 2, generator=gen) * IMAGE
    corners = torch.sort(torch.rand(batch, 2, 2, generator=gen) * IMAGE, dim=1).values
    prompts = {"points": None, "labels": None, "boxes": None, "masks": None}
    if "points" in kind:
        prompts["points"], prompts["labels"] = coords, torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0]][:batch])
    if "box" in kind:
        prompts["boxes"] = corners.reshape(batch, 4)
    if "corners" in kind:  # a box sent as two points labelled 2 / 3, as SAM2ImagePredictor does
        prompts["points"] = torch.cat([corners, coords[:, :1]], dim=1)
        prompts["labels"] = torch.tensor([[2, 3, 1]] * batch)
    if "mask" in kind:
        prompts["masks"] = torch.randn(batch, 1, 4 * GRID, 4 * GRID, generator=gen)
    return prompts


def assert_close(ours, ref, what):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    diff = (ours - ref).abs().max().item() if ours.numel() else 0.0
    assert diff <= ATOL, f"{what}: max abs diff {diff:.3g}"


def run_sam2_reference(ref, prompts, inputs, multimask, repeat_image=False):
    ref_prompt, ref_decoder = ref
    points = None if prompts["points"] is None else (prompts["points"], prompts["labels"])
    sparse, dense = ref_prompt(points, prompts["boxes"], prompts["masks"])
    pe = ref_prompt.get_dense_pe()
    out = ref_decoder(inputs["image"], pe, sparse, dense, multimask_output=multimask, repeat_image=repeat_image,
                      high_res_features=[ref_decoder.conv_s0(inputs["s0"]), ref_decoder.conv_s1(inputs["s1"])])
    return (sparse, dense, pe), out


def run_ours(ours, prompts, inputs, multimask, repeat_image=False):
    prompt, decoder = ours
    sparse, dense = prompt(**prompts)
    pe = prompt.get_dense_pe()
    high_res = decoder.project_high_res_features(inputs["s0"], inputs["s1"])
    out = decoder(inputs["image"], pe, sparse, dense, multimask_output=multimask, repeat_image=repeat_image,
                  high_res_features=high_res)
    return (sparse, dense, pe), out


def sam2_inputs(gen: torch.Generator, batch: int) -> dict:
    return {"image": torch.randn(batch, D, GRID, GRID, generator=gen),
            "s0": torch.randn(batch, D, 4 * GRID, 4 * GRID, generator=gen),
            "s1": torch.randn(batch, D, 2 * GRID, 2 * GRID, generator=gen)}


def compare_sam2(ref_run, our_run):
    for name, a, b in zip(("sparse", "dense", "image_pe"), our_run[0], ref_run[0]):
        assert_close(a, b, name)
    for name, a, b in zip(("masks", "iou_pred", "sam_tokens_out", "object_score_logits"), our_run[1], ref_run[1]):
        assert_close(a, b, name)


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("kind", ["points", "box", "box+points", "corners", "mask", "mask+points"])
def test_sam2_parity(sam2_pair, kind, multimask):
    gen = torch.Generator().manual_seed(sum(map(ord, kind)))
    prompts = make_prompts(kind, gen)
    inputs = sam2_inputs(gen, BATCH)
    with torch.no_grad():
        compare_sam2(run_sam2_reference(sam2_pair[0], prompts, inputs, multimask),
                     run_ours(sam2_pair[1], prompts, inputs, multimask))


def test_sam2_parity_repeat_image_and_train_mode(sam2_pair):
    """One image for several prompt sets; in train mode the stability fallback is off in both."""
    gen = torch.Generator().manual_seed(7)
    prompts = make_prompts("box+points", gen)
    inputs = sam2_inputs(gen, 1)
    with torch.no_grad():
        compare_sam2(run_sam2_reference(sam2_pair[0], prompts, inputs, False, repeat_image=True),
                     run_ours(sam2_pair[1], prompts, inputs, False, repeat_image=True))
        for module in (*sam2_pair[0], *sam2_pair[1]):
            module.train()
        try:
            compare_sam2(run_sam2_reference(sam2_pair[0], prompts, inputs, False, repeat_image=True),
                         run_ours(sam2_pair[1], prompts, inputs, False, repeat_image=True))
        finally:
            for module in (*sam2_pair[0], *sam2_pair[1]):
                module.eval()


def test_sam2_dynamic_multimask_fallback_both_branches():
    """Threshold between the batch's stability scores, so some samples keep mask 0 and others fall back."""
    torch.manual_seed(3)
    ref_prompt, ref_decoder = sam2_reference()
    perturb_(ref_prompt)
    perturb_(ref_decoder)
    ref_prompt.eval()
    ref_decoder.eval()
    gen = torch.Generator().manual_seed(11)
    batch = 8
    prompts = make_prompts("box", gen, batch)
    inputs = sam2_inputs(gen, batch)
    with torch.no_grad():
        sparse, dense = ref_prompt(None, prompts["boxes"], None)
        high_res = [ref_decoder.conv_s0(inputs["s0"]), ref_decoder.conv_s1(inputs["s1"])]
        all_masks = ref_decoder.predict_masks(inputs["image"], ref_prompt.get_dense_pe(), sparse, dense, False,
                                              high_res)[0]
        scores = ref_decoder._get_stability_scores(all_masks[:, :1]).flatten().sort().values
    thresh = float((scores[batch // 2 - 1] + scores[batch // 2]) / 2)
    assert scores[0] < thresh < scores[-1], f"stability scores do not spread: {scores.tolist()}"
    ref_decoder.dynamic_multimask_stability_thresh = thresh
    cfg = PromptEncoderConfig(image_embedding_size=(GRID, GRID), input_image_size=(IMAGE, IMAGE))
    ours = ours_from(ref_prompt, ref_decoder, cfg, MaskDecoderConfig(dynamic_multimask_stability_thresh=thresh))
    with torch.no_grad():
        ref_run = run_sam2_reference((ref_prompt, ref_decoder), prompts, inputs, False)
        our_run = run_ours(ours, prompts, inputs, False)
    compare_sam2(ref_run, our_run)
    kept_first = torch.isclose(our_run[1].masks, all_masks[:, :1], atol=ATOL, rtol=0).flatten(1).all(1)
    assert kept_first.any() and not kept_first.all(), "both the kept and the fallback branch must occur"


def test_sam2_high_res_projection_is_the_reference_one(sam2_pair):
    (_, ref_decoder), (_, decoder) = sam2_pair
    gen = torch.Generator().manual_seed(5)
    inputs = sam2_inputs(gen, 1)
    with torch.no_grad():
        s0, s1 = decoder.project_high_res_features(inputs["s0"], inputs["s1"])
        assert_close(s0, ref_decoder.conv_s0(inputs["s0"]), "conv_s0")
        assert_close(s1, ref_decoder.conv_s1(inputs["s1"]), "conv_s1")


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("kind", ["points", "box", "box+points", "mask+points"])
def test_sam1_parity(sam1_pair, kind, multimask):
    """segment-anything runs one image against B prompt sets (repeat_image) and returns (masks, iou_pred)."""
    (ref_prompt, ref_decoder), (prompt, decoder) = sam1_pair
    gen = torch.Generator().manual_seed(sum(map(ord, kind)))
    prompts = make_prompts(kind, gen)
    image = torch.randn(1, D, GRID, GRID, generator=gen)
    points = None if prompts["points"] is None else (prompts["points"], prompts["labels"])
    with torch.no_grad():
        ref_sparse, ref_dense = ref_prompt(points, prompts["boxes"], prompts["masks"])
        ref_masks, ref_iou = ref_decoder(image, ref_prompt.get_dense_pe(), ref_sparse, ref_dense, multimask)
        sparse, dense = prompt(**prompts)
        out = decoder(image, prompt.get_dense_pe(), sparse, dense, multimask, repeat_image=True)
    assert_close(sparse, ref_sparse, "sparse")
    assert_close(dense, ref_dense, "dense")
    assert_close(out.masks, ref_masks, "masks")
    assert_close(out.iou_pred, ref_iou, "iou_pred")


def test_padding_point_only_without_box():
    torch.manual_seed(0)
    prompt = PromptEncoder(PromptEncoderConfig(image_embedding_size=(GRID, GRID), input_image_size=(IMAGE, IMAGE)))
    gen = torch.Generator().manual_seed(0)
    points = make_prompts("points", gen)
    box = make_prompts("box", gen)
    both = make_prompts("box+points", gen)
    assert prompt(**points)[0].shape == (BATCH, 3 + 1, D)
    padding = prompt(**points)[0][:, -1]
    assert torch.equal(padding, prompt.not_a_point_embed.weight.expand(BATCH, -1))
    assert prompt(**box)[0].shape == (BATCH, 2, D)
    assert prompt(**both)[0].shape == (BATCH, 3 + 2, D)
    sparse, dense = prompt()
    assert sparse.shape == (1, 0, D) and dense.shape == (1, D, GRID, GRID)


def test_box_corner_labels_equal_box_tokens_only_in_sam2_mode():
    """SAM 2 encodes a box as points labelled 2 / 3 with the same corner embeddings as a box prompt."""
    torch.manual_seed(0)
    sizes = {"image_embedding_size": (GRID, GRID), "input_image_size": (IMAGE, IMAGE)}
    sam2_prompt = PromptEncoder(PromptEncoderConfig(**sizes))
    sam1_prompt = PromptEncoder(PromptEncoderConfig.sam1(**sizes))
    sam1_prompt.load_state_dict(sam2_prompt.state_dict())
    boxes = make_prompts("box", torch.Generator().manual_seed(2))["boxes"]
    corners, labels = boxes.reshape(BATCH, 2, 2), torch.tensor([[2, 3]] * BATCH)
    with torch.no_grad():
        from_box = sam2_prompt(boxes=boxes)[0]
        assert_close(sam2_prompt(corners, labels)[0][:, :2], from_box, "corner points")
        assert not torch.allclose(sam1_prompt(corners, labels)[0][:, :2], from_box, atol=1e-3)
