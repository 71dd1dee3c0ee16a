"""Training data: text files tokenised once into a memory-mapped token file, a held-out split by document,
and a seeded, resumable sampler of windows that each rank reads its own share of.

Token file (``*.tokens``), little-endian::

    magic b"RKTOKENS" | version u32 | itemsize u32 (2: uint16, 4: uint32) | vocab_size u64 | documents u64
    | tokens u64 | metadata bytes u64 | metadata (UTF-8 JSON) | padding to 8 bytes
    | document offsets u64[documents + 1] | tokens (uint16 or uint32)[tokens]

Documents are the files, a long file cut at line ends into pieces of about :data:`DOCUMENT_BYTES` (so that
a single large file still splits); with a tokenizer that has an end-of-text token, each document ends with
it. Text is tokenised into a cache folder under a fingerprint of the files (paths, sizes, modification
times) and the tokenizer, and reused while neither changes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import struct
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..progress import Progress
from .tokenizers import Tokenizer

MAGIC, VERSION = b"RKTOKENS", 1


_HEADER = struct.Struct("<8sIIQQQQ")


DOCUMENT_BYTES = 1 << 16


SPLIT_SEED = "held-out"  # the split never depends on the training seed: runs with different seeds share it


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "recursive-kernels",
                        "tokens")


def find_files(paths: Sequence[str]) -> List[Tuple[str, bool]]:
    """``(file, named)`` for every file that ``paths`` (files, folders searched recursively, glob patterns)
    name, in order, without repeats; ``named``: given as a file itself (not found in a folder or by a
    pattern). Hidden files and folders and ``__pycache__`` are skipped in folders."""
    found: Dict[str, bool] = {}
    for path in paths:
        if os.path.isfile(path):
            found.setdefault(os.path.abspath(path), True)
            continue
        if os.path.isdir(path):
            matches = []
            for folder, subfolders, files in os.walk(path):
                subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d != "__pycache__")
                matches += [os.path.join(folder, name) for name in sorted(files) if not name.startswith(".")]
        else:
            matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not matches:
            raise ValueError(f"data: {path!r} matches no file")
        for match in matches:
            found.setdefault(os.path.abspath(match), False)
    return list(found.items())


def read_text(path: str) -> Optional[str]:
    """The file's text, or None when it is not UTF-8 text (a NUL byte, or bytes that do not decode)."""
    with open(path, "rb") as f:
        data = f.read()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def split_document(text: str, size: int = DOCUMENT_BYTES) -> List[str]:
    """``text`` cut at line ends into pieces of about ``size`` characters (whole lines; one piece when short)."""
    pieces, start = [], 0
    while len(text) - start > size:
        end = text.find("\n", start + size)
        if end < 0:
            break
        pieces.append(text[start:end + 1])
        start = end + 1
    pieces.append(text[start:])
    return pieces


