"""The class mapping checks of datamodules.classification.prepare_data, on shards written by make_shards."""

import json

import pytest

from datamodules import make_shards
from datamodules.classification import ClassificationDataConfig, prepare_data
from tests.datamodules.test_make_shards import class_folder


def _convert(folder, out, *flags) -> str:
    assert make_shards.main(["--format", "imagefolder", "--input", str(folder), "--output", str(out), *flags]) == 0
    return str(out / "train-*.tar")


def test_train_and_val_labelled_differently_stop_before_training(tmp_path):
    train = _convert(class_folder(tmp_path / "train", ["ant", "bee", "cat"], 2), tmp_path / "s_train")
    # val lacks "ant": on its own, make_shards numbers bee 0 and cat 1, where train has them 1 and 2
    val_folder = class_folder(tmp_path / "val", ["bee", "cat"], 2)
    val = _convert(val_folder, tmp_path / "s_val")
    assert json.loads((tmp_path / "s_val" / "classes.json").read_text()) == {"bee": 0, "cat": 1}
    with pytest.raises(ValueError, match=r"maps 'bee' to 0, .*s_train/classes.json to 1 \(2 class\(es\) differ\)"
                                         r".*--classes .*s_train/classes.json"):
        prepare_data(ClassificationDataConfig(train_shards=train, val_shards=val))
    # converted again as the message says, it agrees with train
    fixed = _convert(val_folder, tmp_path / "s_val_fixed", "--classes", str(tmp_path / "s_train" / "classes.json"))
    assert prepare_data(ClassificationDataConfig(train_shards=train, val_shards=fixed)) == 3


def test_num_classes_below_the_recorded_labels_is_an_error(tmp_path):
    train = _convert(class_folder(tmp_path / "train", ["ant", "bee", "cat"], 2), tmp_path / "s_train")
    assert prepare_data(ClassificationDataConfig(train_shards=train, num_classes=5)) == 5  # more is allowed
    with pytest.raises(ValueError, match="num_classes 2 is too few: .*labels up to 2"):
        prepare_data(ClassificationDataConfig(train_shards=train, num_classes=2))
