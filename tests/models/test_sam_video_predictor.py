"""SAM 2's predictors against facebookresearch/sam2's (the installed ``sam2``) under the same random weights at the
nano size: the image predictor (point, box, box + clicks, mask prompts, multimask on and off, batched prompts) and
the interactive video predictor (click, added click, box and mask on frame 0 for three objects, propagation, a
correction click and propagation again, reverse propagation from the last frame) give the same logits; prompt
errors; the predictor's state is its own; semi-supervised VOS follows vos_inference.py."""

import numpy as np
import pytest
import torch
from PIL import Image
from sam2.sam2_image_predictor import SAM2ImagePredictor as RefImagePredictor
from sam2.sam2_video_predictor import SAM2VideoPredictor as RefVideoPredictor

from models.registry import create
from models.sam.image_predictor import SAM2ImageModel, SAM2ImagePredictor
from models.sam.sam import ImagePredictor
from models.sam.sam2 import NO_OBJ_SCORE, _non_overlapping, load_official_sam2
from models.sam.video_predictor import VideoFrames, VideoPredictor, segment_video
from tests.models.test_sam2_model import DYNAMIC_MULTIMASK, SIDE, sam2_nano_checkpoint, yaml_flags

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
HEIGHT, WIDTH, FRAMES = 72, 120, 5  # a non-square video: the square resize scales x and y differently
# The feature sizes SAM2ImagePredictor assumes are those of 1024-px inputs; the nano model's are an eighth of them.
NANO_FEATURE_SIZES = [(32, 32), (16, 16), (8, 8)]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """sam2's SAM2Base at the nano size, its mask logits scaled up so that masks cover parts of the image and the
    +-32 clamp of the image predictor's low-res logits acts; and the same weights as an official checkpoint."""
    return sam2_nano_checkpoint(tmp_path_factory.mktemp("sam2"))


