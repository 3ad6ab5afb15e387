"""SAM: an official-layout checkpoint of segment-anything's own modules loads strictly into ``sam_vit_nano`` and
the image embedding, and every output of the image predictor, equal segment-anything's SamPredictor on a
non-square image; preprocessing equals the reference's PIL path pixel for pixel; the official sizes have the
reference's parameters and key layout; the key map names what does not fit, SAM 2 checkpoints included."""

from functools import partial

import numpy as np
import pytest
import segment_anything.modeling as ref_modeling
import torch
from sam2.modeling.sam.mask_decoder import MaskDecoder as Sam2MaskDecoder
from sam2.modeling.sam.prompt_encoder import PromptEncoder as Sam2PromptEncoder
from sam2.modeling.sam.transformer import TwoWayTransformer as Sam2Transformer
from segment_anything import (
    SamPredictor,
    build_sam_vit_b,
    build_sam_vit_h,
    build_sam_vit_l,
)
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

import models.sam.sam  # noqa: F401  (registers sam_vit_*)
from models.registry import create
from models.sam.sam import ImagePredictor, official_sam_state
from models.sam.transforms import preprocess, resize_image, resize_longest_side_size

ATOL = 1e-4
LOGIT_TIE = 1e-3  # masks may differ only where the logit is this close to the 0.0 threshold

# sam_vit_nano written as segment-anything arguments, independently of the module's table.
IMAGE, PATCH, WIDTH, DEPTH, HEADS, WINDOW, GLOBAL = 256, 16, 64, 4, 2, 6, (1, 3)
PROMPT_DIM, DECODER_MLP = 64, 512
GRID = IMAGE // PATCH


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_nano() -> ref_modeling.Sam:
    """segment-anything's Sam at the nano size, built as build_sam.py:_build_sam builds it, with the tensors that
    start constant (position embeddings, relative positions, norms, biases) moved off their initial values."""
    encoder = ref_modeling.ImageEncoderViT(
        img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=4,
        out_chans=PROMPT_DIM, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
        window_size=WINDOW, global_attn_indexes=GLOBAL)
    prompt = ref_modeling.PromptEncoder(embed_dim=PROMPT_DIM, image_embedding_size=(GRID, GRID),
                                        input_image_size=(IMAGE, IMAGE), mask_in_chans=16)
    transformer = ref_modeling.TwoWayTransformer(depth=2, embedding_dim=PROMPT_DIM, mlp_dim=DECODER_MLP, num_heads=8)
    decoder = ref_modeling.MaskDecoder(transformer_dim=PROMPT_DIM, transformer=transformer, num_multimask_outputs=3,
                                       iou_head_depth=3, iou_head_hidden_dim=PROMPT_DIM)
    sam = ref_modeling.Sam(encoder, prompt, decoder).eval()
    with torch.no_grad():
        for name, param in sam.named_parameters():
            if "pos_embed" in name or "rel_pos" in name:
                param.normal_(std=0.2)
            elif param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return sam


def follow_regions(sam: ref_modeling.Sam, logit_scale: float) -> ref_modeling.Sam:
    """Random transposed-conv kernels paint a 2 x 2 checkerboard over every mask; made constant over their taps,
    they give masks that follow the image's regions, and the scaled hypernetwork output puts logits well away from
    the threshold."""
    with torch.no_grad():
        for i in (0, 3):
            w = sam.mask_decoder.output_upscaling[i].weight
            w.copy_(w.mean((2, 3), keepdim=True).expand_as(w))
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(logit_scale)
            mlp.layers[-1].bias.mul_(logit_scale)
    return sam


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = reference_nano()
    checkpoint = {k: v.clone() for k, v in ref.state_dict().items()}  # what sam_vit_*.pth holds
    ours = create("sam_vit_nano").eval()
    ours.load_state_dict(official_sam_state(checkpoint, ours), strict=True)
    return ref, ours, checkpoint


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """Non-square: resized down to 256 x 171, so the filter, the padding and the crop all matter."""
    return np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def predictors(pair, image):
    ref, ours, _ = pair
    ref_predictor, our_predictor = SamPredictor(ref), ImagePredictor(ours)
    ref_predictor.set_image(image)
    our_predictor.set_image(image)
    return ref_predictor, our_predictor


