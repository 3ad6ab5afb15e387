"""PerceptionLM: the projector pools after its MLP and starts as PLM's does, the tower stops at the last kept block
without a final norm, LayerScale arrives as fresh gammas at stage 2, visual tokens land on the placeholders, the
loss is next-token CE on labelled positions, the Hugging Face export gives transformers' model identical logits,
and the real sizes have the published parameter counts."""

import json
import math

import pytest
import timm
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import AutoTokenizer, PerceptionLMForConditionalGeneration, PreTrainedTokenizerFast

import models
from models.plm import IGNORE_INDEX, PLMConfig, hf_config, load_hf, save_hf

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE = 2047  # plm_nano's image placeholder id
TILE = 64  # plm_nano's tile side: an 8 x 8 grid of 8-px patches


def make_ids(batch: int, length: int, placeholders: list[tuple[int, int, int]], seed: int = 0) -> torch.Tensor:
    """Random text ids (never the placeholder) with runs of placeholders at (row, start, count)."""
    ids = torch.randint(0, IMAGE, (batch, length), generator=torch.Generator().manual_seed(seed))
    for row, start, count in placeholders:
        ids[row, start:start + count] = IMAGE
    return ids


@pytest.fixture(scope="module")
def stage2():
    """A stage-2 nano: LayerScale, 2x2 pooling (16 visual tokens per tile), with perturbed gammas and positions so
    that both matter."""
    torch.manual_seed(0)
    model = models.create("plm_nano", layer_scale_init=0.1, pooling_ratio=2).eval()
    with torch.no_grad():
        model.vision.pos_embed.normal_(std=0.5)
        for name, p in model.vision.named_parameters():
            if "gamma" in name:
                p.uniform_(0.05, 0.5)
    return model


# -- projector -------------------------------------------------------------------------------------------------
def test_projector_applies_the_mlp_then_a_2x2_average_pool():
    model = models.create("plm_nano", pooling_ratio=2, hidden_size=8, num_heads=2, num_kv_heads=1)
    proj = model.projector
    width = model.vision.embed_dim
    gen = torch.Generator().manual_seed(1)
    w1, b1 = torch.randn(8, width, generator=gen), torch.randn(8, generator=gen)
    w2, b2 = torch.randn(8, 8, generator=gen), torch.randn(8, generator=gen)
    with torch.no_grad():
        proj.linear_1.weight.copy_(w1), proj.linear_1.bias.copy_(b1)
        proj.linear_2.weight.copy_(w2), proj.linear_2.bias.copy_(b2)
    feats = torch.randn(2, 16, width, generator=gen)  # two tiles, a 4 x 4 grid each, row-major
    out = proj(feats)

    def mlp(x):  # one token, by the formula: W2 gelu(W1 x + b1) + b2, GELU the exact erf form
        h = w1 @ x + b1
        return w2 @ (0.5 * h * (1 + torch.erf(h / math.sqrt(2)))) + b2

    for tile in range(2):
        for i in range(2):
            for j in range(2):
                block = [feats[tile, (2 * i + di) * 4 + 2 * j + dj] for di in (0, 1) for dj in (0, 1)]
                expected = sum(mlp(x) for x in block) / 4
                torch.testing.assert_close(out[tile, 2 * i + j], expected, rtol=1e-5, atol=1e-5)
    # the other order (pool, then MLP) gives something else, so the check above tells the two apart
    pooled_first = mlp(sum(feats[0, k] for k in (0, 1, 4, 5)) / 4)
    assert (pooled_first - out[0, 0]).abs().max() > 1e-2


def test_projector_without_pooling_keeps_every_token():
    model = models.create("plm_nano")  # stage 1: pooling_ratio 1
    assert model.projector(torch.randn(3, 64, model.vision.embed_dim)).shape == (3, 64, 64)
    assert model.tokens_per_tile == 64
    assert models.create("plm_nano", pooling_ratio=2).tokens_per_tile == 16


