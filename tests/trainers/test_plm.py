"""The PerceptionLM method: the loss is the model's response-only loss and stays finite without targets, stage 1
trains the projector alone while stage 2 trains everything, AdamW decays every parameter on PLM's warmup + cosine
schedule, validation scores exact-match answers and multiple-choice options (checked on a model whose answers are
known and against transformers' own decoding), the stage handoff accepts exactly the new LayerScale gammas, and the
exports load in transformers and timm with identical outputs."""

import json
import math

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader
from timm.models import save_for_hf
from transformers import LlamaConfig, LlamaForCausalLM, PerceptionLMForConditionalGeneration

import models
import trainers.plm as plm
from batch_contract import IGNORE_INDEX, check_batch
from trainers.plm import (
    PLMModelConfig,
    PLMOptimConfig,
    PLMTraining,
    export_pe_lang,
    greedy_decode,
    option_log_probs,
    validation_metrics,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, IMAGE, TILE = 64, 63, 64  # a 64-token vocabulary whose last id is the image placeholder; 64-px tiles
STAGE2 = {"train": ["vision", "projector", "language"], "layer_scale_init": 0.1, "pooling_ratio": 2,
          "drop_path_rate": 0.1}
GAMMAS = {f"vision.blocks.{i}.gamma_{j}" for i in range(3) for j in (1, 2)}


def method(seed: int = 0, optim: dict | None = None, lr: float = 1e-3, total_steps: int = 10, **model) -> PLMTraining:
    torch.manual_seed(seed)
    return PLMTraining({"vocab_size": VOCAB, "image_token_id": IMAGE, **model}, {"warmup_steps": 0, **(optim or {})},
                       lr, total_steps)


def train_batch(per_tile: int, seed: int = 0) -> dict:
    """Two conversations: one tile and a 6-token response in row 0; two tiles and a 3-token response in row 1,
    which is shorter and right padded."""
    g = torch.Generator().manual_seed(seed)
    length = 2 * per_tile + 12
    ids = torch.randint(0, IMAGE, (2, length), generator=g)
    ids[0, 1:1 + per_tile] = IMAGE
    ids[1, 1:1 + 2 * per_tile] = IMAGE
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, length - 4:] = False
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, length - 6:] = ids[0, length - 6:]
    labels[1, length - 7:length - 4] = ids[1, length - 7:length - 4]
    return {"media": torch.randn(3, 3, TILE, TILE, generator=g), "input_ids": ids, "attention_mask": mask,
            "labels": labels}


