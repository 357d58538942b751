"""A CLIP tokenizer built offline from a closed vocabulary (each word becomes one BPE token)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_clip_tokenizer(words: Iterable[str], folder: Path, max_length: int = 77) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` whose merges spell every word of ``words`` as a single token.

    The vocabulary and merges files are written to ``folder`` (the tokenizer reads them from there).
    Letters are in the vocabulary too, so an unknown word still tokenizes (letter by letter).
    """
    vocab = {BOS: 0, EOS: 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(letter, len(vocab))
        vocab.setdefault(letter + "</w>", len(vocab))
    # BPE training on the word list: merge the most frequent adjacent pair everywhere, until every word
    # is one token. Learning each merge on all words at once keeps the merge ranks consistent, so that
    # applying them by rank spells every word whole.
    words = [[*w[:-1], w[-1] + "</w>"] for w in dict.fromkeys(words)]
    merges = []
    while True:
        pairs = Counter(pair for w in words for pair in zip(w, w[1:], strict=False))
        if not pairs:
            break
        (left, right), _ = pairs.most_common(1)[0]
        merges.append(f"{left} {right}")
        vocab.setdefault(left + right, len(vocab))
        for i, w in enumerate(words):
            merged, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == (left, right):
                    merged.append(left + right)
                    j += 2
                else:
                    merged.append(w[j])
                    j += 1
            words[i] = merged
        words = [w for w in words if len(w) > 1]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length, pad_token=EOS
    )