def our_model(path, **overrides):
    return load_official_sam2(create("sam2.1_hiera_nano", **overrides), path).eval()


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A folder of FRAMES JPEGs of noise and the frames as arrays (decoded from the same files)."""
    folder = tmp_path_factory.mktemp("video")
    rng = np.random.default_rng(0)
    for t in range(FRAMES):
        Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(folder / f"{t:05d}.jpg")
    return folder


def close(got, want, what: str) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: {got.shape} != {want.shape}"
    diff = float(np.abs(got - want).max())
    assert diff <= TOL, f"{what}: max abs diff {diff}"
    return diff


# -- image predictor -------------------------------------------------------------------------------------------

IMAGE_PROMPTS = {
    "click": dict(point_coords=np.array([[40.0, 30.0]]), point_labels=np.array([1])),
    "clicks": dict(point_coords=np.array([[40.0, 30.0], [100.0, 70.0]]), point_labels=np.array([1, 0])),
    "box": dict(box=np.array([10.0, 5.0, 120.0, 80.0])),
    "box+click": dict(box=np.array([10.0, 5.0, 120.0, 80.0]), point_coords=np.array([[60.0, 40.0]]),
                      point_labels=np.array([1])),
}


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("prompt", list(IMAGE_PROMPTS))
def test_image_predictor_equals_sam2(weights, prompt, multimask):
    base, path = weights
    ref = RefImagePredictor(base)
    ref._bb_feat_sizes = NANO_FEATURE_SIZES
    ours = SAM2ImagePredictor(our_model(path))
    image = np.random.default_rng(1).integers(0, 256, (90, 150, 3), dtype=np.uint8)
    ref.set_image(image)
    ours.set_image(Image.fromarray(image))  # a PIL image is read as its RGB array
    kwargs = dict(IMAGE_PROMPTS[prompt], multimask_output=multimask)
    first = None
    for step in ("prompt", "with its mask"):
        want = ref.predict(**kwargs, return_logits=True)
        got = ours.predict(**kwargs, return_logits=True)
        for name, g, w in zip(("masks", "iou", "low-res logits"), got, want):
            close(g, w, f"{prompt} {step} {name}")
        binary = ours.predict(**kwargs)[0]
        decided = np.abs(want[0]) > 1e-3
        assert binary.dtype == bool and np.array_equal(binary[decided], want[0][decided] > 0)
        first = first or want
        kwargs["mask_input"] = want[2][np.argmax(want[1])][None]  # the best low-res logits fed back
    assert got[0].shape == ((3 if multimask else 1), 90, 150)
    assert 0.05 < (first[0] > 0).mean() < 0.95  # the masks cover part of the image
    if prompt == "click" and multimask:
        assert np.abs(first[2]).max() == 32.0  # the clamp of the returned low-res logits acts


def test_image_predictor_batched_and_normalised_prompts(weights):
    """Several boxes at once (SAM2ImagePredictor._predict's batched mode), prompts given as fractions of the image
    (normalize_coords False), and the plain ImagePredictor on SAM2ImageModel, the model the AMG wraps."""
    base, path = weights
    ref = RefImagePredictor(base)
    ref._bb_feat_sizes = NANO_FEATURE_SIZES
    model = our_model(path)
    ours = SAM2ImagePredictor(model)
    image = np.random.default_rng(2).integers(0, 256, (64, 100, 3), dtype=np.uint8)
    ref.set_image(image)
    ours.set_image(image)
    boxes = np.array([[5.0, 5.0, 60.0, 50.0], [30.0, 10.0, 95.0, 60.0], [0.0, 0.0, 99.0, 63.0]])
    *_, ref_boxes = ref._prep_prompts(None, None, boxes, None, normalize_coords=True)
    want = ref._predict(None, None, ref_boxes, None, multimask_output=True, return_logits=True)
    got = ours.predict_torch(None, None, ours.transform.scale_boxes(boxes, (64, 100)), None, True, True)
    for name, g, w in zip(("masks", "iou", "low-res logits"), got, want):
        close(g, w, f"batched boxes {name}")

    fractions = dict(point_coords=np.array([[0.3, 0.6]]), point_labels=np.array([1]),
                     box=np.array([0.1, 0.1, 0.8, 0.9]))
    want = ref.predict(**fractions, normalize_coords=False, return_logits=True)
    got = ours.predict(**fractions, normalize_coords=False, return_logits=True)
    for name, g, w in zip(("masks", "iou", "low-res logits"), got, want):
        close(g, w, f"normalised prompt {name}")

    plain = ImagePredictor(SAM2ImageModel(model))
    plain.set_image(image)
    masks, iou, low_res = plain.predict(**IMAGE_PROMPTS["click"], return_logits=True)
    want = ref.predict(**IMAGE_PROMPTS["click"], return_logits=True)
    close(masks, want[0], "ImagePredictor masks")
    close(iou, want[1], "ImagePredictor iou")
    close(low_res.clip(-32, 32), want[2], "ImagePredictor low-res logits")


# -- video predictor -------------------------------------------------------------------------------------------


def reference_video_predictor(base, **flags) -> RefVideoPredictor:
    """SAM2VideoPredictor around the same modules, with the flags sam2/build_sam.py:build_sam2_video_predictor sets
    (its hole filling needs sam2's compiled extension, which is not built here; it is off)."""
    ref = RefVideoPredictor(image_encoder=base.image_encoder, memory_attention=base.memory_attention,
                            memory_encoder=base.memory_encoder, sam_mask_decoder_extra_args=DYNAMIC_MULTIMASK,
                            **dict(yaml_flags("2.1"), image_size=SIDE), binarize_mask_from_pts_for_mem_enc=True,
                            fill_hole_area=0, **flags)
    ref.load_state_dict(base.state_dict())
    return ref.eval()


def compare_step(got, want, what: str) -> float:
    """One (frame_idx, obj_ids, logits) of ours against sam2's."""
    assert got[0] == want[0] and list(got[1]) == list(want[1]), f"{what}: {got[:2]} != {want[:2]}"
    assert got[2].shape == (len(got[1]), 1, HEIGHT, WIDTH)
    return close(got[2], want[2], f"{what} frame {got[0]}")


def compare_propagation(ours, ref, state, what: str, **kwargs) -> list[tuple]:
    names = {"start": "start_frame_idx", "max_frames": "max_frame_num_to_track"}
    want = list(ref.propagate_in_video(state, **{names.get(k, k): v for k, v in kwargs.items()}))
    got = list(ours.propagate(**kwargs))
    assert len(got) == len(want), what
    for g, w in zip(got, want):
        compare_step(g, w, what)
    return got


FLAGS = {"defaults": {}, "VOS flags": dict(non_overlap_masks=True, add_all_frames_to_correct_as_cond=True)}


@pytest.mark.parametrize("flags", list(FLAGS))
def test_video_predictor_equals_sam2(weights, video, flags):
    base, path = weights
    ref = reference_video_predictor(base, **FLAGS[flags])
    ours = VideoPredictor(our_model(path, binarize_mask_from_pts_for_mem_enc=True), **FLAGS[flags])
    state = ref.init_state(str(video))
    ours.init_state(video)
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[10:50, 30:90] = True
    click, second, box = [[40.0, 30.0]], [[90.0, 50.0]], [5.0, 10.0, 60.0, 70.0]
    compare_step(ours.add_points(0, 1, click, [1]), ref.add_new_points_or_box(state, 0, 1, click, [1]), "click")
    compare_step(ours.add_points(0, 1, second, [0], clear_old=False),
                 ref.add_new_points_or_box(state, 0, 1, second, [0], clear_old_points=False), "added click")
    compare_step(ours.add_box(0, 2, box), ref.add_new_points_or_box(state, 0, 2, box=box), "box")
    compare_step(ours.add_mask(0, "three", mask), ref.add_new_mask(state, 0, "three", mask), "mask")
    forward = compare_propagation(ours, ref, state, "forward")
    assert [t for t, _, _ in forward] == list(range(FRAMES))
    assert forward[0][1] == [1, 2, "three"]
    if flags == "VOS flags":
        assert not (torch.cat([logits for _, _, logits in forward], 1) > 0).sum(0).gt(1).any()  # no pixel twice

    correction = [[60.0, 20.0]]
    compare_step(ours.add_points(2, 1, correction, [1]), ref.add_new_points_or_box(state, 2, 1, correction, [1]),
                 "correction")
    assert [t for t, _, _ in compare_propagation(ours, ref, state, "again")] == list(range(FRAMES))
    assert [t for t, _, _ in compare_propagation(ours, ref, state, "part", start=1, max_frames=2)] == [1, 2, 3]

    ref.reset_state(state)
    ours.reset()
    last = FRAMES - 1
    compare_step(ours.add_points(last, 7, click, [1]), ref.add_new_points_or_box(state, last, 7, click, [1]), "last")
    backward = compare_propagation(ours, ref, state, "reverse", reverse=True)
    assert [t for t, _, _ in backward] == list(range(last, -1, -1))


def test_prompt_errors(weights, video):
    _, path = weights
    predictor = VideoPredictor(our_model(path))
    with pytest.raises(RuntimeError, match=r"init_state"):
        predictor.add_points(0, 1, [[1.0, 2.0]], [1])
    predictor.init_state(video)
    with pytest.raises(ValueError, match="no object has a prompt: add points, a box or a mask first"):
        predictor.propagate()
    predictor.add_points(0, 1, [[10.0, 20.0]], [1])
    with pytest.raises(ValueError, match=r"^object 3 has no prompt on any frame: add points, a box or a mask first"):
        predictor.propagate(obj_ids=[1, 3])
    with pytest.raises(IndexError, match=f"frame {FRAMES} is not in this {FRAMES}-frame video"):
        predictor.add_points(FRAMES, 1, [[10.0, 20.0]], [1])
    with pytest.raises(ValueError, match="one label per point: 2 points, 1 labels"):
        predictor.add_points(0, 1, [[10.0, 20.0], [3.0, 4.0]], [1])
    with pytest.raises(ValueError, match=r"a mask prompt is \(H, W\)"):
        predictor.add_mask(0, 1, np.zeros((1, HEIGHT, WIDTH)))
    assert [t for t, _, _ in predictor.propagate(obj_ids=[1], max_frames=1)] == [0, 1]


def test_state_is_the_predictors_own(weights, video):
    """Two predictors on one model, interleaved, track as each does alone; the model's state dict is unchanged."""
    _, path = weights
    model = our_model(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    arrays = [np.asarray(Image.open(p)) for p in sorted(video.glob("*.jpg"))]
    alone = VideoPredictor(model)
    alone.init_state(video)
    alone.add_points(0, 1, [[40.0, 30.0]], [1])
    want = [m.clone() for _, _, m in alone.propagate()]
    first, second = VideoPredictor(model), VideoPredictor(model)
    first.init_state(arrays)  # the decoded frames: the same input as the folder
    second.init_state(arrays[::-1])
    first.add_points(0, 1, [[40.0, 30.0]], [1])
    second.add_box(0, 1, [5.0, 10.0, 60.0, 70.0])
    for (_, _, a), _ in zip(first.propagate(), second.propagate()):
        torch.testing.assert_close(a, want.pop(0), rtol=0, atol=0)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(VideoFrames(video, SIDE)[3], VideoFrames(arrays, SIDE)[3])


def test_clear_non_cond_memory_around_input(weights, video):
    """A prompt entering the memory drops the object's tracked memories within num_maskmem frames, not those of
    other objects, not its own conditioning ones."""
    _, path = weights
    predictor = VideoPredictor(our_model(path), clear_non_cond_mem_around_input=True,
                               add_all_frames_to_correct_as_cond=True)
    predictor.init_state(video)
    predictor.add_points(0, 1, [[40.0, 30.0]], [1])
    predictor.add_points(0, 2, [[90.0, 50.0]], [1])
    list(predictor.propagate())
    predictor.add_points(3, 1, [[60.0, 20.0]], [1])
    list(predictor.propagate(start=3, max_frames=0))  # commits the prompt, yields frame 3 only
    banks = {obj_id: state.bank for obj_id, state in predictor._objects.items()}
    assert sorted(banks[1].cond_frames) == [0, 3] and not banks[1].non_cond_frames
    assert sorted(banks[2].cond_frames) == [0] and sorted(banks[2].non_cond_frames) == [1, 2, 3, 4]


def test_segment_video_follows_vos_inference(weights, video):
    """Objects on frame 0: prompted with their masks, one propagation, non-overlapping output. Objects appearing
    later: each tracked on its own from its first mask, then every pixel to its best object (sam2's constraint on
    the stacked scores), nothing before its first mask."""
    _, path = weights
    model = our_model(path)
    masks = {1: np.zeros((HEIGHT, WIDTH), bool), 2: np.zeros((HEIGHT, WIDTH), bool)}
    masks[1][10:50, 30:90] = True
    masks[2][30:70, 60:110] = True
    annotations = {1: np.stack([masks[1], masks[1]]), 2: np.stack([masks[2], np.zeros_like(masks[2])]),
                   3: np.stack([np.zeros_like(masks[1]), masks[1]])}  # object 3 shows up on frame 2 only
    together = segment_video(model, video, annotations, [0, 2])
    assert sorted(together) == [1, 2]  # objects of frame 0 only
    predictor = VideoPredictor(model, non_overlap_masks=True)
    predictor.init_state(video)
    for k, m in masks.items():
        predictor.add_mask(0, k, m)
    for t, ids, logits in predictor.propagate():
        for i, k in enumerate(ids):
            assert np.array_equal(together[k][t], (logits[i, 0] > 0).numpy())
    assert not (together[1] & together[2]).any() and together[1].any() and together[2].any()

    later = {1: annotations[1], 3: annotations[3]}
    apart = segment_video(model, video, later, [0, 2], later_objects=True)
    overlapping = segment_video(model, video, later, [0, 2], later_objects=True, non_overlap=False)
    scores = torch.full((2, FRAMES, 1, HEIGHT, WIDTH), NO_OBJ_SCORE)
    for i, (k, start) in enumerate([(1, 0), (3, 2)]):
        predictor.reset()
        predictor.add_mask(start, k, masks[1])
        for t, _, logits in predictor.propagate(start=start):
            scores[i, t] = logits[0]
    kept = torch.stack([_non_overlapping(scores[:, t]) for t in range(FRAMES)], 1)
    for i, k in enumerate(later):
        assert np.array_equal(overlapping[k], (scores[i, :, 0] > 0).numpy())
        assert np.array_equal(apart[k], (kept[i, :, 0] > 0).numpy())
    assert not apart[3][:2].any() and apart[3][2:].any() and (apart[1] & overlapping[3]).any()
    with pytest.raises(ValueError, match=r"video0: no object on frame 0 of the annotations \(with later_objects"):
        segment_video(model, video, {5: annotations[3]}, [0, 2])
    empty = {1: annotations[1], "sav-object-7": np.zeros_like(annotations[1])}
    with pytest.raises(ValueError, match=r"video0: object\(s\) sav-object-7 have no pixel on any of the 2 annotated"):
        segment_video(model, video, empty, [0, 2])