def adamw_steps(m: PLMTraining, batch: dict, steps: int) -> torch.optim.Optimizer:
    optimizer = m.configure_optimizers()["optimizer"]
    for _ in range(steps):
        m.compute_loss(batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- the loss --------------------------------------------------------------------------------------------------
def test_loss_is_the_models_response_loss_and_counts_the_target_tokens():
    m = method()
    batch = train_batch(m.model.tokens_per_tile)
    assert check_batch(batch, m.batch_keys) == []
    loss = m.compute_loss(batch)
    reference = m.model(batch["media"], batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    assert m.training_metrics()["train/tokens"].item() == 6 + 3


def test_a_batch_without_targets_gives_a_finite_zero_that_reaches_every_trained_weight():
    m = method(**STAGE2)
    batch = train_batch(m.model.tokens_per_tile)
    batch["labels"].fill_(IGNORE_INDEX)
    loss = m.compute_loss(batch)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    for name, p in m.model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and not p.grad.any(), name
    assert m.training_metrics()["train/tokens"].item() == 0


def test_a_text_only_batch_still_reaches_the_projector_in_stage_1():
    m = method()
    batch = train_batch(0)  # no placeholders
    batch["media"] = None
    loss = m.compute_loss(batch)
    assert loss.requires_grad and loss.item() > 0
    loss.backward()
    assert all(p.grad is not None for p in m.model.projector.parameters())


# -- what trains -----------------------------------------------------------------------------------------------
def test_stage1_trains_the_projector_alone_and_keeps_the_rest_bit_identical():
    m = method()
    batch = train_batch(m.model.tokens_per_tile)
    before = {part: state(getattr(m.model, attr)) for part, attr in
              (("vision", "vision"), ("projector", "projector"), ("language", "language_model"))}
    optimizer = adamw_steps(m, batch, 3)
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in m.model.projector.parameters()}
    for part, attr in (("vision", "vision"), ("language", "language_model")):
        after = getattr(m.model, attr).state_dict()
        assert all(torch.equal(after[k], v) for k, v in before[part].items()), part
        assert not any(p.requires_grad for p in getattr(m.model, attr).parameters())
    after = m.model.projector.state_dict()
    assert all(not torch.equal(after[k], v) for k, v in before["projector"].items())


def test_stage2_trains_every_part_including_the_fresh_gammas():
    m = method(**STAGE2)
    assert {n for n, _ in m.model.named_parameters() if "gamma" in n} == GAMMAS
    optimizer = m.configure_optimizers()["optimizer"]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in m.model.parameters()}
    m.compute_loss(train_batch(m.model.tokens_per_tile)).backward()
    for name, p in m.model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_weight_decay_applies_to_norms_biases_and_gammas_too():
    lr, wd = 1e-2, 0.05
    m = method(lr=lr, optim={"weight_decay": wd}, **STAGE2)
    optimizer = m.configure_optimizers()["optimizer"]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [wd]
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-8
    spared_elsewhere = ["vision.norm_pre.weight", "vision.blocks.0.norm1.bias", "vision.blocks.0.gamma_1",
                        "projector.linear_1.bias", "language_model.model.norm.weight"]
    params = dict(m.model.named_parameters())
    before = {name: params[name].detach().clone() for name in spared_elsewhere}
    batch = train_batch(m.model.tokens_per_tile)
    batch["labels"].fill_(IGNORE_INDEX)  # zero gradients: the step is the decay alone, p <- p (1 - lr wd)
    m.compute_loss(batch).backward()
    optimizer.step()
    for name, value in before.items():
        torch.testing.assert_close(params[name].detach(), value * (1 - lr * wd), rtol=1e-6, atol=0)


def test_schedule_warms_up_from_zero_then_decays_to_a_hundredth():
    lr, warmup, total = 1e-4, 4, 20
    m = method(lr=lr, total_steps=total, optim={"warmup_steps": warmup})
    scheduler = m.configure_optimizers()["lr_scheduler"]["scheduler"]
    optimizer = scheduler.optimizer

    def expected(step):  # linear from 0, then half a cosine from lr down to 0.01 lr
        if step < warmup:
            return lr * step / warmup
        return lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))))

    rates = []
    for _ in range(total + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0.0 and max(rates) == pytest.approx(lr) and rates.index(max(rates)) == warmup
    assert rates[total] == pytest.approx(0.01 * lr)
    assert rates == pytest.approx([expected(s) for s in range(total + 1)], rel=1e-9, abs=1e-15)


def test_grad_checkpointing_recomputes_blocks_with_the_same_gradients():
    stage2 = {**STAGE2, "drop_path_rate": 0.0}
    plain, checkpointed = method(**stage2), method(**stage2, grad_checkpointing=True)
    checkpointed.model.load_state_dict(plain.model.state_dict())
    calls = {"vision": 0, "language": 0}

    def counter(part):
        def hook(*_):
            calls[part] += 1
        return hook

    checkpointed.model.vision.blocks[0].norm1.register_forward_pre_hook(counter("vision"))
    checkpointed.model.language_model.model.layers[0].input_layernorm.register_forward_pre_hook(counter("language"))
    batch = train_batch(plain.model.tokens_per_tile)
    losses = []
    for m in (plain, checkpointed):
        m.train()
        losses.append(m.compute_loss(batch))
        losses[-1].backward()
    assert calls == {"vision": 2, "language": 2}  # the forward, and its recomputation in the backward
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    grads = dict(plain.model.named_parameters())
    for name, p in checkpointed.model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-7, msg=name)


