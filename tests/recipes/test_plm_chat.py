"""``python -m recipes.plm_chat`` answers as transformers' PerceptionLM does: the greedy answer equals
``generate(do_sample=False)`` of the exported model on a prompt and tiles built here by hand (Llama 3's dialog layout
with the exported tokenizer, crops of the image, PIL's bicubic thumbnail, frames picked by the uniform-sampling
formula), the multiple-choice ranking follows log-likelihoods summed from its logits, and every bad input is refused
with a message that says what to do, before any compute."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoTokenizer, PerceptionLMForConditionalGeneration

from datamodules.chat import train_tokenizer
from datamodules.conversations import ConversationDataConfig
from recipes.plm_chat import Config, read_inputs
from trainers.build import LoggingConfig, TrainerConfig
from trainers.plm import PLMModelConfig, PLMOptimConfig, PLMTraining
from trainers.run import save_config

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
TILE, PER_TILE = 64, 16  # plm_nano's 64 px tiles: 8 x 8 patches, 2 x 2 pooling
QUESTION = "What colour is the cube in the picture?"
TEXTS = ["Describe the image.", "A red cube left of a blue ball.", "What colour is the cube?", "The cube is red.",
         "Which shape moves?", "A green ball rolls to the right.", "user", "assistant", "\n\n"] * 4


def normalise(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) with PE's mean = std = 0.5."""
    return (torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.5


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished stage run: a trained tokenizer, a plm_nano with stage-2 pooling and scrambled weights exported to
    export/hf, and its config.yaml (4 tiles, 4 video frames, thumb+tile)."""
    root = tmp_path_factory.mktemp("plm_chat")
    tokenizer = train_tokenizer(TEXTS, 320, root / "tokenizer")
    torch.manual_seed(0)
    model = PLMModelConfig(vocab_size=len(tokenizer), image_token_id=tokenizer.image_token_id, pooling_ratio=2,
                           layer_scale_init=0.1, train=["vision", "projector", "language"])
    method = PLMTraining(model)
    with torch.no_grad():  # large enough weights that greedy decoding wanders and the picture changes it
        for p in [*method.model.language_model.parameters(), *method.model.projector.parameters()]:
            p.normal_(std=0.5)
    method.export(root / "run" / "export", tokenizer_dir=root / "tokenizer")
    data = ConversationDataConfig(tokens_per_tile=PER_TILE, vision_input="thumb+tile", max_num_tiles=4,
                                  max_video_frames=4, tokenizer=str(root / "tokenizer"))
    config = {"run_dir": str(root / "run"), "seed": 0, "init_from": None, "model": asdict(model), "data": asdict(data),
              "optim": asdict(PLMOptimConfig()), "trainer": asdict(TrainerConfig()), "logging": asdict(LoggingConfig())}
    save_config(yaml.safe_dump(config, sort_keys=False), root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def hf(run):
    return (PerceptionLMForConditionalGeneration.from_pretrained(run / "export" / "hf").eval(),
            AutoTokenizer.from_pretrained(run / "export" / "hf"))


@pytest.fixture(scope="module")
def image(run) -> Path:
    """A 128 x 64 JPEG: on a grid of at most 4 tiles of 64 px its canvas is 2 x 1, the image itself."""
    pixels = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(run.parent / "picture.jpg", quality=95)
    return run.parent / "picture.jpg"


def chat(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "recipes.plm_chat", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode:
        raise AssertionError(f"plm_chat exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def prompt_ids(tokenizer, visual_tokens: int, question: str = QUESTION) -> torch.Tensor:
    """Llama 3's dialog prompt as meta-llama/llama3 tokenizer.py:ChatFormat lays it out (each header's role and blank
    line encoded on their own), with the exported tokenizer: the picture's placeholders on a line before the question,
    then the assistant's header."""
    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    def header(role: str) -> list[int]:
        return ids("<|start_header_id|>") + ids(role) + ids("<|end_header_id|>") + ids("\n\n")

    content = "<|image|>" * visual_tokens + "\n" + question if visual_tokens else question
    prompt = [tokenizer.bos_token_id, *header("user"), *ids(content), *ids("<|eot_id|>"), *header("assistant")]
    assert prompt.count(tokenizer.convert_tokens_to_ids("<|image|>")) == visual_tokens
    return torch.tensor([prompt])