def max_diff(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def test_resize_longest_side_size():
    # 1024 / 640 = 1.6: 480 * 1.6 = 768 exactly
    assert resize_longest_side_size(480, 640, 1024) == (768, 1024)
    # 1024 / 500 = 2.048: 333 * 2.048 = 681.984 -> 682
    assert resize_longest_side_size(500, 333, 1024) == (1024, 682)
    # 256 / 300: 200 * 0.8533 = 170.67 -> 171
    assert resize_longest_side_size(300, 200, 256) == (256, 171)
    # 1024 / 3 = 341.33: 1 * 341.33 -> 341
    assert resize_longest_side_size(1, 3, 1024) == (341, 1024)


@pytest.mark.parametrize("shape, size", [((300, 200), (256, 171)), ((97, 130), (191, 256))])
def test_resize_image_equals_the_references_pil_path(shape, size):
    """uint8 resizing equals torchvision's PIL path, which segment-anything's ResizeLongestSide.apply_image takes."""
    from torchvision.transforms.functional import resize, to_pil_image
    img = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected = np.array(resize(to_pil_image(img), list(size)))
    got = resize_image(torch.from_numpy(img).permute(2, 0, 1), size).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expected)


def test_preprocess_equals_reference(pair, image):
    ref, _, _ = pair
    resized = torch.as_tensor(ResizeLongestSide(IMAGE).apply_image(image)).permute(2, 0, 1)[None]
    expected = ref.preprocess(resized.float())
    got, input_size, original_size = preprocess(image, IMAGE)
    assert (input_size, original_size) == ((256, 171), (300, 200))
    assert torch.equal(got, expected)


def test_image_embedding(pair, predictors):
    ref, ours, _ = pair
    x = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_diff(ours.encode_image(x), ref.image_encoder(x)) <= ATOL
    ref_predictor, our_predictor = predictors
    assert max_diff(our_predictor.get_image_embedding(), ref_predictor.get_image_embedding()) <= ATOL


LOW_RES_MASK = np.random.default_rng(3).standard_normal((1, 4 * GRID, 4 * GRID)).astype(np.float32)
PROMPTS = {
    "none": {},
    "point": dict(point_coords=np.array([[120.0, 80.0]]), point_labels=np.array([1])),
    "points_negative": dict(point_coords=np.array([[120.0, 80.0], [40.5, 250.25]]), point_labels=np.array([1, 0])),
    "box": dict(box=np.array([30.0, 60.0, 170.0, 240.0])),
    "box_point": dict(box=np.array([30.0, 60.0, 170.0, 240.0]), point_coords=np.array([[100.0, 150.0]]),
                      point_labels=np.array([1])),
    "mask": dict(mask_input=LOW_RES_MASK),
    "mask_point": dict(point_coords=np.array([[60.0, 200.0]]), point_labels=np.array([1]), mask_input=LOW_RES_MASK),
}


@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
@pytest.mark.parametrize("kind", list(PROMPTS))
def test_predictor_equals_sam_predictor(predictors, kind, multimask):
    ref_predictor, our_predictor = predictors
    prompts = dict(PROMPTS[kind], multimask_output=multimask)
    ref_masks, ref_iou, ref_low = ref_predictor.predict(**prompts)
    masks, iou, low = our_predictor.predict(**prompts)
    ref_logits, _, _ = ref_predictor.predict(**prompts, return_logits=True)
    logits, _, _ = our_predictor.predict(**prompts, return_logits=True)
    assert masks.dtype == np.bool_ and masks.shape == ref_masks.shape == (3 if multimask else 1, 300, 200)
    assert max_diff(iou, ref_iou) <= ATOL
    assert max_diff(low, ref_low) <= ATOL
    assert max_diff(logits, ref_logits) <= ATOL
    differ = masks != ref_masks
    assert np.all(np.abs(ref_logits[differ]) < LOGIT_TIE), f"{differ.sum()} mask pixels differ away from the threshold"


