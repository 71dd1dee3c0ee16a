"""recursive.training's data: the corpora every machine has (the synthetic language, its unigram entropy), token
files, text files tokenised into them (bytes or a Hugging Face tokenizer, cached), the held-out split by document,
the stream over some documents, and the seeded window sampler."""

import math
import os

import numpy as np
import pytest
import torch

from recursive.training import (
    CORPUS_VOCAB_SIZE,
    ByteTokenizer,
    TokenFile,
    TokenStream,
    WindowSampler,
    encode,
    load_tokenizer,
    split_documents,
    stdlib_sources,
    synthetic_corpus,
    tokenize_files,
    unigram_entropy,
    write_token_file,
)
from recursive.training.data import eval_windows, find_files, split_document
from tests.helpers import save_hf_tokenizer


def test_corpus_is_deterministic_ascii_with_agreement():
    text = synthetic_corpus(5000, seed=3)
    assert len(text) >= 5000 and text == synthetic_corpus(5000, seed=3) and text != synthetic_corpus(5000, seed=4)
    tokens = encode(text)
    assert tokens.dtype == torch.int64 and int(tokens.max()) < CORPUS_VOCAB_SIZE
    assert bytes(tokens.tolist()).decode("ascii") == text
    corpus = synthetic_corpus(seed=0)
    assert " cats see " in corpus and " cat sees " in corpus
    assert " cats sees " not in corpus and " cat see " not in corpus  # verbs agree with their subjects


def test_unigram_entropy_of_uniform_and_constant_tokens():
    assert unigram_entropy(torch.arange(8).repeat(5)) == pytest.approx(math.log(8))
    assert unigram_entropy(torch.full((10,), 3)) == 0.0


def test_token_file_round_trip_and_damage(tmp_path):
    documents = [[1, 2, 3], [], [65535, 0], [7] * 5]
    path = str(tmp_path / "a.tokens")
    write_token_file(path, iter(documents), 65536, {"note": "x"})
    token_file = TokenFile.open(path)
    assert token_file.tokens.dtype == np.dtype("<u2") and token_file.vocab_size == 65536
    assert token_file.metadata == {"note": "x"} and token_file.num_documents == 4
    assert [token_file.tokens[a:b].tolist() for a, b in zip(token_file.offsets, token_file.offsets[1:])] == documents
    wide = str(tmp_path / "b.tokens")
    write_token_file(wide, iter([[70000, 1]]), 70001, {})
    assert TokenFile.open(wide).tokens.dtype == np.dtype("<u4") and TokenFile.open(wide).tokens.tolist() == [70000, 1]

    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:-1])
    with pytest.raises(ValueError, match="data: .* truncated"):
        TokenFile.open(path)
    (tmp_path / "c.tokens").write_bytes(b"not a token file at all, just bytes")
    with pytest.raises(ValueError, match="not a token file"):
        TokenFile.open(str(tmp_path / "c.tokens"))
    with pytest.raises(ValueError, match="outside"):
        write_token_file(str(tmp_path / "d.tokens"), iter([[5]]), 5, {})
    assert not (tmp_path / "d.tokens").exists() and not list(tmp_path.glob("*.partial"))  # nothing half written


def test_find_files_expands_folders_and_patterns(tmp_path):
    (tmp_path / "x").mkdir()
    for name in ("x/a.txt", "x/b.py", "x/.hidden", "c.txt"):
        (tmp_path / name).write_text("text\n")
    found = find_files([str(tmp_path / "x"), str(tmp_path / "*.txt"), str(tmp_path / "x" / "a.txt")])
    assert found == [(str(tmp_path / "x" / "a.txt"), False), (str(tmp_path / "x" / "b.py"), False),
                     (str(tmp_path / "c.txt"), False)]
    assert find_files([str(tmp_path / "c.txt")]) == [(str(tmp_path / "c.txt"), True)]
    with pytest.raises(ValueError, match="data: .*nothing.txt.* matches no file"):
        find_files([str(tmp_path / "nothing.txt")])


def test_long_texts_split_at_line_ends():
    text = "".join(f"line {i}\n" for i in range(3000))
    pieces = split_document(text, size=1000)
    assert "".join(pieces) == text and len(pieces) > 10
    assert all(piece.endswith("\n") for piece in pieces) and all(len(piece) < 1100 for piece in pieces)
    assert split_document("short", size=1000) == ["short"]


def test_stdlib_text_tokenises_to_bytes_once_and_is_cached(tmp_path):
    paths = stdlib_sources(limit=3)
    token_file = tokenize_files(paths, ByteTokenizer(), str(tmp_path), progress=False)
    texts = [open(p, encoding="utf-8").read() for p in paths]
    assert bytes(token_file.tokens.tolist()) == "".join(texts).encode("utf-8")
    assert token_file.vocab_size == 256 and token_file.num_documents >= len(paths)
    again = tokenize_files(paths, ByteTokenizer(), str(tmp_path), progress=False)
    assert again.path == token_file.path and len(os.listdir(tmp_path)) == 1  # read from the cache, not rebuilt
    assert tokenize_files(paths[:2], ByteTokenizer(), str(tmp_path), progress=False).path != token_file.path