def their_answer(hf, visual_tokens: int, tiles: torch.Tensor | None, max_new_tokens: int) -> str:
    model, tokenizer = hf
    ids = prompt_ids(tokenizer, visual_tokens)
    pixels = {} if tiles is None else {"pixel_values": tiles[None]}  # (1, tiles, 3, 64, 64)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **pixels, do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.convert_tokens_to_ids("<|eot_id|>"),
                             pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    assert len(set(new)) > 3, f"a degenerate model: {new}"
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def image_tiles(path: Path) -> torch.Tensor:
    """thumb+tile with 4 tiles: the thumbnail (the image squashed to 64 x 64, PIL bicubic), then its left and right
    64 x 64 crops."""
    picture = Image.open(path).convert("RGB")
    whole = np.asarray(picture)
    thumbnail = np.asarray(picture.resize((TILE, TILE), Image.BICUBIC))
    return torch.stack([normalise(thumbnail), normalise(whole[:, :TILE]), normalise(whole[:, TILE:])])


def test_answers_about_an_image_as_transformers_generate(run, hf, image):
    proc = chat("--init_from", str(run), "--image", str(image), QUESTION, "--max_new_tokens", "12")
    tiles = image_tiles(image)
    assert proc.stdout == their_answer(hf, 3 * PER_TILE, tiles, 12) + "\n"
    assert their_answer(hf, 3 * PER_TILE, -tiles, 12) != proc.stdout.strip()  # the picture matters
    assert "3 tiles of 64 px from the image" in proc.stderr


def test_answers_about_a_folder_of_frames_from_the_last_finished_stage_of_a_pipeline(run, hf, tmp_path):
    frames = tmp_path / "clip"
    frames.mkdir()
    rng = np.random.default_rng(1)
    pixels = [rng.integers(0, 256, (TILE, TILE, 3), dtype=np.uint8) for _ in range(10)]
    for t, frame in enumerate(pixels, start=1):  # frame1 ... frame10: name order is not natural order
        Image.fromarray(frame).save(frames / f"frame{t}.png")
    pipeline = tmp_path / "plm"
    for stage in ("lm", "stage1", "stage2"):
        (pipeline / stage).mkdir(parents=True)
        shutil.copy(run / "config.yaml", pipeline / stage / "config.yaml")
    (pipeline / "stage1" / "export").symlink_to(run / "export")  # lm has no export: choosing it would fail
    for stage in ("lm", "stage1"):  # stage2 is unfinished
        (pipeline / stage / "stage.json").write_text(json.dumps({"hf": str(run / "export" / "hf")}))
    proc = chat("--init_from", str(pipeline), "--video", str(frames), QUESTION, "--max_new_tokens", "10")
    picked = [0, 3, 6, 9]  # round(i (10 - 1) / (4 - 1)) for i < 4: the run's 4 frames of 10, evenly
    tiles = torch.stack([normalise(pixels[i]) for i in picked])
    assert proc.stdout == their_answer(hf, 4 * PER_TILE, tiles, 10) + "\n"
    assert "last finished stage, stage1" in proc.stderr


def test_answers_text_only_from_a_hugging_face_directory(run, hf):
    proc = chat("--init_from", str(run / "export" / "hf"), QUESTION, "--max_new_tokens", "8")
    assert proc.stdout == their_answer(hf, 0, None, 8) + "\n"