def test_projector_init_is_truncated_normal_with_std_one_over_sqrt_llm_dim():
    dim = 1024
    torch.manual_seed(0)
    proj = models.create("plm_nano", hidden_size=dim, num_heads=8, num_kv_heads=2).projector
    std = dim**-0.5
    # N(0, s) cut at +-3s has standard deviation s * sqrt(1 - 2 * 3 phi(3) / (Phi(3) - Phi(-3)))
    phi3 = math.exp(-4.5) / math.sqrt(2 * math.pi)
    mass = math.erf(3 / math.sqrt(2))
    cut_std = std * math.sqrt(1 - 6 * phi3 / mass)
    for name, tensor in [("linear_1.weight", proj.linear_1.weight), ("linear_1.bias", proj.linear_1.bias),
                         ("linear_2.weight", proj.linear_2.weight), ("linear_2.bias", proj.linear_2.bias)]:
        values = tensor.detach().double().flatten()
        assert values.abs().max() <= 3 * std + 1e-7, name
        assert abs(values.mean()) < 4 * cut_std / math.sqrt(values.numel()), name
        assert abs(values.std() / cut_std - 1) < 6 / math.sqrt(2 * values.numel()), name
    assert proj.linear_2.weight.abs().max() > 2.9 * std  # cut at 3 std, not narrower


# -- vision tower ----------------------------------------------------------------------------------------------
def test_features_are_the_last_kept_block_of_the_full_tower_without_cls_or_norm(stage2):
    kept = stage2.cfg.vision_layers
    full = timm.create_model("vit_pe_core_nano_patch8_64", img_size=TILE, init_values=0.1).eval()
    assert len(full.blocks) == kept + 1
    missing, unexpected = full.load_state_dict(stage2.vision.state_dict(), strict=False)
    assert not unexpected and all(k.startswith((f"blocks.{kept}.", "norm.", "attn_pool.", "head.")) for k in missing)
    images = torch.randn(2, 3, TILE, TILE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        (expected,) = full.forward_intermediates(images, indices=[kept - 1], norm=False, output_fmt="NLC",
                                                 intermediates_only=True)
        ours = stage2.vision(images)
    assert ours.shape == (2, 64, stage2.vision.embed_dim)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_vision_layers_outside_the_tower_is_an_error():
    with pytest.raises(ValueError, match=r"vision_layers must be in \[1, 4\]"):
        models.create("plm_nano", vision_layers=5)


def test_drop_path_is_the_same_rate_in_every_block():
    model = models.create("plm_nano", drop_path_rate=0.1)
    rates = [getattr(b, f"drop_path{i}").drop_prob for b in model.vision.blocks for i in (1, 2)]
    assert rates == [0.1] * 2 * model.cfg.vision_layers


def test_layer_scale_gammas_exist_only_when_enabled():
    with_ls = models.create("plm_nano", layer_scale_init=0.1)
    gammas = {n: p for n, p in with_ls.named_parameters() if "gamma" in n}
    expected = {f"vision.blocks.{i}.gamma_{j}" for i in range(with_ls.cfg.vision_layers) for j in (1, 2)}
    assert set(gammas) == expected
    assert all(torch.equal(p, torch.full_like(p, 0.1)) for p in gammas.values())
    assert not [n for n in models.create("plm_nano").state_dict() if "gamma" in n]


def test_stage1_weights_load_into_stage2_with_exactly_the_gammas_missing():
    stage1 = models.create("plm_nano", pooling_ratio=1)
    stage2 = models.create("plm_nano", pooling_ratio=2, layer_scale_init=0.1, drop_path_rate=0.1)
    missing, unexpected = stage2.load_state_dict(stage1.state_dict(), strict=False)
    assert unexpected == []
    assert set(missing) == {f"vision.blocks.{i}.gamma_{j}" for i in range(3) for j in (1, 2)}


# -- sequence assembly and loss --------------------------------------------------------------------------------
def test_visual_tokens_land_on_the_placeholders_in_row_major_order(stage2):
    media = torch.randn(3, 3, TILE, TILE)
    ids = make_ids(2, 40, [(0, 2, 16), (1, 3, 16), (1, 22, 16)])  # tile 0 in row 0, tiles 1-2 in row 1
    with torch.no_grad():
        embeds = stage2.input_embeddings(ids, media)
        visual = stage2.encode_media(media)
        text = stage2.language_model.get_input_embeddings()(ids)
    torch.testing.assert_close(embeds[0, 2:18], visual[0], rtol=0, atol=0)
    torch.testing.assert_close(embeds[1, 3:19], visual[1], rtol=0, atol=0)
    torch.testing.assert_close(embeds[1, 22:38], visual[2], rtol=0, atol=0)
    is_text = ids != IMAGE
    torch.testing.assert_close(embeds[is_text], text[is_text], rtol=0, atol=0)


def test_placeholder_count_mismatch_names_both_counts(stage2):
    media = torch.randn(1, 3, TILE, TILE)
    with pytest.raises(ValueError, match=r"15 image tokens in input_ids but 16 visual tokens \(1 tiles x 16"):
        stage2(media, make_ids(1, 30, [(0, 4, 15)]))
    with pytest.raises(ValueError, match=r"16 image tokens in input_ids but no media"):
        stage2(None, make_ids(1, 30, [(0, 4, 16)]))


def test_text_only_path_is_the_plain_decoder(stage2):
    ids = make_ids(2, 12, [])
    with torch.no_grad():
        ours = stage2(None, ids).logits
        plain = stage2.language_model(input_ids=ids).logits
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)


