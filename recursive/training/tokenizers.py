"""Text <-> token ids for training and generation: bytes, or the Hugging Face tokenizer saved beside a model.

A model directory says which: Hugging Face tokenizer files (``tokenizer.json`` or ``tokenizer_config.json``,
kept by ``python -m recursive convert``) or ``bytes_tokenizer.json`` (written when a model was trained on
bytes); a directory with neither has no tokenizer. Both kinds share one small interface: ``encode``,
``decode``, ``vocab_size`` (the ids it can produce, what the model's vocabulary must cover), ``eos_token_id``,
``fingerprint`` (what tokenised data is cached under) and ``save_pretrained``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from typing import List, Optional, Union

BYTES_TOKENIZER_FILE = "bytes_tokenizer.json"


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255; no end-of-document token (documents are joined as they are)."""

    vocab_size = 256
    eos_token_id: Optional[int] = None
    fingerprint = "bytes"

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: List[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, BYTES_TOKENIZER_FILE), "w") as f:
            json.dump({"type": "bytes", "vocab_size": self.vocab_size}, f)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face tokenizer (``transformers.AutoTokenizer``, local files only) read from ``directory``, or
    from the GGUF file ``gguf_file`` in it (which needs the ``gguf`` package)."""

    def __init__(self, directory: str, gguf_file: Optional[str] = None) -> None:
        where = os.path.join(directory, gguf_file) if gguf_file else directory
        if importlib.util.find_spec("transformers") is None:
            raise ValueError(f"tokenizer: {where!r} holds a Hugging Face tokenizer, which needs transformers "
                             "(pip install transformers)")
        from transformers import AutoTokenizer

        try:
            options = dict(gguf_file=gguf_file) if gguf_file else dict(local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(directory, **options)
        except Exception as exc:  # transformers raises many kinds for a broken tokenizer folder
            raise ValueError(f"tokenizer: cannot load the tokenizer in {where!r} ({type(exc).__name__}: {exc})") \
                from None
        self.directory = where
        self.vocab_size = len(self.tokenizer)
        self.eos_token_id = self.tokenizer.eos_token_id
        digest = hashlib.sha256()
        if gguf_file:  # the tokenizer as its fast backend serialises it: the GGUF file is mostly weights
            digest.update(self.tokenizer.backend_tokenizer.to_str().encode())
        else:
            for name in sorted(os.listdir(directory)):
                if name.startswith("tokenizer") or name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
                    with open(os.path.join(directory, name), "rb") as f:
                        digest.update(name.encode() + b"\0" + f.read())
        self.fingerprint = f"hf-{digest.hexdigest()[:16]}"

    def encode(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids)

    def save_pretrained(self, directory: str) -> None:
        self.tokenizer.save_pretrained(directory)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.directory!r}, vocab_size={self.vocab_size})"


Tokenizer = Union[ByteTokenizer, HFTokenizer]


def load_tokenizer(directory: str) -> Optional[Tokenizer]:
    """The tokenizer saved in ``directory`` (a model directory or a tokenizer's own, or a GGUF file, which
    carries its tokenizer), or None when it holds none."""
    if os.path.isfile(directory) and directory.lower().endswith(".gguf"):
        return HFTokenizer(os.path.dirname(os.path.abspath(directory)), os.path.basename(directory))
    if not os.path.isdir(directory):
        raise ValueError(f"tokenizer: {directory!r} is neither a directory nor a GGUF file")
    if any(os.path.isfile(os.path.join(directory, name)) for name in HF_TOKENIZER_FILES):
        return HFTokenizer(directory)
    if os.path.isfile(os.path.join(directory, BYTES_TOKENIZER_FILE)):
        return ByteTokenizer()
    return None


def check_vocabulary(tokenizer: Tokenizer, vocab_size: int, argument: str) -> None:
    """Raise, naming ``argument``, when ``tokenizer`` can produce ids the model's ``vocab_size`` lacks."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{argument}: the tokenizer ({tokenizer!r}) produces ids up to {tokenizer.vocab_size - 1}, "
                         f"the model's vocabulary has {vocab_size}")
