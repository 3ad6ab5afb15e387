"""Labelled image shards for classification (finetuning, linear probing, evaluation): their config and the
number of classes they hold."""

import json
from dataclasses import dataclass

import fsspec

from datamodules.sharded import DataConfig, resolve_shards
from datamodules.synthetic import CLASS_NAMES


@dataclass
class ClassificationDataConfig(DataConfig):
    num_classes: int | None = None
    """Classes of the labels ("cls" in the shards). None: the length of classes.json next to the train
    shards (make_shards --format imagefolder writes it), or 10 for the synthetic world."""

    def __post_init__(self):
        super().__post_init__()
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"DataConfig.num_classes must be >= 1, got {self.num_classes} (--data.num_classes)")


def classes_beside(shard: str) -> tuple[str, dict[str, int] | None]:
    """The classes.json next to a shard (make_shards --format imagefolder writes it): (its path, its mapping of
    class name -> label, or None when there is none)."""
    path = shard.rsplit("/", 1)[0] + "/classes.json" if "/" in shard else "classes.json"
    try:
        with fsspec.open(path, "r") as f:
            return path, json.load(f)
    except FileNotFoundError:
        return path, None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} cannot be read as a class mapping ({err}); convert the shards again with "
                         "`python -m datamodules.make_shards --format imagefolder`.") from None


def check_same_labels(train: tuple[str, dict], val: tuple[str, dict]) -> None:
    """Train and val converted one by one must give a class the same label, or every validation is wrong."""
    (train_path, train_map), (val_path, val_map) = train, val
    differ = sorted(name for name, label in val_map.items() if train_map.get(name) != label)
    if differ:
        name = differ[0]
        raise ValueError(
            f"The validation shards label classes differently from the training shards: {val_path} maps "
            f"{name!r} to {val_map[name]}, {train_path} to {train_map.get(name)} ({len(differ)} class(es) differ). "
            f"Convert the validation folder again with `python -m datamodules.make_shards --format imagefolder "
            f"... --classes {train_path}`.")


def prepare_data(data: ClassificationDataConfig) -> int:
    """Fill in the synthetic world when no shards are given, check the specs and that train and val label
    classes alike; returns the number of classes."""
    synthetic = data.train_shards is None
    shards = resolve_shards(data)
    if synthetic:
        return data.num_classes or len(CLASS_NAMES)
    train = classes_beside(shards[0][0])
    if train[1] is not None and len(shards) > 1 and shards[1]:
        val = classes_beside(shards[1][0])
        if val[1] is not None:
            check_same_labels(train, val)
    if data.num_classes is not None:
        if train[1] is not None and max(train[1].values()) >= data.num_classes:
            raise ValueError(f"--data.num_classes {data.num_classes} is too few: {train[0]} has labels up to "
                             f"{max(train[1].values())}. Leave --data.num_classes unset to take it from there.")
        return data.num_classes
    if train[1] is None:
        raise ValueError(f"The number of classes is unknown: --data.num_classes is not set and {train[0]} does not "
                         "exist. Pass --data.num_classes N, or write the shards with `python -m "
                         "datamodules.make_shards --format imagefolder`, which writes classes.json.")
    return max(train[1].values()) + 1


@dataclass
class EvalDataConfig:
    train_shards: str | None = None
    """Labelled training shards, read only to fit a linear head when the checkpoint has none. None: the
    built-in synthetic world (filled in, with val_shards)."""
    val_shards: str | None = None
    """The evaluation images' shards (labelled)."""
    image_size: int = 64
    """Side of the evaluated images: resize the short side to size / 0.875, center crop (ImageNet-C: 224)."""
    num_classes: int | None = None
    """Classes of the labels; None: classes.json next to the train shards, or 10 for the synthetic world."""
    eval_images: int | None = 128
    """Evaluate the first N images of val_shards (None: all; ImageNet-C uses the 50,000 of IN-1k val)."""
    num_workers: int | None = None
    """Processes that corrupt images while the model runs (0: in turn, in this process). None: 0 when the model
    runs on the CPU (both would share the same cores), else one per CPU core up to 8. Results do not depend on
    it: the corruption parameters are drawn in this process."""

    def __post_init__(self):
        for name in ("image_size", "eval_images", "num_classes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--data.{name} must be >= 1, got {value}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"--data.num_workers must be >= 0, got {self.num_workers}")


def prepare_eval_data(data: EvalDataConfig) -> tuple[int, list[str], list[str]]:
    """Fill in the synthetic world, check the shard specs; returns (num_classes, train shards, val shards)."""
    classification = ClassificationDataConfig(train_shards=data.train_shards, val_shards=data.val_shards,
                                              image_size=data.image_size, num_classes=data.num_classes)
    num_classes = prepare_data(classification)
    shards = resolve_shards(classification)
    if len(shards) < 2:
        raise ValueError("Evaluation needs --data.val_shards (labelled images to evaluate on).")
    data.train_shards, data.val_shards = classification.train_shards, classification.val_shards
    return num_classes, shards[0], shards[1]