def test_loss_is_next_token_cross_entropy_over_labelled_positions(stage2):
    ids = make_ids(2, 24, [(0, 1, 16)], seed=3)
    media = torch.randn(1, 3, TILE, TILE)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 18:22] = ids[0, 18:22]  # a response in each row, of different lengths
    labels[1, 5:15] = ids[1, 5:15]
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0  # right padding
    with torch.no_grad():
        out = stage2(media, ids, mask, labels)
    logp = out.logits.double().log_softmax(-1)
    terms = [-logp[b, t - 1, labels[b, t]] for b in range(2) for t in range(1, 24) if labels[b, t] != IGNORE_INDEX]
    assert len(terms) == 14
    torch.testing.assert_close(out.loss.double(), sum(terms) / len(terms), rtol=1e-5, atol=1e-6)


# -- Hugging Face interop --------------------------------------------------------------------------------------
def _fake_tokenizer_dir(path):
    vocab = {"[UNK]": 0, "a": 1, "<|image|>": IMAGE}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]"))).save_pretrained(path)
    return path


@pytest.mark.parametrize("overrides", [
    dict(layer_scale_init=0.1, pooling_ratio=2),  # stage 2-3 shape, tied head, Llama 3.1 RoPE scaling
    dict(tie_word_embeddings=False, rope_scaling_factor=None),  # stage 1 shape, 8B-style decoder
], ids=["stage2_tied", "stage1_untied"])
def test_save_hf_gives_transformers_identical_logits_and_loads_back(tmp_path, overrides):
    torch.manual_seed(0)
    model = models.create("plm_nano", **overrides).eval()
    with torch.no_grad():
        model.vision.pos_embed.normal_(std=0.5)
    save_hf(model, tmp_path / "hf", tokenizer_dir=_fake_tokenizer_dir(tmp_path / "tok"))
    hf, info = PerceptionLMForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    hf.eval()
    per_tile = model.tokens_per_tile
    media = torch.randn(3, 3, TILE, TILE)
    ids = make_ids(2, 2 * per_tile + 20, [(0, 2, per_tile), (1, 1, 2 * per_tile)])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=media[None], attention_mask=mask).logits
        ours = model(media, ids, mask).logits
    assert (theirs - ours).abs().max() <= 1e-5
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").convert_tokens_to_ids("<|image|>") == IMAGE

    back = load_hf(tmp_path / "hf")
    assert back.cfg.ffn_hidden_size == model.cfg.ffn_hidden_size and back.cfg.pooling_ratio == model.cfg.pooling_ratio
    state, loaded = model.state_dict(), back.state_dict()
    assert state.keys() == loaded.keys() and all(torch.equal(state[k], loaded[k]) for k in state)


def test_sharded_export_loads_in_both_directions(tmp_path):
    torch.manual_seed(0)
    model = models.create("plm_nano").eval()
    save_hf(model, tmp_path, max_shard_size=200_000)  # 2.4 MB of fp32 weights -> many shards and an index
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "model.safetensors.index.json").is_file()
    hf, info = PerceptionLMForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    state, loaded = model.state_dict(), load_hf(tmp_path).state_dict()
    assert all(torch.equal(state[k], loaded[k]) for k in state)


def test_load_hf_rejects_a_directory_that_is_not_perception_lm(tmp_path):
    with pytest.raises(ValueError, match="not a PerceptionLM checkpoint: it has no config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a PerceptionLM checkpoint: its config.json has model_type 'llama'"):
        load_hf(tmp_path)