def calibration_windows(paths: Sequence[str], tokenizer: Tokenizer, num_tokens: int, seq_len: int) -> Tensor:
    """(N, seq_len) int64 token ids, N = ceil(num_tokens / seq_len): the middle window of files spread evenly over
    the UTF-8 text files that ``paths`` name (:func:`find_files`), skipping files shorter than a window; what
    activation-aware conversion calibrates on. Raises ValueError naming ``calibration`` when the files hold fewer
    windows than asked for."""
    files = [path for path, _ in find_files(paths)]
    wanted = -(-num_tokens // seq_len)
    windows: List[Tensor] = []
    for index in np.unique(np.linspace(0, len(files) - 1, min(len(files), 4 * wanted)).round().astype(np.int64)):
        text = read_text(files[int(index)])
        ids = tokenizer.encode(text) if text else []
        if len(ids) >= seq_len:
            start = (len(ids) - seq_len) // 2
            windows.append(torch.tensor(ids[start:start + seq_len], dtype=torch.int64))
        if len(windows) == wanted:
            return torch.stack(windows)
    raise ValueError(f"calibration: {len(files)} file(s) hold {len(windows)} window(s) of {seq_len} tokens, "
                     f"{wanted} wanted for {num_tokens} tokens")


@dataclass
class TokenFile:
    """A token file opened read-only: ``tokens`` (memory-mapped numpy array), ``offsets`` ((documents + 1,)
    int64, document d is ``tokens[offsets[d]:offsets[d + 1]]``), ``vocab_size`` and ``metadata``."""

    path: str
    tokens: np.ndarray
    offsets: np.ndarray
    vocab_size: int
    metadata: dict

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def open(cls, path: str) -> "TokenFile":
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size or head[:8] != MAGIC:
                raise ValueError(f"data: {path!r} is not a token file (no {MAGIC!r} header)")
            _, version, itemsize, vocab_size, documents, tokens, meta_bytes = _HEADER.unpack(head)
            if version != VERSION or itemsize not in (2, 4):
                raise ValueError(f"data: {path!r} is a token file of version {version}, itemsize {itemsize}; "
                                 f"this package reads version {VERSION} with itemsize 2 or 4")
            metadata = json.loads(f.read(meta_bytes).decode("utf-8"))
        offsets_at = _aligned(_HEADER.size + meta_bytes)
        tokens_at = offsets_at + 8 * (documents + 1)
        if size != tokens_at + itemsize * tokens:
            raise ValueError(f"data: {path!r} is truncated or damaged ({size} bytes, its header asks for "
                             f"{tokens_at + itemsize * tokens})")
        offsets = np.fromfile(path, dtype="<u8", count=documents + 1, offset=offsets_at).astype(np.int64)
        array = np.memmap(path, dtype="<u2" if itemsize == 2 else "<u4", mode="r", offset=tokens_at, shape=(tokens,))
        return cls(path, array, offsets, vocab_size, metadata)


def _aligned(n: int) -> int:
    return (n + 7) // 8 * 8


def is_token_file(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def write_token_file(path: str, documents: Iterator[Sequence[int]], vocab_size: int, metadata: dict) -> None:
    """Write ``documents`` (token id sequences) as a token file at ``path`` (atomically: a partial file is never
    left under ``path``)."""
    dtype = np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")
    meta = json.dumps(metadata, sort_keys=True).encode("utf-8")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=folder, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            header_size = _aligned(_HEADER.size + len(meta))
            f.write(b"\0" * header_size)  # rewritten below, once the counts are known
            body = tempfile.TemporaryFile(dir=folder)
            offsets = [0]
            with body:
                for document in documents:
                    array = np.asarray(document, dtype=np.int64)
                    if array.size and (array.min() < 0 or array.max() >= vocab_size):
                        raise ValueError(f"data: token ids outside [0, {vocab_size}) in document {len(offsets) - 1}")
                    body.write(array.astype(dtype).tobytes())
                    offsets.append(offsets[-1] + array.size)
                f.write(np.asarray(offsets, dtype="<u8").tobytes())
                body.seek(0)
                while chunk := body.read(1 << 24):
                    f.write(chunk)
            f.seek(0)
            f.write(_HEADER.pack(MAGIC, VERSION, dtype.itemsize, vocab_size, len(offsets) - 1, offsets[-1], len(meta)))
            f.write(meta)
        os.chmod(temporary, 0o644)  # mkstemp makes it private; a cache is for whoever can read the folder
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def tokenize_files(paths: Sequence[str], tokenizer: Tokenizer, cache_dir: Optional[str] = None,
                   progress: bool = True) -> TokenFile:
    """The token file of the text files ``paths`` name (see :func:`find_files`), built on the first call and
    read from ``cache_dir`` (default :func:`default_cache_dir`) while the files and the tokenizer are the same.

    A file named by its own path must be non-empty UTF-8 text; in folders and patterns, empty and binary files
    are skipped. Raises ValueError naming ``data`` when nothing usable is left.
    """
    files = find_files(paths)
    digest = hashlib.sha256(f"{VERSION}\0{DOCUMENT_BYTES}\0{tokenizer.fingerprint}".encode())
    for path, _ in files:
        stat = os.stat(path)
        digest.update(f"\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    cached = os.path.join(cache_dir or default_cache_dir(), f"{digest.hexdigest()[:24]}.tokens")
    if os.path.exists(cached):
        return TokenFile.open(cached)
    texts: List[Tuple[str, int]] = []
    skipped = 0
    for path, named in files:
        size = os.path.getsize(path)
        text = read_text(path) if size else None
        if text is None or not text.strip():
            if named:
                raise ValueError(f"data: {path!r} is {'empty' if not size or text is not None else 'not UTF-8 text'}")
            skipped += 1
            continue
        texts.append((path, size))
    if not texts:
        raise ValueError(f"data: {', '.join(map(repr, paths))} hold no text file ({skipped} empty or binary skipped)")

    bar = Progress(sum(size for _, size in texts), progress, unit=None)

    def documents() -> Iterator[List[int]]:
        for path, size in texts:
            for piece in split_document(read_text(path)):
                ids = tokenizer.encode(piece)
                if tokenizer.eos_token_id is not None:
                    ids.append(tokenizer.eos_token_id)
                yield ids
            bar.step(f"tokenising {os.path.basename(path)}", count=size)

    with bar:
        write_token_file(cached, documents(), tokenizer.vocab_size,
                         {"tokenizer": tokenizer.fingerprint, "files": len(texts), "skipped": skipped})
    return TokenFile.open(cached)


def split_documents(num_documents: int, eval_fraction: float) -> Tuple[List[int], List[int]]:
    """(train, held-out) document indices: ``eval_fraction`` of the documents (at least one), chosen by a fixed
    seed, so every run on the same data holds out the same ones."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction: expected a number in [0, 1), got {eval_fraction!r}")
    if eval_fraction == 0:
        return list(range(num_documents)), []
    if num_documents < 2:
        raise ValueError(f"eval_fraction: the data has {num_documents} document, none can be held out (pass 0, or "
                         "more or longer files)")
    count = min(num_documents - 1, max(1, round(eval_fraction * num_documents)))
    held_out = set(random.Random(SPLIT_SEED).sample(range(num_documents), count))
    return [d for d in range(num_documents) if d not in held_out], sorted(held_out)


class TokenStream:
    """Some documents of a token array read as one stream (the documents' tokens back to back).

    Args:
        tokens: (N,) integer array (a token file's memory map, or any numpy array).
        ranges: ``(start, end)`` pieces of ``tokens`` in stream order (default: all of it).
        vocab_size: every id is known to be below it (a token file's vocabulary, checked when it was written);
            None: unknown.
    """

    def __init__(self, tokens: np.ndarray, ranges: Optional[Sequence[Tuple[int, int]]] = None,
                 vocab_size: Optional[int] = None) -> None:
        self.vocab_size = vocab_size
        merged: List[List[int]] = []
        for start, end in ranges if ranges is not None else [(0, len(tokens))]:
            if end <= start:
                continue
            if merged and merged[-1][1] == start:
                merged[-1][1] = end
            else:
                merged.append([start, end])
        self.tokens = tokens
        self.starts = np.asarray([start for start, _ in merged], dtype=np.int64)
        lengths = np.asarray([end - start for start, end in merged], dtype=np.int64)
        self.cumulative = np.concatenate([[0], np.cumsum(lengths)])  # stream offset of each piece

    @classmethod
    def of_documents(cls, token_file: TokenFile, documents: Sequence[int]) -> "TokenStream":
        return cls(token_file.tokens, [(int(token_file.offsets[d]), int(token_file.offsets[d + 1])) for d in documents],
                   token_file.vocab_size)

    @classmethod
    def of_tensor(cls, tokens: Tensor) -> "TokenStream":
        return cls(tokens.numpy())

    def __len__(self) -> int:
        return int(self.cumulative[-1])

    def max_token(self) -> int:
        pieces = [self.tokens[s:s + n] for s, n in zip(self.starts, np.diff(self.cumulative)) if n]
        return max(int(piece.max()) for piece in pieces) if pieces else -1

    def token_beyond(self, vocab_size: int) -> Optional[int]:
        """The largest id of the stream when it is ``vocab_size`` or more, else None; reads the tokens only when
        the stream's own ``vocab_size`` does not already bound them (a start-up pass over a large corpus)."""
        if self.vocab_size is not None and self.vocab_size <= vocab_size:
            return None
        largest = self.max_token()
        return largest if largest >= vocab_size else None

    def windows(self, starts: Sequence[int], length: int) -> Tensor:
        """(len(starts), length) int64 token ids: the stream's windows at ``starts``."""
        if not starts:
            return torch.empty(0, length, dtype=torch.int64)
        return torch.from_numpy(np.stack([self.read(start, length) for start in starts]))

    def read(self, start: int, length: int) -> np.ndarray:
        """Stream positions ``[start, start + length)`` as an int64 array."""
        out = np.empty(length, dtype=np.int64)
        piece = int(np.searchsorted(self.cumulative, start, side="right")) - 1
        done = 0
        while done < length:
            offset = start + done - int(self.cumulative[piece])
            take = min(length - done, int(self.cumulative[piece + 1]) - start - done)
            begin = int(self.starts[piece]) + offset
            out[done:done + take] = self.tokens[begin:begin + take]
            done += take
            piece += 1
        return out


class WindowSampler:
    """Windows of ``seq_len`` tokens of a stream, each epoch a seeded permutation of its non-overlapping
    windows (shifted by a seeded offset within the stream's slack), drawn without replacement; a batch that
    runs past an epoch's end continues in the next. The state (epoch, position in it) makes a run resumable;
    batches are global, and each rank reads only its rows.
    """

    def __init__(self, stream: TokenStream, seq_len: int, seed: int) -> None:
        self.stream, self.seq_len, self.seed = stream, seq_len, seed
        self.num_windows = len(stream) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"seq_len: {seq_len} is longer than the training data ({len(stream)} tokens)")
        self.epoch, self.position = 0, 0
        self._order: Optional[Tuple[int, Tensor, int]] = None

    def _epoch_order(self, epoch: int) -> Tuple[Tensor, int]:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            slack = len(self.stream) - self.num_windows * self.seq_len
            shift = int(torch.randint(0, slack + 1, (1,), generator=generator))
            self._order = (epoch, torch.randperm(self.num_windows, generator=generator), shift)
        return self._order[1], self._order[2]

    def next_starts(self, count: int) -> List[int]:
        """The stream start of each of the next ``count`` windows, advancing the state."""
        starts = []
        while len(starts) < count:
            order, shift = self._epoch_order(self.epoch)
            take = min(count - len(starts), self.num_windows - self.position)
            starts += [shift + self.seq_len * int(w) for w in order[self.position:self.position + take]]
            self.position += take
            if self.position == self.num_windows:
                self.epoch, self.position = self.epoch + 1, 0
        return starts

    def read(self, starts: Sequence[int]) -> Tensor:
        """(len(starts), seq_len) int64 token ids."""
        return self.stream.windows(starts, self.seq_len)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_windows": self.num_windows,
                "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seq_len", "seed", "num_windows"):
            if state[key] != getattr(self, key):
                raise ValueError(f"resume: the checkpoint's sampler has {key} {state[key]}, this run's data gives "
                                 f"{getattr(self, key)} (other data, --seq-len or --seed)")
        self.epoch, self.position = state["epoch"], state["position"]


def eval_windows(stream: TokenStream, seq_len: int, limit: int) -> List[int]:
    """Stream starts of up to ``limit`` non-overlapping windows spread evenly over the held-out stream."""
    count = len(stream) // seq_len
    if count == 0:
        return []
    chosen = np.linspace(0, count - 1, min(limit, count)).round().astype(np.int64)
    return [seq_len * int(w) for w in np.unique(chosen)]
