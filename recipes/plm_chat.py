"""Ask a PerceptionLM about an image, a video or nothing at all: the answer (greedy decoding) goes to stdout.

    python -m recipes.plm_chat --init_from runs/plm --image photo.jpg "What is in the image?"
    python -m recipes.plm_chat --init_from runs/plm/stage2 --video frames/ "What moves?" --max_new_tokens 32
    python -m recipes.plm_chat --init_from runs/plm --image a.png "Which? A. cube B. ball" --options "A. cube" "B. ball"

--init_from: a PLM stage run (recipes.plm_train: its export, with the tiles and frames of its config.yaml), a pipeline
(recipes.plm: its last finished stage) or a Hugging Face PerceptionLM directory. --options scores each option as the
whole answer and prints them best first with their log-likelihoods. Runs on the GPU in bf16 when there is one."""

import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import torch

from datamodules.chat import IMAGE_MARKER, VIDEO_MARKER, load_tokenizer
from datamodules.conversations import answer_tokens, encode_prompt
from datamodules.plm_transforms import PLMImageTransform, read_image, read_video, video_frames
from models.plm import load_hf
from recipes.cli import build_parser
from trainers.eval_model import plm_export
from trainers.plm import greedy_decode, option_log_probs

HF_VISUAL = {"vision_input": "thumb+tile", "max_num_tiles": 16, "max_video_frames": 16}  # no run: PLM stage 2's


@dataclass
class Config:
    """The model and what it is shown; the question and --options follow."""

    init_from: str
    """A PLM stage run directory, a PLM pipeline directory or a Hugging Face PerceptionLM directory."""
    image: str | None = None
    """A .jpg / .png image to ask about."""
    video: str | None = None
    """A folder of .jpg / .png frames (natural name order) or, where PyAV is installed, a video file."""
    max_new_tokens: int = 64
    """Tokens generated at most; the answer ends earlier at <|eot_id|>."""
    vision_input: Literal["vanilla", "thumb+tile"] | None = None
    """vanilla: one squashed tile; thumb+tile: a thumbnail and a grid of tiles. None: the run's, else thumb+tile."""
    max_num_tiles: int | None = None
    """Tiles of the grid at most (thumb+tile). None: the run's, else 16."""
    max_video_frames: int | None = None
    """Frames sampled from the video at most. None: the run's, else 16."""
    fps: float | None = None
    """Frame rate of a folder of frames (a video file has its own). None: frames sampled from all of them."""


def read_inputs(cfg: Config) -> tuple[Path, dict, str | None, list]:
    """The model's directory, the visual settings, the medium and its pictures: every input checked before compute."""
    if cfg.image is not None and cfg.video is not None:
        raise ValueError("give --image or --video, not both: one picture or one clip per question")
    if cfg.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    hf, data = plm_export(cfg.init_from)
    visual = {k: getattr(cfg, k) if getattr(cfg, k) is not None else data.get(k, v) for k, v in HF_VISUAL.items()}
    if cfg.video is not None:
        return hf, visual, "video", read_video(cfg.video, visual["max_video_frames"], cfg.fps)
    return hf, visual, None if cfg.image is None else "image", [] if cfg.image is None else [read_image(cfg.image)]


def load_chat(hf: Path, visual: dict, kind: str | None, pictures: list, question: str,
              max_new_tokens: int = 64) -> tuple:
    """The tokenizer, the model on its device, the pictures as tiles or frames and the prompt's ids: what can be
    wrong with the inputs (no tokenizer, a prompt past the model's context) fails here, before any compute."""
    tokenizer = load_tokenizer(hf)
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    model = load_hf(hf).to(device, dtype).eval()
    size = model.cfg.image_size  # tiles and frames are the tower's input size
    media = (PLMImageTransform(visual["vision_input"], size, visual["max_num_tiles"])(pictures[0]) if kind == "image"
             else video_frames(pictures, size) if kind == "video" else None)
    marker = {"image": IMAGE_MARKER + "\n", "video": VIDEO_MARKER + "\n"}.get(kind, "")
    turns = [{"from": "human", "value": marker + question}, {"from": "gpt", "value": ""}]  # the prompt, then ""
    visual_tokens = len(media) * model.tokens_per_tile if kind else 0
    prompt, _ = encode_prompt(tokenizer, turns, [visual_tokens] if kind else [], sys.maxsize)
    context = model.cfg.max_position_embeddings
    if len(prompt) + max_new_tokens > context:
        raise ValueError(f"the prompt is {len(prompt)} tokens ({visual_tokens} of them the {kind or 'picture'}'s) and "
                         f"the answer may take {max_new_tokens} more, past the model's context of {context} tokens: "
                         "ask a shorter question, or pass a smaller --max_num_tiles, --max_video_frames or "
                         "--max_new_tokens")
    print(f"[plm_chat] {hf} on {device}: {len(prompt)} prompt tokens, "
          f"{f'{len(media)} tiles of {size} px from the {kind}' if kind else 'no picture'}", file=sys.stderr)
    return tokenizer, model, None if media is None else media.to(device, dtype), torch.tensor([prompt], device=device)


def respond(tokenizer, model, media: torch.Tensor | None, ids: torch.Tensor, max_new_tokens: int = 64,
            options: list[str] | None = None) -> str:
    """The greedy answer, or with ``options`` one "log-likelihood<TAB>option" line per option, best first."""
    with torch.no_grad():
        embeds = model.input_embeddings(ids, media)
    lm, mask = model.language_model, torch.ones_like(ids)
    if options:
        scores = option_log_probs(lm, embeds, mask, [[answer_tokens(tokenizer, option) for option in options]])[0]
        return "\n".join(f"{score:.4f}\t{option}" for score, option in sorted(zip(scores, options), reverse=True))
    generated = greedy_decode(lm, embeds, mask, [max_new_tokens], [tokenizer.eot_token_id])[0]
    return tokenizer.decode(generated, skip_special_tokens=True).strip()


if __name__ == "__main__":
    parser = build_parser(Config, "python -m recipes.plm_chat", __doc__)
    parser.add_argument("question", help="The question (before --options, or after --).")
    parser.add_argument("--options", nargs="+", help="Multiple choice: the answers to rank by their likelihood.")
    args = parser.parse_args()
    cfg = Config(**{f.name: args[f.name] for f in fields(Config)})
    try:
        chat = load_chat(*read_inputs(cfg), args.question, cfg.max_new_tokens)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    print(respond(*chat, cfg.max_new_tokens, args.options))
