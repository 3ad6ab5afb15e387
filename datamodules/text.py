"""CLIP's byte-pair tokenizer for captions, offline: the vocabulary file ships inside the open_clip wheel
(``bpe_simple_vocab_16e6.txt.gz``, the same file as facebookresearch/perception_models
core/vision_encoder/bpe_simple_vocab_16e6.txt.gz), so nothing is downloaded.

A caption becomes ``[SOT] tokens [EOT]`` padded with 0 to the context length; a caption too long for the context is
cut and keeps EOT as its last token (open_clip src/open_clip/tokenizer.py:SimpleTokenizer.__call__), because the
text tower pools at EOT. In a batch the ids travel as ``text_tokens`` and the real tokens are marked by
``text_mask`` (batch_contract).
"""

from __future__ import annotations

import torch
from open_clip.tokenizer import SimpleTokenizer

PE_CORE_CONTEXT = 32
"""Perception Encoder Core's text context (PE-Core-T/S/B/L; G uses 72)."""
END_TOKEN = 49407
"""The id of ``<end_of_text>``, the last of the vocabulary's 49408 entries (synthetic batches end with it)."""


class CaptionTokenizer:
    """Captions -> ``(text_tokens (B, L) int64, text_mask (B, L) bool)``, cheap enough to run in loader workers."""

    def __init__(self, context_length: int = PE_CORE_CONTEXT):
        if context_length < 3:
            raise ValueError(f"A text context of {context_length} tokens cannot hold a caption: it needs the start "
                             f"and end tokens and at least one word (PE-Core uses {PE_CORE_CONTEXT}).")
        self.context_length = context_length
        self._bpe = SimpleTokenizer(context_length=context_length)
        self.eot_token_id = self._bpe.eot_token_id

    def __call__(self, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self._bpe([texts] if isinstance(texts, str) else list(texts))
        # EOT is the largest id of the vocabulary, so its position is the argmax; the mask runs up to it. (Id 0 is
        # both the padding and a real byte token, so ``tokens != 0`` would not do.)
        ends = tokens.argmax(dim=-1, keepdim=True)
        mask = torch.arange(self.context_length) <= ends
        return tokens, mask

    def num_tokens(self, text: str) -> int:
        """Tokens of ``text`` with its start and end tokens, before any cut to the context."""
        return len(self._bpe.encode(text)) + 2

    def check_fits(self, texts: list[str], what: str) -> None:
        """Stop before any compute when a text that must be read whole (a prompt template with a class name) does
        not fit the context: cut, it would lose the words that tell the classes apart."""
        longest = max(texts, key=self.num_tokens)
        if self.num_tokens(longest) > self.context_length:
            raise ValueError(f"{what} {longest!r} is {self.num_tokens(longest)} tokens, more than the text context "
                             f"of {self.context_length}: raise the context or shorten the text.")