def test_ranks_options_by_their_log_likelihood(run, hf, image):
    options = ["red", "a blue ball", "The cube is green."]
    proc = chat("--init_from", str(run / "export" / "hf"), "--image", str(image), "--vision_input", "vanilla", QUESTION,
                "--options", *options)
    model, tokenizer = hf
    tile = normalise(np.asarray(Image.open(image).convert("RGB").resize((TILE, TILE), Image.BICUBIC)))[None]
    prompt = prompt_ids(tokenizer, PER_TILE)
    scores = {}
    for option in options:
        answer = tokenizer.encode(option, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|eot_id|>")]
        ids = torch.cat([prompt, torch.tensor([answer])], 1)
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=tile[None]).logits[0, prompt.shape[1] - 1:-1]
        scores[option] = logits.log_softmax(-1).gather(1, torch.tensor(answer)[:, None]).sum().item()
    lines = [line.split("\t") for line in proc.stdout.splitlines()]
    assert [option for _, option in lines] == sorted(options, key=scores.get, reverse=True)
    for score, option in lines:
        assert float(score) == pytest.approx(scores[option], abs=1e-3)
    assert len({round(s, 2) for s in scores.values()}) == 3


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("case, message", [
    ("missing", "no such directory"),
    ("not_plm", "is not a PerceptionLM run"),
    ("not_plm_hf", "is not a PerceptionLM: its config.json has model_type 'llama'"),
    ("unfinished", "the run has not finished (no export/hf yet); rerun its training command to finish it: "
                   "python -m recipes.plm_train --config"),
    ("pipeline", "no stage of this PLM pipeline has finished; rerun its training command to finish one: "
                 "python -m recipes.plm --config"),
    ("unreadable", "is not a readable image"),
    ("both", "give --image or --video, not both"),
    ("empty_clip", "no frames in the folder"),
    ("video_file", "reading a video file needs PyAV"),
])
def test_bad_inputs_are_refused_before_compute(run, image, tmp_path, case, message):
    if case == "video_file" and _has_pyav():
        pytest.skip("PyAV is installed: a video file is read")
    (tmp_path / "notes.jpg").write_text("not a picture")
    (tmp_path / "clip").mkdir()
    (tmp_path / "movie.mp4").write_bytes(b"\0" * 64)
    other = tmp_path / "other_run"
    other.mkdir()
    (other / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "vit_base_patch16_224"}, "data": {}}))
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run / "config.yaml", unfinished / "config.yaml")
    (tmp_path / "pipeline" / "stage1").mkdir(parents=True)
    init_from = {"missing": tmp_path / "nowhere", "not_plm": other, "not_plm_hf": tmp_path / "llama",
                 "unfinished": unfinished,
                 "pipeline": tmp_path / "pipeline"}.get(case, run)
    media = {"unreadable": {"image": str(tmp_path / "notes.jpg")}, "empty_clip": {"video": str(tmp_path / "clip")},
             "both": {"image": str(image), "video": str(tmp_path / "clip")},
             "video_file": {"video": str(tmp_path / "movie.mp4")}}.get(case, {})
    with pytest.raises(ValueError) as err:
        read_inputs(Config(init_from=str(init_from), **media))
    assert message in str(err.value)


def test_the_command_line_reports_a_bad_input_without_a_traceback(run, image):
    proc = chat("--init_from", str(run), "--image", str(image), "--video", str(image), QUESTION, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "error: give --image or --video, not both" in proc.stderr and "Traceback" not in proc.stderr


def test_a_missing_tokenizer_and_a_prompt_past_the_context_are_reported_before_compute(run, image, tmp_path):
    bare = tmp_path / "hf"
    shutil.copytree(run / "export" / "hf", bare)
    (bare / "tokenizer.json").unlink()
    proc = chat("--init_from", str(bare), QUESTION, check=False)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert f"{bare} has no tokenizer.json" in proc.stderr

    context = json.loads((bare / "config.json").read_text())["text_config"]["max_position_embeddings"]
    proc = chat("--init_from", str(run), "--image", str(image), "--max_new_tokens", str(context), QUESTION,
                check=False)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert f"the answer may take {context} more, past the model's context of {context} tokens" in proc.stderr
