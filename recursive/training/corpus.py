"""Text that every machine has, for the demo and the tests: a synthetic language the package generates,
and the Python standard library's own source files.

The synthetic corpus is English-like text from a small probabilistic grammar (:func:`synthetic_corpus`):
determiners, adjectives, nouns and verbs that agree in number across a relative clause ("these old
dogs that the teacher likes chase a red ball ."), read as bytes (token id = byte value, all below 128).
It is deterministic for a seed and learnable: a model's loss falls well below the corpus's unigram
entropy once it picks up spelling, word order and agreement.

The standard library's sources (:func:`stdlib_sources`) are real text that no one here wrote: what the
tests, the README's example and ``reproduce`` train on, read at run time, never downloaded.
"""

from __future__ import annotations

import os
import random
import sysconfig
from typing import List

import torch
from torch import Tensor

CORPUS_VOCAB_SIZE = 128  # bytes of ASCII text


_NOUNS = {  # singular -> plural
    "cat": "cats", "dog": "dogs", "bird": "birds", "child": "children", "teacher": "teachers",
    "robot": "robots", "farmer": "farmers", "mouse": "mice", "ball": "balls", "river": "rivers",
}


_VERBS = {  # third person singular -> plural
    "sees": "see", "likes": "like", "chases": "chase", "finds": "find", "helps": "help", "watches": "watch",
}


_DETERMINERS = {False: ("the", "a", "this", "every"), True: ("the", "some", "these", "many")}


_ADJECTIVES = ("small", "big", "red", "old", "happy", "quiet")


_PLACES = ("near the river", "in the garden", "at night", "after school")


def synthetic_corpus(num_bytes: int = 1 << 18, seed: int = 0) -> str:
    """Sentences of the package's grammar, joined by spaces, at least ``num_bytes`` characters long
    (whole sentences), the same for the same seed."""
    if isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or num_bytes < 1:
        raise ValueError(f"num_bytes: expected an int >= 1, got {num_bytes!r}")
    rng = random.Random(seed)

    def noun_phrase(plural: bool) -> str:
        noun = rng.choice(list(_NOUNS))
        words = [rng.choice(_DETERMINERS[plural])]
        if rng.random() < 0.4:
            words.append(rng.choice(_ADJECTIVES))
        words.append(_NOUNS[noun] if plural else noun)
        return " ".join(words)

    def verb(plural: bool) -> str:
        singular = rng.choice(list(_VERBS))
        return _VERBS[singular] if plural else singular

    sentences, size = [], 0
    while size < num_bytes:
        plural = rng.random() < 0.5
        words = [noun_phrase(plural)]
        if rng.random() < 0.3:  # a relative clause between the subject and its verb
            inner = rng.random() < 0.5
            words += ["that", noun_phrase(inner), verb(inner)]
        words += [verb(plural), noun_phrase(rng.random() < 0.5)]
        if rng.random() < 0.3:
            words.append(rng.choice(_PLACES))
        sentence = " ".join(words) + " ."
        sentences.append(sentence)
        size += len(sentence) + 1
    return " ".join(sentences)


def encode(text: str) -> Tensor:
    """ASCII text -> (len,) int64 byte ids."""
    data = text.encode("ascii")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def unigram_entropy(tokens: Tensor) -> float:
    """The entropy (nats) of the tokens' frequencies: the loss of the best model that ignores context."""
    counts = torch.bincount(tokens).double()
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * probs.log()).sum())


def stdlib_sources(limit: int = 0) -> List[str]:
    """The Python standard library's own ``.py`` files holding UTF-8 text (its top folder and packages, not
    ``site-packages`` or the tests; no empty ``__init__.py``), sorted by path; the first ``limit`` of them when
    ``limit`` > 0."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders
                               if d not in ("site-packages", "test", "tests", "idlelib", "__pycache__")
                               and not d.startswith("."))
        paths += [os.path.join(folder, name) for name in sorted(files) if name.endswith(".py")]
    kept = []
    for path in sorted(paths):
        with open(path, "rb") as f:
            data = f.read()
        try:
            if data.decode("utf-8").strip():
                kept.append(path)
        except UnicodeDecodeError:
            continue
        if len(kept) == limit:
            break
    return kept