# -- sizes -----------------------------------------------------------------------------------------------------
def llama_params(vocab, dim, layers, heads, kv_heads, ffn, tied):
    """Llama 3 by the formula: embeddings, per block q/o (d x d), k/v (d x kv * d/h), SwiGLU 3 d ffn, two RMSNorms,
    the final norm, and the head unless tied."""
    kv = kv_heads * dim // heads
    block = 2 * dim * dim + 2 * dim * kv + 3 * dim * ffn + 2 * dim
    return vocab * dim * (1 if tied else 2) + layers * block + dim


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name,published,ffn,pe_lang", [
    # Llama 3.2 1B / 3B and Llama 3.1 8B model cards (parameter counts of the Instruct checkpoints PLM starts
    # from); SwiGLU widths 8192 / 8192 / 14336 from their config.json
    ("plm_1b", 1_235_814_400, 8192, "vit_pe_lang_large_patch14_448"),
    ("plm_3b", 3_212_749_824, 8192, "vit_pe_lang_large_patch14_448"),
    ("plm_8b", 8_030_261_248, 14336, "vit_pe_lang_gigantic_patch14_448"),
])
def test_real_sizes_on_meta_have_the_published_counts(name, published, ffn, pe_lang):
    with torch.device("meta"):
        model = models.create(name, layer_scale_init=0.1)  # the stage-2 tower, which is PE-Lang's shape
        lang = timm.create_model(pe_lang, num_classes=0)
    cfg = model.cfg
    assert cfg.ffn_hidden_size == ffn
    assert count(model.language_model) == published
    assert published == llama_params(128256, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, ffn,
                                     cfg.tie_word_embeddings)
    # timm's PE-Lang tower (PE-Core truncated, LayerScale, no final norm, no pooling) is PLM's, key for key
    assert model.vision.state_dict().keys() == lang.state_dict().keys()
    assert count(model.vision) == count(lang)
    width = model.vision.embed_dim
    assert count(model.projector) == width * cfg.hidden_size + cfg.hidden_size + cfg.hidden_size**2 + cfg.hidden_size
    assert model.tokens_per_tile == 1024  # (448 / 14)^2 at pooling 1


def test_the_8b_tower_has_no_class_token_and_exports_so():
    with torch.device("meta"):
        model = models.create("plm_8b")
    config = hf_config(model)
    assert model.vision.cls_token is None and config.vision_use_cls_token is False
    assert config.vision_config.model_args["depth"] == 47 and config.text_config.tie_word_embeddings is False
    assert config.text_config.rope_parameters["rope_type"] == "default"


def test_class_token_free_positions_match_timm_at_the_native_grid():
    """PE-Core-G's tower has no class token; its position path is checked on a nano tower built the same way."""
    from models.plm import PLMVisionTrunk

    kwargs = dict(img_size=TILE, class_token=False, global_pool="", num_classes=0, use_post_transformer_norm=False)
    ours = timm.create_model("vit_pe_core_nano_patch8_64", dynamic_img_size=True, **kwargs)
    ours.__class__ = PLMVisionTrunk
    reference = timm.create_model("vit_pe_core_nano_patch8_64", **kwargs)
    with torch.no_grad():
        ours.pos_embed.normal_(std=0.5)
    reference.load_state_dict(ours.state_dict())
    images = torch.randn(2, 3, TILE, TILE)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference.forward_features(images), rtol=1e-5, atol=1e-5)


def test_tiles_off_the_tower_native_size_rotate_by_the_raw_patch_index():
    """PLM 1B / 3B run the 336-px PE-Core-L tower on 448-px tiles: PE's RoPE angle is the patch index at any grid,
    so a 12 x 12 grid's angles are the top-left corner of a 16 x 16 grid's (timm would rescale both to 8 x 8)."""
    rope = models.create("plm_nano", image_size=96).vision.rope
    small, large = rope.get_embed(shape=(12, 12)), rope.get_embed(shape=(16, 16))
    torch.testing.assert_close(small.view(12, 12, -1), large.view(16, 16, -1)[:12, :12])


def test_vocab_and_image_token_are_set_at_create_time():
    model = models.create("plm_nano", vocab_size=300, image_token_id=299)
    assert model.language_model.get_input_embeddings().num_embeddings == 300 and model.cfg.image_token_id == 299
    with pytest.raises(ValueError, match="image_token_id 2047 is outside the vocabulary of 300"):
        models.create("plm_nano", vocab_size=300)
    assert isinstance(models.create("plm_nano").cfg, PLMConfig)


def test_sdpa_attention():
    model = models.create("plm_nano")
    assert model.language_model.config._attn_implementation == "sdpa"