def test_configs_refuse_what_plm_does_not_do():
    with pytest.raises(ValueError, match="model.train must name at least one of vision, projector, language"):
        PLMModelConfig(train=["decoder"])
    with pytest.raises(ValueError, match="frozen vision tower"):
        PLMModelConfig(drop_path_rate=0.1)
    with pytest.raises(ValueError, match="set optim.lr_min_ratio, not optim.min_lr"):
        PLMOptimConfig(min_lr=1e-6)
    with pytest.raises(ValueError, match="vision_layer 4 is past the tower's 3 blocks"):
        method(vision_layer=4)


# -- validation ------------------------------------------------------------------------------------------------
def counting_model(m: PLMTraining) -> None:
    """Make the decoder predict token t + 1 after token t, whatever came before: the blocks add nothing to the
    residual stream, token i embeds as the i-th unit vector, and an untied head scores token j by component j - 1."""
    lm = m.model.language_model
    with torch.no_grad():
        for layer in lm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        lm.model.embed_tokens.weight.copy_(torch.eye(VOCAB))  # hidden size 64 = VOCAB
        head = torch.zeros(VOCAB, VOCAB)
        head[1:, :-1] = 10 * torch.eye(VOCAB - 1)
    lm.lm_head.weight = nn.Parameter(head, requires_grad=False)  # unties it; the decoder is frozen in stage 1


def prompt(last: int, length: int, width: int, per_tile: int) -> tuple[list[int], list[bool]]:
    """A tile's placeholders, filler text, then ``last``; right padded with id 0 to ``width``."""
    ids = [1] + [IMAGE] * per_tile + [2] * (length - per_tile - 2) + [last]
    return ids + [0] * (width - length), [True] * length + [False] * (width - length)


def validation_batch(per_tile: int) -> dict:
    # open questions: (prompt's last token, its length, answer); the model answers last + 1, last + 2, ...
    open_q = [(5, per_tile + 10, [6, 7, 8]), (5, per_tile + 6, [6, 9]), (20, per_tile + 3, [21, 22]),
              (30, per_tile + 8, [31, 32, 50, 33])]
    mcq = [(10, per_tile + 5, [[11, 3], [11, 12], [12, 13]], 1), (10, per_tile + 9, [[11, 12], [11, 13]], 1)]
    width = per_tile + 12
    rows = [prompt(last, n, width, per_tile) for last, n, *_ in open_q + mcq]
    return {"media": torch.randn(len(rows), 3, TILE, TILE), "input_ids": torch.tensor([r[0] for r in rows]),
            "attention_mask": torch.tensor([r[1] for r in rows]),
            "answer_ids": [a for *_, a in open_q] + [[] for _ in mcq],
            "choices": [[] for _ in open_q] + [c for *_, c, _ in mcq],
            "answer_index": [-1] * len(open_q) + [i for *_, i in mcq],
            "task": ["count", "count", "count", "stop", "choose", "choose"], "key": [f"s{i}" for i in range(6)]}


def test_validation_scores_exact_match_and_options_on_a_model_with_known_answers(monkeypatch):
    m = method()
    counting_model(m)
    m.eval()
    batch = validation_batch(m.model.tokens_per_tile)
    other_rank = [{"key": "r1", "task": "choose", "kind": "mcq", "prediction": 0, "answer": 0, "correct": True}]
    monkeypatch.setattr(plm, "gather_objects", lambda local: local + other_rank)
    logged = {}
    monkeypatch.setattr(m, "log", lambda name, value, **_: logged.__setitem__(name, value))
    m.on_validation_epoch_start()
    with torch.no_grad():
        m.validation_step(batch, 0)
    m.on_validation_epoch_end()
    # s0 right; s1 says 6 7 for 6 9; s2 is right only if its last real token, not the padding, is read; s3 stops at
    # its end-of-turn id 33 after 31 32; s4 picks [11, 12] (index 1, right), s5 picks [11, 12] too (index 0, wrong)
    assert logged == pytest.approx({"val/acc_choose": 100 * 2 / 3, "val/acc_count": 100 * 2 / 3, "val/acc_stop": 0.0,
                                    "val/vqa_accuracy": 50.0, "val/mcq_accuracy": 100 * 2 / 3})
    assert m.val_examples == [("s0", "count", [6, 7, 8], [6, 7, 8]), ("s1", "count", [6, 7], [6, 9]),
                              ("s3", "stop", [31, 32, 33], [31, 32, 50, 33]), ("s4", "choose", 1, 1),
                              ("s5", "choose", 0, 1)]


