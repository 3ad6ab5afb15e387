"""Caption metrics as the COCO caption evaluation computes them (pycocoevalcap, the coco-caption code): corpus BLEU-1..4
(Papineni et al. 2002) and CIDEr-D (Vedantam et al. 2015; x 10, document frequencies from the references of the
evaluated set). Captions are lower-cased and split into words with punctuation removed, which is what coco-caption's
PTB tokenizer does to plain English captions (that tokenizer itself needs Java)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(caption: str) -> str:
    """A caption as the scorers read it: lower-case words joined by single spaces."""
    return " ".join(_WORD.findall(caption.lower()))


def caption_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """``bleu1`` .. ``bleu4`` (0-1) and ``cider`` (0-10 for a caption equal to all its references) of one predicted
    caption per key against that key's references. CIDEr needs at least two keys (its idf is 0 for one)."""
    if set(predictions) != set(references) or not predictions:
        raise ValueError(f"caption_scores needs the same keys on both sides, got {len(predictions)} predictions "
                         f"and {len(references)} reference sets ({sorted(set(predictions) ^ set(references))[:5]} "
                         "differ)")
    # Imported here: the package carries about 100 MB of Java tools besides these two scorers, and a training run
    # that never scores captions (a benchmark, a machine without it) should not need it.
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    res = {k: [words(p)] for k, p in predictions.items()}
    gts = {k: [words(r) for r in refs] for k, refs in references.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {**{f"bleu{n}": float(b) for n, b in enumerate(bleu, 1)}, "cider": float(cider)}
