"""Zero-shot classification and image-text retrieval from embedding callables (CLIP's protocol).

Radford et al. 2021 (CLIP, §3.1.4) and open_clip's ``zero_shot_classifier``: each class is embedded as the
mean of its L2-normalised prompt embeddings (one prompt per template), normalised again; an image is
classified by cosine similarity to those class embeddings. Retrieval follows the usual COCO / Flickr30k
evaluation (open_clip ``retrieval``): an image counts as retrieved at k when any of its captions is among the
k texts nearest to it, and a caption when its image is among the k nearest images.

The encoders are plain callables, so any model plugs in: ``encode_image(images) -> (B, D)``,
``encode_text(list_of_strings) -> (N, D)``. Accuracies and recalls are in percent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from evaluation.classification import topk_correct

# A small neutral template set; the full prompt ensembles of a paper belong in its recipe's config.
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image showing a {}.")


def class_embeddings(encode_text: Callable[[list[str]], Tensor], class_names: Sequence[str],
                     templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 256) -> Tensor:
    """(C, D) unit-norm class embeddings: per class, the renormalised mean of its normalised prompt embeddings."""
    if not class_names:
        raise ValueError("class_embeddings: no class names given")
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"Every template needs a '{{}}' where the class name goes; got {list(templates)!r}")
    prompts = [t.format(name) for name in class_names for t in templates]
    with torch.no_grad():
        embedded = torch.cat([encode_text(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)])
    embedded = F.normalize(embedded.float(), dim=-1).view(len(class_names), len(templates), -1)
    return F.normalize(embedded.mean(dim=1), dim=-1)


def zero_shot_logits(image_features: Tensor, class_embeds: Tensor) -> Tensor:
    """(N, C) cosine similarities between the images' features (N, D) and unit-norm class embeddings (C, D)."""
    return F.normalize(image_features.float(), dim=-1) @ class_embeds.float().T


def zero_shot_classification(encode_image: Callable[[Tensor], Tensor], batches: Iterable[dict],
                             class_embeds: Tensor, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy (percent) of zero-shot classification over batches ``{"image": ..., "label": ...}``."""
    ks = [min(k, class_embeds.shape[0]) for k in topk]
    correct = torch.zeros(len(ks), dtype=torch.long)
    total = 0
    with torch.no_grad():
        for batch in batches:
            logits = zero_shot_logits(encode_image(batch["image"]), class_embeds.to(batch["image"].device))
            correct += topk_correct(logits, batch["label"].to(logits.device), ks).cpu()
            total += logits.shape[0]
    if total == 0:
        raise ValueError("zero_shot_classification: the batches held no images")
    return {f"top{k}": 100.0 * c.item() / total for k, c in zip(topk, correct)}


def retrieval_recall(image_embeds: Tensor, text_embeds: Tensor, text_to_image: Sequence[int] | Tensor,
                     ks: Sequence[int] = (1, 5, 10), *, reweight: bool = False, reweight_scale: float = 1.0,
                     texts: Sequence[str] | None = None) -> dict[str, float]:
    """Recall@k (percent) both ways for N images (N, D) and M captions (M, D); caption j describes image
    ``text_to_image[j]``. Keys: ``image_to_text_R@k`` and ``text_to_image_R@k``.

    ``reweight``: Perception Encoder's retrieval scores (perception_models apps/pe/clip_benchmark/metrics/
    zeroshot_retrieval.py, on by default there): each similarity s is multiplied by the softmax of
    ``reweight_scale * s`` over the candidates' competitors (over texts for ranking images, over images for ranking
    texts), which favours pairs that are each other's best match. ``texts``: the captions' strings; identical
    captions then share their images as positives (clip_benchmark does the same), so that retrieving a caption
    written the same way for another image counts.
    """
    owner = torch.as_tensor(text_to_image, dtype=torch.long, device=image_embeds.device)
    n_images, n_texts = image_embeds.shape[0], text_embeds.shape[0]
    if owner.shape != (n_texts,) or (owner < 0).any() or (owner >= n_images).any():
        raise ValueError(f"text_to_image must give, for each of the {n_texts} captions, an image index in "
                         f"[0, {n_images}); got shape {tuple(owner.shape)}")
    if texts is not None and len(texts) != n_texts:
        raise ValueError(f"texts has {len(texts)} captions, text_embeds {n_texts}")
    positive = torch.zeros(n_texts, n_images, dtype=torch.bool, device=owner.device)  # (M, N)
    positive[torch.arange(n_texts, device=owner.device), owner] = True
    if texts is not None:
        same: dict[str, list[int]] = {}
        for j, text in enumerate(texts):
            same.setdefault(text, []).append(j)
        for rows in (r for r in same.values() if len(r) > 1):
            positive[rows] = positive[rows].any(dim=0)
    sim = F.normalize(text_embeds.float(), dim=-1) @ F.normalize(image_embeds.float(), dim=-1).T  # (M, N)
    ranks_images, ranks_texts = sim, sim.T
    if reweight:
        ranks_images = reweight_scale * sim
        ranks_images = ranks_images * ranks_images.softmax(dim=0)  # over texts, for each image
        ranks_texts = reweight_scale * sim.T
        ranks_texts = ranks_texts * ranks_texts.softmax(dim=0)  # over images, for each text
    out = {}
    for k in ks:
        # image -> text: is a caption of the image among its k best texts?
        top_texts = ranks_texts.topk(min(k, n_texts), dim=1).indices  # (N, k)
        hit_i2t = positive.T.gather(1, top_texts).any(dim=1)
        # text -> image: is the caption's image among its k best images?
        top_images = ranks_images.topk(min(k, n_images), dim=1).indices  # (M, k)
        hit_t2i = positive.gather(1, top_images).any(dim=1)
        out[f"image_to_text_R@{k}"] = 100.0 * hit_i2t.float().mean().item()
        out[f"text_to_image_R@{k}"] = 100.0 * hit_t2i.float().mean().item()
    return out