def scrambled(m: PLMTraining) -> PLMTraining:
    """Weights large enough that greedy decoding wanders over the vocabulary."""
    with torch.no_grad():
        for p in m.model.language_model.parameters():
            p.normal_(std=0.5)
    return m.eval()


def test_greedy_decoding_of_padded_prompts_equals_transformers_generate_per_prompt():
    m = scrambled(method())
    batch = train_batch(m.model.tokens_per_tile, seed=1)
    lm = m.model.language_model
    lm.generation_config.eos_token_id = None  # Llama's default end id (2) would stop generate early
    with torch.no_grad():
        embeds = m.model.input_embeddings(batch["input_ids"], batch["media"])
        ours = greedy_decode(lm, embeds, batch["attention_mask"], [6, 4], [-1, -1])
        for b, length in enumerate(batch["attention_mask"].sum(1).tolist()):
            theirs = lm.generate(inputs_embeds=embeds[b:b + 1, :length], attention_mask=torch.ones(1, length).long(),
                                 max_new_tokens=len(ours[b]), do_sample=False)
            assert ours[b] == theirs[0].tolist()
    assert [len(row) for row in ours] == [6, 4] and len(set(ours[0])) == 6
    stop = ours[0][2]  # the third token, which occurs nowhere earlier (six distinct tokens)
    with torch.no_grad():
        assert greedy_decode(lm, embeds, batch["attention_mask"], [6, 4], [stop, -1]) == [ours[0][:3], ours[1]]


def test_option_scores_are_summed_log_probabilities_under_teacher_forcing():
    m = scrambled(method())
    batch = train_batch(m.model.tokens_per_tile, seed=2)
    lm = m.model.language_model
    choices = [[[3, 4, 5], [7]], [[8, 9], [1, 2, 3, 4], [6]]]
    with torch.no_grad():
        embeds = m.model.input_embeddings(batch["input_ids"], batch["media"])
        ours = option_log_probs(lm, embeds, batch["attention_mask"], choices)
        for b, length in enumerate(batch["attention_mask"].sum(1).tolist()):
            for option, score in zip(choices[b], ours[b]):
                sequence = torch.cat([embeds[b, :length], lm.get_input_embeddings()(torch.tensor(option))])
                logp = lm(inputs_embeds=sequence[None]).logits[0].double().log_softmax(-1)
                expected = sum(logp[length - 1 + i, t].item() for i, t in enumerate(option))
                assert score == pytest.approx(expected, abs=2e-4)


def test_prompts_must_be_right_padded():
    m = method().eval()
    batch = validation_batch(m.model.tokens_per_tile)
    batch["attention_mask"][0] = batch["attention_mask"][0].flip(0)
    with pytest.raises(ValueError, match="right padded"), torch.no_grad():
        m.validation_step(batch, 0)


def test_validation_metrics_are_means_over_every_rank_in_percent():
    records = [{"task": "a", "kind": "open", "correct": c} for c in (True, False, True, True)]
    records += [{"task": "b", "kind": "mcq", "correct": c} for c in (False, True)]
    assert validation_metrics(records) == {"acc_a": 75.0, "acc_b": 50.0, "vqa_accuracy": 75.0, "mcq_accuracy": 50.0}
    assert validation_metrics(records[:4]) == {"acc_a": 75.0, "vqa_accuracy": 75.0}


