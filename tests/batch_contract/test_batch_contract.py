"""The batch contract holds between what each datamodule produces and what each method reads."""

import pytest
import torch

from batch_contract import KEYS, check_batch
from datamodules import IMAGENET_MEAN, IMAGENET_STD
from datamodules.hashtags import HashtagDataConfig, build_vocabulary, hashtag_datamodule
from datamodules.sharded import DataConfig, ShardedDataModule
from datamodules.synthetic import SyntheticWorldConfig, ensure_synthetic_world
from datamodules.transforms import (eval_transform, finetune_train_transform, linear_probe_train_transform,
                                    mae_train_transform)
from trainers.classification import ImageClassification, LinearProbe, classifier_kwargs
from trainers.mae import MAEPretraining
from trainers.weakly_supervised import WeaklySupervisedPretraining

SIZE = 16
TINY_MAE = {"name": "mae_vit_tiny_patch8", "img_size": SIZE, "decoder_embed_dim": 16, "decoder_depth": 1,
            "decoder_num_heads": 2}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cfg = SyntheticWorldConfig(image_size=32, train_samples=16, val_samples=8, samples_per_shard=8)
    return ensure_synthetic_world(cfg, root=str(tmp_path_factory.mktemp("world")))


def _first_batches(datamodule) -> list[dict]:
    """One training and one validation batch, as the method sees them (after the device-side hook)."""
    datamodule.setup("fit")
    loaders = (datamodule.train_dataloader(), datamodule.val_dataloader())
    return [datamodule.on_after_batch_transfer(next(iter(loader)), 0) for loader in loaders]


def _image_datamodule(world, train_transform, **required):
    cfg = DataConfig(train_shards=world.train_shards, val_shards=world.val_shards, batch_size=4, num_workers=0,
                     image_size=SIZE)
    return ShardedDataModule(cfg, train_transform, eval_transform(SIZE), seed=0, mean=IMAGENET_MEAN,
                             std=IMAGENET_STD, **required)


def _pairs(world):
    """(method, datamodule) as the recipes pair them."""
    classifier = classifier_kwargs("vit_tiny_patch8", 10, SIZE, "avg")
    probe = classifier_kwargs("vit_tiny_patch8", 0, SIZE, "token")
    labelled = {"required_keys": ("jpg", "cls")}
    yield MAEPretraining(TINY_MAE, None, 1e-3, 10), _image_datamodule(world, mae_train_transform(SIZE))
    yield (ImageClassification(classifier, None, 1e-3, 10),
           _image_datamodule(world, finetune_train_transform(SIZE, ""), **labelled))
    yield LinearProbe(probe, 10, None, 0.1, 10), _image_datamodule(world, linear_probe_train_transform(SIZE), **labelled)
    vocab = build_vocabulary(world.train_shards, min_count=1)
    hashtags = HashtagDataConfig(train_shards=world.train_shards, val_shards=world.val_shards, batch_size=4,
                                 num_workers=0, image_size=SIZE, balance_power=0.0)
    model = {"name": "vit_tiny_patch8", "img_size": SIZE, "num_classes": len(vocab)}
    yield (WeaklySupervisedPretraining(model, None, 1e-3, 10, vocab=vocab.tags),
           hashtag_datamodule(hashtags, vocab, seed=0))


def test_every_method_reads_only_keys_of_the_contract():
    for method in (MAEPretraining, ImageClassification, LinearProbe, WeaklySupervisedPretraining):
        assert method.batch_keys and set(method.batch_keys) <= set(KEYS) | {"prompts"}, method.__name__


def test_each_datamodule_feeds_the_methods_that_consume_it(world):
    for module, datamodule in _pairs(world):
        for batch in _first_batches(datamodule):
            assert check_batch(batch, module.batch_keys) == [], type(module).__name__
            assert torch.isfinite(module.compute_loss(batch)), type(module).__name__


def test_check_batch_names_each_breach():
    good = {"image": torch.zeros(2, 3, 4, 4), "label": torch.zeros(2, dtype=torch.int64), "key": ["a", "b"]}
    assert check_batch(good, ("image", "label", "key")) == []
    assert "'text' is missing" in check_batch(good, ("text",))[0]
    assert "int64" in check_batch({**good, "label": torch.zeros(2)}, ("label",))[0]
    assert "shape (B, C, H, W)" in check_batch({**good, "image": torch.zeros(3, 4, 4)}, ("image",))[0]
    assert "dimension B is 3" in check_batch({**good, "key": ["a", "b", "c"]}, ("image", "key"))[0]
    assert "hold str items" in check_batch({**good, "key": ["a", 1]}, ("key",))[0]
    video = {"frames": torch.zeros(2, 4, 3, 8, 8), "frame_masks": torch.zeros(2, 5, 8, 8, dtype=torch.uint8),
             "frame_valid": torch.ones(2, 4, dtype=torch.bool)}
    assert "dimension T is 5" in check_batch(video, ("frames", "frame_masks", "frame_valid"))[0]
    prompts = {"prompts": {"points": torch.zeros(2, 3, 2), "point_labels": torch.ones(2, 3)}}
    assert "prompts.point_labels" in check_batch(prompts, ("prompts",))[0]
    text = {"text_tokens": torch.zeros(2, 7, dtype=torch.int64), "text_mask": torch.ones(2, 6, dtype=torch.bool)}
    assert "dimension L is 6" in check_batch(text, ("text_tokens", "text_mask"))[0]
