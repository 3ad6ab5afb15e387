import pytest
import torch

from evaluation.classification import topk_correct
from evaluation.zero_shot import class_embeddings, retrieval_recall, zero_shot_classification, zero_shot_logits

# A toy text encoder: a prompt maps to a fixed vector per class word plus a per-template offset, so the
# class embedding (mean of normalised prompt embeddings) can be worked out by hand.
WORDS = {"cat": torch.tensor([1.0, 0.0, 0.0]), "dog": torch.tensor([0.0, 1.0, 0.0]),
         "eel": torch.tensor([0.0, 0.0, 1.0])}


def toy_text_encoder(prompts):
    out = []
    for p in prompts:
        word = next(w for w in WORDS if w in p)
        offset = torch.tensor([0.0, 0.0, 0.0]) if p.startswith("a photo") else WORDS[word] * 2  # same direction
        out.append(WORDS[word] * 3 + offset)
    return torch.stack(out)


def test_class_embeddings_are_normalised_mean_of_normalised_prompts():
    def encoder(prompts):  # two templates for one class pointing at (1,0) and (0,1) with different lengths
        return torch.tensor([[5.0, 0.0] if p.startswith("x") else [0.0, 0.1] for p in prompts])

    emb = class_embeddings(encoder, ["cat"], templates=("x {}", "y {}"))
    # normalised prompts (1,0) and (0,1): mean (.5,.5), renormalised (1/sqrt2, 1/sqrt2) regardless of lengths
    assert torch.allclose(emb, torch.tensor([[2 ** -0.5, 2 ** -0.5]]), atol=1e-6)


def test_zero_shot_accuracy_on_toy_embeddings_is_exact():
    classes = ["cat", "dog", "eel"]
    emb = class_embeddings(toy_text_encoder, classes, templates=("a photo of a {}.", "the {}"))
    assert torch.allclose(emb, torch.eye(3), atol=1e-6)
    # images: features close to their class except two that point at another class
    features = torch.tensor([[2.0, 0.1, 0.0], [0.0, 1.0, 0.3], [0.1, 0.0, 1.0], [0.0, 3.0, 0.1],  # right
                             [0.2, 0.9, 0.0]])                                                     # cat -> dog
    labels = torch.tensor([0, 1, 2, 2, 0])  # sample 3 is labelled eel but points at dog (eel second)
    batches = [{"image": features[:3], "label": labels[:3]}, {"image": features[3:], "label": labels[3:]}]
    result = zero_shot_classification(lambda x: x, batches, emb, topk=(1, 2))
    assert result["top1"] == pytest.approx(100 * 3 / 5)
    assert result["top2"] == pytest.approx(100 * 5 / 5)  # both wrong ones have the right class second


def test_zero_shot_logits_are_cosines():
    feats = torch.tensor([[3.0, 4.0]])
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(zero_shot_logits(feats, emb), torch.tensor([[0.6, 0.8]]))


def test_topk_correct_counts_hand_example():
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([2, 0, 0])
    assert topk_correct(logits, labels, (1, 2, 3)).tolist() == [1, 2, 3]


def test_retrieval_recall_hand_example():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # captions 0,1 belong to image 0; 2 to image 1; 3 to image 2
    texts = torch.tensor([[0.0, 1.0], [1.0, 0.05], [0.05, 1.0], [1.0, 0.9]])
    r = retrieval_recall(images, texts, [0, 0, 1, 2], ks=(1, 2))
    # image->text top1: img0 -> text1 (owner 0) hit; img1 -> text0 (cos 1 > .9988 of text2; owner 0) miss;
    # img2 -> text3 hit. 2/3.
    # With k=2 img1 gets texts {0,2}: hit. 3/3.
    assert r["image_to_text_R@1"] == pytest.approx(100 * 2 / 3)
    assert r["image_to_text_R@2"] == pytest.approx(100.0)
    # text->image top1: t0 (0,1) -> img1 (cos 1) miss; t1 -> img0 hit; t2 -> img1 hit; t3 -> img2 hit. 3/4
    assert r["text_to_image_R@1"] == pytest.approx(75.0)
    # k=2: t0's best two are img1 (1.0) and img2 (.707): still miss.
    assert r["text_to_image_R@2"] == pytest.approx(75.0)


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match="template"):
        class_embeddings(toy_text_encoder, ["cat"], templates=("no slot",))
    with pytest.raises(ValueError, match="image index"):
        retrieval_recall(torch.eye(2), torch.eye(2), [0, 5])


def _at(*degrees: float) -> torch.Tensor:
    """Unit vectors in the plane at the given angles: cosines are then cos(angle differences)."""
    angles = torch.tensor(degrees) * torch.pi / 180
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def test_retrieval_reweighting_hand_example():
    # images at 0 and 60 degrees; caption 0 (of image 0) at -25, caption 1 (of image 1) at 20.
    # cosines (text x image): t0: .906, .087; t1: .940, .766
    images, texts = _at(0, 60), _at(-25, 20)
    plain = retrieval_recall(images, texts, [0, 1], ks=(1,))
    # image 0 prefers t1 (.940 > .906): miss; text 1 prefers image 0 (.940 > .766): miss
    assert plain["image_to_text_R@1"] == pytest.approx(50.0)
    assert plain["text_to_image_R@1"] == pytest.approx(50.0)
    # x10 then s * softmax(s): t1's column over images is softmax(9.40, 7.66) = (.851, .149), t0's (.9997, .0003),
    # so image 0 scores t0 9.06 x .9997 = 9.06 above t1 9.40 x .851 = 8.00; image 0's column over texts is
    # softmax(9.06, 9.40) = (.416, .584) and image 1's (.001, .999), so text 1 scores image 1 7.65 above image 0 5.49.
    reweighted = retrieval_recall(images, texts, [0, 1], ks=(1,), reweight=True, reweight_scale=10.0)
    assert reweighted["image_to_text_R@1"] == pytest.approx(100.0)
    assert reweighted["text_to_image_R@1"] == pytest.approx(100.0)


def test_identical_captions_share_their_images():
    images, texts = _at(0, 10), _at(2, 2)  # the same caption written for two images, both nearer image 0
    apart = retrieval_recall(images, texts, [0, 1], ks=(1,))
    assert apart["text_to_image_R@1"] == pytest.approx(50.0)  # caption 1 finds image 0, not its own
    merged = retrieval_recall(images, texts, [0, 1], ks=(1,), texts=["a red circle", "a red circle"])
    assert merged["text_to_image_R@1"] == pytest.approx(100.0)
    assert merged["image_to_text_R@1"] == pytest.approx(100.0)