def test_empty_and_binary_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)))
    (tmp_path / "text.txt").write_text("hello\n")
    cache = str(tmp_path / "cache")
    with pytest.raises(ValueError, match="data: .*empty.txt.* is empty"):
        tokenize_files([str(tmp_path / "empty.txt")], ByteTokenizer(), cache, progress=False)
    with pytest.raises(ValueError, match="data: .*blob.bin.* is not UTF-8 text"):
        tokenize_files([str(tmp_path / "blob.bin")], ByteTokenizer(), cache, progress=False)
    folder = tokenize_files([str(tmp_path / "*.*")], ByteTokenizer(), cache, progress=False)  # skipped in a pattern
    assert bytes(folder.tokens.tolist()) == b"hello\n" and folder.metadata["skipped"] == 2
    with pytest.raises(ValueError, match="data: .* hold no text file"):
        tokenize_files([str(tmp_path / "*.bin")], ByteTokenizer(), cache, progress=False)


def test_hugging_face_tokenizer_adds_end_of_text(tmp_path):
    pytest.importorskip("transformers")
    save_hf_tokenizer(str(tmp_path / "tok"), vocab_size=300)
    tokenizer = load_tokenizer(str(tmp_path / "tok"))
    assert tokenizer.vocab_size == 300 and tokenizer.eos_token_id is not None
    paths = stdlib_sources(limit=2)
    token_file = tokenize_files(paths, tokenizer, str(tmp_path / "cache"), progress=False)
    last = [int(token_file.tokens[end - 1]) for end in token_file.offsets[1:]]
    assert set(last) == {tokenizer.eos_token_id}  # every document ends with it
    first = token_file.tokens[token_file.offsets[0]:token_file.offsets[1] - 1].tolist()
    assert tokenizer.decode(first) == split_document(open(paths[0], encoding="utf-8").read())[0]
    assert load_tokenizer(str(tmp_path)) is None  # a folder without tokenizer files


def test_held_out_split_is_by_document_and_fixed():
    train_docs, held_out = split_documents(100, 0.1)
    assert len(held_out) == 10 and sorted(train_docs + held_out) == list(range(100))
    assert split_documents(100, 0.1) == (train_docs, held_out)  # whatever the training seed
    assert split_documents(3, 0.01)[1] != [] and split_documents(5, 0.0) == ([0, 1, 2, 3, 4], [])
    with pytest.raises(ValueError, match="eval_fraction"):
        split_documents(1, 0.1)
    with pytest.raises(ValueError, match="eval_fraction"):
        split_documents(10, 1.0)


def test_stream_reads_across_documents():
    tokens = np.arange(100)
    stream = TokenStream(tokens, [(10, 20), (50, 55), (55, 60), (0, 3)])
    expected = list(range(10, 20)) + list(range(50, 60)) + [0, 1, 2]
    assert len(stream) == len(expected) and stream.max_token() == 59
    assert stream.token_beyond(60) is None and stream.token_beyond(50) == 59
    # a token file's vocabulary bounds its ids: no pass over them (these made-up ids break the bound on purpose)
    bounded = TokenStream(tokens, vocab_size=64)
    assert bounded.token_beyond(64) is None and bounded.token_beyond(50) == 99
    for start in range(len(expected)):
        for length in range(len(expected) - start + 1):
            assert stream.read(start, length).tolist() == expected[start:start + length]


def test_sampler_draws_each_window_once_per_epoch_and_resumes():
    stream = TokenStream(np.arange(1000))
    sampler = WindowSampler(stream, 32, seed=3)
    assert sampler.num_windows == 31
    epoch = sampler.next_starts(31)
    shift = min(epoch) % 32
    assert sorted(epoch) == [shift + 32 * w for w in range(31)]  # without replacement, one seeded shift
    assert sampler.state_dict()["epoch"] == 1 and sampler.next_starts(31) != epoch  # a new order each epoch
    assert WindowSampler(stream, 32, seed=4).next_starts(31) != epoch

    straight = WindowSampler(stream, 32, seed=3)
    first = straight.next_starts(20)
    rest = straight.next_starts(40)  # runs into the next epoch
    resumed = WindowSampler(stream, 32, seed=3)
    resumed.next_starts(20)
    state = resumed.state_dict()
    fresh = WindowSampler(stream, 32, seed=3)
    fresh.load_state_dict(state)
    assert fresh.next_starts(40) == rest and first == epoch[:20]
    batch = fresh.read(rest[:3])
    assert batch.shape == (3, 32) and batch.dtype == torch.int64 and batch[:, 0].tolist() == rest[:3]
    with pytest.raises(ValueError, match="resume: .*seq_len"):
        WindowSampler(stream, 16, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        WindowSampler(TokenStream(np.arange(10)), 32, seed=0)


def test_eval_windows_spread_over_the_stream():
    stream = TokenStream(np.arange(1000))
    assert eval_windows(stream, 100, 64) == [100 * w for w in range(10)]
    starts = eval_windows(stream, 10, 5)
    assert len(starts) == 5 and starts[0] == 0 and starts[-1] == 990