def test_decode_groups_prompt_sets_by_image(pair):
    """Four prompt sets on two images: sets 0-1 prompt image 0, sets 2-3 image 1, as if decoded image by image."""
    _, ours, _ = pair
    gen = torch.Generator().manual_seed(4)
    embeddings = torch.randn(2, PROMPT_DIM, GRID, GRID, generator=gen)
    points, labels = torch.rand(4, 2, 2, generator=gen) * IMAGE, torch.tensor([[1, 0], [1, 1], [0, 1], [1, -1]])
    with torch.no_grad():
        low, iou = ours.decode(embeddings, points, labels, multimask_output=True)
        for i in range(2):
            low_i, iou_i = ours.decode(embeddings[i:i + 1], points[2 * i:2 * i + 2], labels[2 * i:2 * i + 2])
            assert max_diff(low[2 * i:2 * i + 2], low_i) <= 1e-5 and max_diff(iou[2 * i:2 * i + 2], iou_i) <= 1e-5
    with pytest.raises(ValueError, match="do not split evenly"):
        ours.decode(embeddings, points[:3], labels[:3])


def test_grad_checkpointing_changes_nothing_but_memory(pair):
    _, ours, checkpoint = pair
    model = create("sam_vit_nano")
    model.load_state_dict(official_sam_state(checkpoint, model))
    x = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(5))
    point, label = torch.tensor([[[100.0, 60.0]]]), torch.tensor([[1]])
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        low, iou = model(x, point, label)
        (low.mean() + iou.sum()).backward()
        grads.append(model.image_encoder.blocks[0].attn.qkv.weight.grad.clone())
    assert model.image_encoder.grad_checkpointing
    assert max_diff(grads[0], grads[1]) <= 1e-6


def test_key_map_names_missing_unexpected_and_sam2(pair):
    _, ours, checkpoint = pair
    broken = dict(checkpoint)
    del broken["image_encoder.blocks.0.mlp.lin1.weight"], broken["mask_decoder.iou_token.weight"]
    broken["image_encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        official_sam_state(broken, ours)
    for key in ("image_encoder.blocks.0.mlp.lin1.weight", "mask_decoder.iou_token.weight", "image_encoder.extra"):
        assert key in str(err.value)

    # the heads of a SAM 2 checkpoint, as sam2 names them in its {"model": state} file
    prompt = Sam2PromptEncoder(embed_dim=32, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=4)
    transformer = Sam2Transformer(depth=2, embedding_dim=32, num_heads=8, mlp_dim=64)
    decoder = Sam2MaskDecoder(transformer_dim=32, transformer=transformer, use_high_res_features=True,
                              pred_obj_scores=True, pred_obj_scores_mlp=True)
    sam2_state = {f"sam_prompt_encoder.{k}": v for k, v in prompt.state_dict().items()}
    sam2_state.update({f"sam_mask_decoder.{k}": v for k, v in decoder.state_dict().items()})
    with pytest.raises(ValueError, match="SAM 2 checkpoint.*sam2.1_hiera_"):
        official_sam_state({"model": sam2_state}, ours)


@pytest.mark.parametrize("name, build", [("sam_vit_b", build_sam_vit_b), ("sam_vit_l", build_sam_vit_l),
                                         ("sam_vit_h", build_sam_vit_h)])
def test_official_sizes_match_segment_anything(name, build):
    """On the meta device (no weights): the same parameter count, and the reference's state maps onto ours with
    every key and shape in place."""
    with torch.device("meta"):
        ref, ours = build(checkpoint=None), create(name)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    mapped = official_sam_state(ref.state_dict(), ours)
    assert mapped.keys() == ours.state_dict().keys()