def test_lightning_fits_logs_and_validates(tmp_path):
    m = method(optim={"warmup_steps": 1})
    counting_model(m)
    per_tile = m.model.tokens_per_tile
    trainer = L.Trainer(accelerator="cpu", max_steps=2, log_every_n_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    def loader(batches):  # ready-made batches, one per step
        return DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)

    trainer.fit(m, train_dataloaders=loader([train_batch(per_tile, seed=s) for s in range(2)]),
                val_dataloaders=loader([validation_batch(per_tile)]))
    metrics = trainer.callback_metrics
    assert metrics["train/tokens"].item() == 9 and torch.isfinite(metrics["train/loss"])
    assert metrics["val/acc_count"].item() == pytest.approx(100 * 2 / 3) and metrics["val/mcq_accuracy"] == 50.0


# -- weights in and out ----------------------------------------------------------------------------------------
def test_stage1_to_stage2_from_a_hugging_face_export_misses_exactly_the_gammas(tmp_path):
    stage1 = method(seed=1)
    stage1.export(tmp_path)
    stage2 = method(seed=2, **STAGE2)
    lines = stage2.init_from(tmp_path / "hf")
    assert "Hugging Face" in lines[0]
    assert lines[-1].split(": ")[-1].split(", ") == sorted(GAMMAS)
    loaded, source = stage2.model.state_dict(), stage1.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.items())
    assert all(torch.equal(loaded[k], torch.full_like(loaded[k], 0.1)) for k in GAMMAS)


def test_stage1_to_stage2_from_a_prism_checkpoint_and_what_it_refuses(tmp_path):
    stage1 = method(seed=1)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in stage1.model.state_dict().items()}}, ckpt)
    stage2 = method(seed=2, **STAGE2)
    lines = stage2.init_from(ckpt)
    assert lines[-1].split(": ")[-1].split(", ") == sorted(GAMMAS)
    assert torch.equal(stage2.model.projector.linear_1.weight, stage1.model.projector.linear_1.weight)
    assert not any("LayerScale" in line for line in method(seed=3).init_from(ckpt))  # stage 1 -> 1: nothing new

    partial = {k: v for k, v in torch.load(ckpt)["state_dict"].items() if k != "model.projector.linear_1.bias"}
    torch.save({"state_dict": partial}, tmp_path / "partial.ckpt")
    with pytest.raises(ValueError, match=r"missing \[.*'projector.linear_1.bias'"):
        method(**STAGE2).init_from(tmp_path / "partial.ckpt")
    torch.save({"state_dict": {f"model.{k}": v for k, v in stage2.model.state_dict().items()}}, tmp_path / "s2.ckpt")
    with pytest.raises(ValueError, match=r"unexpected \['vision.blocks.0.gamma_1'"):
        method().init_from(tmp_path / "s2.ckpt")  # a stage-1 model has no gammas to take


def test_init_from_a_hugging_face_directory_of_another_tokenizer_fails(tmp_path):
    method(seed=1).export(tmp_path)
    with pytest.raises(ValueError, match="image_token_id: 62 here vs 63 there"):
        method(image_token_id=62).init_from(tmp_path / "hf")


def perturbed_stage2() -> PLMTraining:
    m = method(**STAGE2).eval()
    with torch.no_grad():
        m.model.vision.pos_embed.normal_(std=0.5)
        for name, p in m.model.vision.named_parameters():
            if "gamma" in name:
                p.uniform_(0.05, 0.5)
    return m


def test_export_gives_transformers_identical_logits_and_timm_the_tower(tmp_path):
    m = perturbed_stage2()
    paths = m.export(tmp_path, step=7)
    hf = PerceptionLMForConditionalGeneration.from_pretrained(paths["hf"]).eval()
    batch = train_batch(m.model.tokens_per_tile, seed=3)
    with torch.no_grad():
        theirs = hf(input_ids=batch["input_ids"], pixel_values=batch["media"][None],
                    attention_mask=batch["attention_mask"].long()).logits
        ours = m.model(batch["media"], batch["input_ids"], batch["attention_mask"]).logits
    assert (theirs - ours).abs().max() <= 1e-5

    config = json.loads((paths["pe_lang"] / "config.json").read_text())
    assert config["prism"] == {"vision_layer": 3, "tower_blocks": 3, "source": "PerceptionLM vision tower", "step": 7}
    tower = timm.create_model(config["architecture"], **config["model_args"]).eval()
    tower.load_state_dict(load_file(paths["pe_lang"] / "model.safetensors"), strict=True)
    assert not any(name.startswith(("proj", "attn_pool", "head.")) for name, _ in tower.named_parameters())
    with torch.no_grad():
        features = tower.forward_features(batch["media"])[:, tower.num_prefix_tokens:]
        torch.testing.assert_close(features, m.model.vision(batch["media"]), rtol=0, atol=1e-6)


