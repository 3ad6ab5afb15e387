"""The evaluation loaders tell the user which flag names the model when a checkpoint's run has no config.yaml."""

import pytest
import torch

from trainers.eval_model import load_sam_model, source_model_name


def test_a_checkpoint_without_its_run_config_names_the_flag_of_the_recipe(tmp_path):
    ckpt = tmp_path / "orphan.ckpt"
    torch.save({"state_dict": {"model.weight": torch.zeros(1)}}, ckpt)
    with pytest.raises(ValueError, match=r"Pass --model\.name \(e\.g\. vit_tiny_patch8\)"):
        source_model_name(str(ckpt))
    # eval_vos and sam_amg take the SAM model as --model
    with pytest.raises(ValueError, match=r"no config\.yaml .* Pass --model \(e\.g\. sam2\.1_hiera_tiny\)"):
        load_sam_model(str(ckpt))
