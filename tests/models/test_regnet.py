"""RegNetY backbones: pycls/timm sizes, timm key compatibility, complexity, head-less features, init, errors."""

import math

import pytest
import timm
import torch
from torch import nn

import models
from models.regnet import RegNet, RegNetConfig
from tests.models.flop_count import counted_flops

# ours -> timm's name for the same pycls config; params with a 1000-class head from facebookresearch/pycls
# dev/model_complexity.json (configs/dds_baselines/regnety/RegNetY-*_dds_8gpu.yaml)
TIMM = {"regnety_200mf": "regnety_002", "regnety_400mf": "regnety_004", "regnety_4gf": "regnety_040",
        "regnety_16gf": "regnety_160", "regnety_32gf": "regnety_320", "regnety_128gf": "regnety_1280"}
PARAMS = {"regnety_200mf": 3_162_996, "regnety_400mf": 4_344_144, "regnety_4gf": 20_646_656,
          "regnety_16gf": 83_590_140, "regnety_32gf": 145_046_770}


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registered_names():
    assert models.list_models("regnety_*") == sorted(TIMM)


@pytest.mark.parametrize("name", sorted(TIMM))
def test_same_network_as_timm_and_pycls(name):
    with torch.device("meta"):
        ours = models.create(name, num_classes=1000)
        theirs = timm.create_model(TIMM[name], num_classes=1000)
    # identical keys and shapes: timm (and SWAG-via-timm) weights load strictly
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    if name in PARAMS:
        assert _numel(ours) == PARAMS[name]
    assert ours.complexity().params == _numel(ours)
    assert ours.num_features == theirs.num_features


def test_complexity_agrees_with_torch_flop_counter():
    model = models.create("regnety_200mf", img_size=64, num_classes=10).eval()
    assert model.complexity().flops == counted_flops(model, torch.randn(1, 3, 64, 64))


def test_complexity_acts_are_pycls_acts():
    # our convention keeps pycls's activation count: facebookresearch/pycls dev/model_complexity.json gives
    # RegNetY-200MF_dds_8gpu 2,168,052 at 224 px with 1000 classes
    assert models.create("regnety_200mf", num_classes=1000).complexity().activations == 2_168_052


def test_headless_forward_returns_pooled_features():
    model = models.create("regnety_200mf").eval()
    assert model.cfg.num_classes == 0 and model.no_weight_decay() == set()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, model.num_features) == (2, 368)  # last stage width of RegNetY-200MF (timm agrees above)


def test_pycls_init():
    torch.manual_seed(0)
    model = models.create("regnety_4gf", num_classes=10)
    conv = model.s3.b2.conv2.conv  # 3x3, 512 -> 512 in 8 groups: pycls fan_out = 9 x 512, not divided by groups
    assert conv.groups == 8
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 512)), rel=0.05)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(bn.weight == 1) and torch.all(bn.bias == 0) for bn in bns)  # no zero-init of the last BN
    assert model.head.fc.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(model.head.fc.bias == 0)


def test_drop_path_rises_linearly_over_blocks():
    model = models.create("regnety_200mf", drop_path_rate=0.3)  # 13 blocks
    rates = [getattr(m.drop_path, "drop_prob", 0.0) for m in model.modules() if hasattr(m, "drop_path")]
    assert rates == pytest.approx([0.3 * i / 12 for i in range(13)])


def test_explicit_stages_build():
    cfg = RegNetConfig(stage_depths=(1, 1, 2, 1), stage_widths=(16, 32, 48, 64), stage_group_widths=(8, 8, 16, 16),
                       num_classes=4)
    model = RegNet(cfg).eval()
    assert [m.conv2.conv.groups for m in (model.s1.b1, model.s3.b1, model.s4.b1)] == [2, 3, 4]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert model.complexity().params == _numel(model)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(stage_depths=(1, 1, 1, 1), stage_widths=(16, 32, 48, 64)), "of one length"),
        (dict(stage_depths=(1, 1, 1, 1), stage_widths=(16, 32, 48, 60), stage_group_widths=(8, 8, 8, 8)),
         "multiple of the group width"),
        (dict(stage_depths=(1, 1, 1), stage_widths=(16, 32, 48), stage_group_widths=(8, 8, 8)), "exactly 4 stages"),
        (dict(w0=20), "divisible by 8"),
    ],
)
def test_config_errors_are_clear(kw, match):
    with pytest.raises(ValueError, match=match):
        RegNetConfig(**kw)


def test_unknown_override_is_rejected():
    with pytest.raises(TypeError, match="group_width"):
        models.create("regnety_200mf", groups=4)