def test_pe_lang_export_cut_at_an_intermediate_layer(tmp_path):
    m = perturbed_stage2()
    m.model_cfg.vision_layer = 2
    out = m.export(tmp_path)["pe_lang"]
    config = json.loads((out / "config.json").read_text())
    tower = timm.create_model(config["architecture"], **config["model_args"]).eval()
    tower.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    assert len(tower.blocks) == 2 and config["prism"]["vision_layer"] == 2
    images = torch.randn(2, 3, TILE, TILE)
    with torch.no_grad():
        (expected,) = m.model.vision.forward_intermediates(images, indices=[1], norm=False, output_fmt="NLC",
                                                           intermediates_only=True)
        torch.testing.assert_close(tower.forward_features(images)[:, 1:], expected, rtol=0, atol=1e-6)


def test_pe_lang_export_loads_through_timms_local_dir_off_the_towers_native_size(tmp_path):
    """A tower with a pretrained config in timm (PE-Core-T), run at 32 px instead of its 384: the export names the
    RoPE grid the tower really uses."""
    torch.manual_seed(0)
    model = models.create("plm_nano", vision="vit_pe_core_tiny_patch16_384", image_size=32, vision_layers=2,
                          vocab_size=VOCAB, image_token_id=IMAGE).eval()
    export_pe_lang(model, tmp_path)
    tower = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower.forward_features(images)[:, 1:], model.vision(images), rtol=0, atol=1e-6)


def test_a_pe_core_run_starts_the_tower_and_nothing_else(tmp_path):
    """PLM stage 1 starts its tower from PE-Core (apps/plm: strict=False into the kept blocks): the first
    vision_layers blocks, patch embedding and positions come over; PE's last block, pooling, projection and final
    norm stay out; the projector and the decoder keep their own start."""
    torch.manual_seed(1)
    pe = models.create("pe_core_nano")
    path = tmp_path / "pe.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in pe.state_dict().items()}}, path)
    m = method(layer_scale_init=0.1)
    before = {k: v.clone() for k, v in m.model.state_dict().items()}
    lines = m.init_from(path)
    trunk = pe.visual.trunk.state_dict()
    tower = m.model.vision.state_dict()
    for key, value in tower.items():
        if key.endswith(("gamma_1", "gamma_2")):
            assert torch.equal(value, before[f"vision.{key}"]) and torch.all(value == 0.1)
        else:
            assert torch.equal(value, trunk[key]), key
    assert len(pe.visual.trunk.blocks) == 4 and len(m.model.vision.blocks) == 3
    assert all(torch.equal(v, before[k]) for k, v in m.model.state_dict().items() if not k.startswith("vision."))
    assert "PE-Core contrastive run" in lines[0] and "blocks >= 3" in lines[1]

    small = models.create("pe_core_tiny")
    torch.save({"state_dict": {f"model.{k}": v for k, v in small.state_dict().items()}}, path)
    with pytest.raises(ValueError, match=r"does not fit vit_pe_core_nano_patch8_64 with 3 blocks(.|\n)*other shape"):
        method().init_from(path)



