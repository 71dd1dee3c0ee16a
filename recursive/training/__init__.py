"""Training: data (text files tokenised once into a memory-mapped token file, a held-out split, a seeded
resumable window sampler), the training loop (evaluation, metrics, checkpoints that resume exactly, DDP or
FSDP2 under torchrun) and the corpora every machine has (a synthetic language, the standard library's
sources). ``python -m recursive train`` is its command line."""

from .checkpoint import list_checkpoints, resolve_checkpoint
from .corpus import CORPUS_VOCAB_SIZE, encode, stdlib_sources, synthetic_corpus, unigram_entropy
from .data import TokenFile, TokenStream, WindowSampler, split_documents, tokenize_files, write_token_file
from .distributed import World, init_from_environment
from .tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer
from .trainer import SCHEDULES, Trainer, TrainingArguments, TrainingResult, learning_rate_factor, train

__all__ = [
    "CORPUS_VOCAB_SIZE",
    "SCHEDULES",
    "ByteTokenizer",
    "HFTokenizer",
    "TokenFile",
    "TokenStream",
    "Trainer",
    "TrainingArguments",
    "TrainingResult",
    "WindowSampler",
    "World",
    "encode",
    "init_from_environment",
    "learning_rate_factor",
    "list_checkpoints",
    "load_tokenizer",
    "resolve_checkpoint",
    "split_documents",
    "stdlib_sources",
    "synthetic_corpus",
    "tokenize_files",
    "train",
    "unigram_entropy",
    "write_token_file",
]