def test_captions_are_scored_against_their_references_and_other_tasks_are_not():
    words = {1: "a", 2: "red", 3: "circle", 4: "on", 5: "blue", 6: "green", 7: "star", 8: "grey"}
    decode = lambda ids: " ".join(words[i] for i in ids)  # noqa: E731
    record = lambda key, task, pred, answer: {"key": key, "task": task, "kind": "open", "prediction": pred,  # noqa: E731
                                              "answer": answer, "correct": pred == answer}
    exact = [record("k0", "image_caption", [1, 2, 3, 4, 5], [1, 2, 3, 4, 5]),
             record("k1", "image_caption", [1, 6, 7, 4, 8], [1, 6, 7, 4, 8])]
    scores = plm.caption_metrics(exact + [record("k2", "image_colour", [2], [5])], decode)
    assert scores == pytest.approx({"caption_bleu4": 100.0, "caption_cider": 10.0}, abs=1e-4)
    wrong = plm.caption_metrics([exact[0], record("k1", "image_caption", [1, 2, 7, 4, 8], [1, 6, 7, 4, 8])], decode)
    assert wrong["caption_bleu4"] < 100.0 and wrong["caption_cider"] < 10.0
    assert plm.caption_metrics(exact[:1], decode) == {}


def test_stage1_starts_from_a_timm_pe_directory_and_a_hugging_face_llama(tmp_path):
    """PLM stage 1 starts from PE-Core and Llama 3: a timm tower directory (timm's own save_for_hf, as the hub's
    PE-Core repositories hold it) gives the vision tower, a LlamaForCausalLM.save_pretrained directory the
    decoder, the projector keeps its start; a Llama of another size is refused with the field that differs."""
    torch.manual_seed(2)
    pe = models.create("pe_core_nano")
    save_for_hf(pe.visual.trunk, tmp_path / "pe", safe_serialization=True)
    m = method()
    before = state(m.model)
    torch.manual_seed(3)
    llama = LlamaForCausalLM(LlamaConfig(**m.model.language_model.config.to_dict())).eval()
    llama.save_pretrained(tmp_path / "llama")
    lines = m.init_from([str(tmp_path / "pe"), str(tmp_path / "llama")])
    assert "timm PE tower directory" in lines[0] and "Hugging Face Llama directory" in lines[2]

    trunk = pe.visual.trunk.state_dict()
    assert all(torch.equal(v, trunk[k]) for k, v in m.model.vision.state_dict().items())
    assert all(torch.equal(v, before[f"projector.{k}"]) for k, v in m.model.projector.state_dict().items())
    ids = torch.randint(0, IMAGE, (2, 9))
    with torch.no_grad():
        assert torch.equal(m.model.language_model(input_ids=ids).logits, llama(input_ids=ids).logits)

    wider = LlamaConfig(**{**llama.config.to_dict(), "hidden_size": 2 * llama.config.hidden_size})
    LlamaForCausalLM(wider).save_pretrained(tmp_path / "wider")
    with pytest.raises(ValueError, match=r"does not fit this PerceptionLM's decoder: hidden_size"):
        method().init_from(str(tmp_path / "wider"))


def test_a_pe_tower_of_another_size_has_its_position_table_resampled_bilinearly_with_the_class_row_kept(tmp_path):
    """PLM-1B/3B start from PE-Core-L14-336 at 448 px: the 24 x 24 table goes to 32 x 32 by bilinear interpolation
    (align_corners False), the class token's row as it was (apps/plm/interpolate_PE_pos_embed.py). Here a 4 x 4
    table goes to the nano tower's 8 x 8."""
    torch.manual_seed(4)
    trunk = models.create("pe_core_nano").visual.trunk.state_dict()
    small = torch.randn(1, 1 + 4 * 4, trunk["pos_embed"].shape[-1])
    trunk["pos_embed"] = small
    path = tmp_path / "pe.ckpt"
    torch.save({"state_dict": {f"model.visual.trunk.{k}": v for k, v in trunk.items()}}, path)
    m = method()
    lines = m.init_from(path)
    grid = small[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    by_hand = torch.nn.functional.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False)
    expected = torch.cat([small[:, :1], by_hand.permute(0, 2, 3, 1).reshape(1, 64, -1)], dim=1)
    assert torch.allclose(m.model.vision.pos_embed, expected, atol=1e-6)
    assert "position table resampled from 4x4 to 8x8" in lines[-1]
