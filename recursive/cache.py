"""What attention reads besides its queries: key/value caches and the packing of padded batches.

- :class:`KVCache`: what attention extends and reads, which :class:`LayerKV` and the engine's slot caches implement.
- :class:`LayerKV`: one effective layer's cached keys and values (and the QK/OV circuit's).
- :class:`RecursionKV`: a Mixture-of-Recursions recursion's cache (the tokens that ran it only).
- :class:`SharedKeyValue`: another layer's keys for a layer to attend over (Mixture-of-Recursions' KV sharing).
- :class:`VarlenPacking`: where the real tokens of a padded batch are, for the varlen attention kernels;
  :class:`PrefixSplit`: a prefix LM's attention as two such calls.
- :func:`ints_to_device`: host integer lists to the device in one copy that does not wait for queued work.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import accumulate
from typing import List, NamedTuple, Optional, Protocol, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor


class KVCache(Protocol):
    """One effective layer's cache as attention sees it: ``append(new)`` stores ``new``, the keys and values of
    the layer's new tokens (a :class:`LayerKV`), and returns the :class:`LayerKV` that attention reads, new
    tokens included. :class:`LayerKV` (a tensor per field, extended by concatenation) and
    :class:`recursive.generation.engine_run.SlotCache` (written in place into preallocated slots) implement it."""

    def append(self, new: "LayerKV") -> "LayerKV": ...


class LayerKV(NamedTuple):
    """One effective layer's cached keys and values, after RoPE, token-major: ``key``, ``value`` (B, S, Hkv, D);
    with the QK/OV circuit also ``key_c`` (B, S, Hkv, R) and ``value_c`` (B, S, Hkv, R), else None. (Token-major
    as the varlen kernels and the engine's slot caches read keys: a row's keys are consecutive rows.)

    Attention extends a cache through :meth:`append` (the :class:`KVCache` interface).
    """

    key: Tensor
    value: Tensor
    key_c: Optional[Tensor] = None
    value_c: Optional[Tensor] = None

    def append(self, new: "LayerKV") -> "LayerKV":
        """This cache followed by ``new`` (B, S', Hkv, .) along the sequence, as a new LayerKV."""
        if (self.key_c is None) != (new.key_c is None):
            raise ValueError("past_key_value: cached with and used without the QK/OV circuit, or the reverse")
        return LayerKV(*(None if p is None else torch.cat((p, n), dim=1) for p, n in zip(self, new)))


class SharedKeyValue(NamedTuple):
    """Another layer's keys and values for a layer to attend over instead of its own (Mixture-of-
    Recursions' KV sharing: later recursions reuse the first one's).

    ``key_value``: that layer's :class:`LayerKV` (B, Sk, Hkv, .); ``query_length``: that layer's
    queries were the last ``query_length`` of those keys (all of them without a cache); ``query_rows``:
    (B, Sq) int64, the row of each query among those ``query_length`` (its token's place; unique per
    sequence); ``packing``: that layer's :class:`VarlenPacking` (None: no padding). Attention scatters
    the queries into those rows and attends as that layer did (causal by that order), then gathers them.
    """

    key_value: LayerKV
    query_length: int
    query_rows: Tensor
    packing: Optional["VarlenPacking"] = None


def ints_to_device(device, *columns: Sequence[int]) -> List[Tensor]:
    """Host integer lists as int64 tensors on ``device``, in one copy; on a GPU from pinned memory, so
    that the copy does not wait for the queued work (one from ordinary host memory does)."""
    packed = torch.tensor([value for column in columns for value in column], dtype=torch.long)
    if torch.device(device).type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    else:
        packed = packed.to(device)
    return list(packed.split([len(column) for column in columns]))


@dataclass(frozen=True)
class VarlenPacking:
    """Where the real (unpadded) tokens of a padded batch are, for :func:`recursive_kernels.circuit_attention_varlen`.

    Built once per forward from a Hugging Face ``attention_mask`` (1 real, 0 padding) and shared by every
    layer. Attention then runs on the real tokens only: a query sees the real keys of its sequence (and,
    when causal, those not after it), which is exact for left, right or any other padding; padded query
    rows get zeros.

    Attributes:
        query_rows: (total_q,) int64 rows of the flattened (B * Sq) queries that are real.
        key_rows: (total_k,) int64 rows of the flattened (B * Sk) keys that are real.
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 offsets of each sequence's real queries and keys.
        max_seqlen_q, max_seqlen_k: the longest of them.
        query_mask: (B, Sq) bool, True at real queries.
        every_query: every query is real (``query_rows`` is ``0 .. B * Sq - 1``): attention then takes the
            queries as they are, with no gather and no scatter back.
        every_key: every key is real (``key_rows`` is ``0 .. B * Sk - 1``): attention reads the token-major keys
            in place, with no gather.
        prefix: a prefix LM's first forward (:meth:`prefix_lm`): how attention splits into a causal and a
            bidirectional call (:class:`PrefixSplit`); None: attention as the layer's own (causal or not).
    """

    query_rows: Tensor
    key_rows: Tensor
    cu_seqlens_q: Tensor
    cu_seqlens_k: Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    query_mask: Tensor
    every_query: bool = False
    every_key: bool = False
    prefix: Optional["PrefixSplit"] = None

    @classmethod
    def uniform(cls, batch: int, query_length: int, key_length: int, device) -> "VarlenPacking":
        """No padding: every row's ``query_length`` queries are the last of its ``key_length`` keys. Decoding takes
        this packing over a cache instead of the dense op, which reads keys head-major and would copy the
        token-major cache into that layout at every layer."""
        rows = torch.arange(batch + 1, device=device, dtype=torch.int32)
        return cls(query_rows=torch.arange(batch * query_length, device=device),
                   key_rows=torch.arange(batch * key_length, device=device), cu_seqlens_q=rows * query_length,
                   cu_seqlens_k=rows * key_length, max_seqlen_q=query_length, max_seqlen_k=key_length,
                   query_mask=torch.ones(batch, query_length, dtype=torch.bool, device=device), every_query=True,
                   every_key=True)

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], width: int, device) -> "VarlenPacking":
        """A batch of ``width`` columns whose row b holds ``lengths[b]`` real tokens first, then padding,
        as its queries and keys (no cache), from counts the host knows: nothing is read back from the
        device (a synchronisation on a GPU), unlike :meth:`from_attention_mask`."""
        cumulative = list(accumulate(lengths, initial=0))
        rows = [b * width + i for b, length in enumerate(lengths) for i in range(length)]
        rows, cu, lengths_d = ints_to_device(device, rows, cumulative, lengths)
        cu = cu.to(torch.int32)
        longest = max(lengths, default=0)
        return cls(query_rows=rows, key_rows=rows, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                   max_seqlen_k=longest, query_mask=torch.arange(width, device=device) < lengths_d[:, None])

    @classmethod
    def from_attention_mask(cls, attention_mask: Tensor, query_length: int, *,
                            queries_real: bool = False) -> "VarlenPacking":
        """``attention_mask`` (B, Sk) covers the cached and the new tokens; the queries are its last
        ``query_length`` columns. ``queries_real``: the caller knows they are all real tokens (a decoding
        step's new tokens), so that the packing says so (``every_query``) without reading the mask back."""
        if attention_mask.dim() != 2 or not 0 <= query_length <= attention_mask.shape[1]:
            raise ValueError(
                f"attention_mask: expected (B, Sk) with Sk >= the {query_length} queries, "
                f"got {tuple(attention_mask.shape)}"
            )
        keys = attention_mask.bool()
        return cls._from_masks(keys[:, keys.shape[1] - query_length:], keys, every_query=queries_real)

    @classmethod
    def prefix_lm(cls, attention_mask: Optional[Tensor], token_type_ids: Tensor) -> "VarlenPacking":
        """A prefix LM's first forward (no cache): the tokens of type 1 in ``token_type_ids`` (B, S), one contiguous
        span of each row's real tokens (``attention_mask`` (B, S), None: all real), attend to each other both ways
        (and to the tokens before them); the others attend causally. ``prefix`` splits attention into three calls
        (:class:`PrefixSplit`)."""
        real = (torch.ones_like(token_type_ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.bool())
        if attention_mask is not None and attention_mask.shape != token_type_ids.shape:
            raise ValueError(f"token_type_ids: expected the shape of the attention mask {tuple(attention_mask.shape)} "
                             f"(no cache), got {tuple(token_type_ids.shape)}")
        span = (token_type_ids == 1) & real
        started = span.long().cumsum(1) > 0
        after = real & started & ~span
        if bool((span & (after.long().cumsum(1) > 0)).any()):
            raise ValueError("token_type_ids: the tokens of type 1 (attended both ways) must be one contiguous span of "
                             "each row's real tokens; a row has type 1 again after a token of type 0")
        before = real & ~started
        split = PrefixSplit(before=cls._from_masks(before, before), span=cls._from_masks(span, real & ~after),
                            after=cls._from_masks(after, real))
        return replace(cls._from_masks(real, real), prefix=split)

    @classmethod
    def _from_masks(cls, queries: Tensor, keys: Tensor, every_query: bool = False) -> "VarlenPacking":
        """The packing of the queries where ``queries`` (B, Sq) is True over the keys where ``keys`` (B, Sk) is:
        each row's queries are its last real keys' queries."""

        def offsets(mask: Tensor) -> Tuple[Tensor, int]:
            lengths = mask.sum(1)
            cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
            return cu, int(lengths.max()) if lengths.numel() else 0

        cu_q, max_q = offsets(queries)
        cu_k, max_k = offsets(keys)
        return cls(
            query_rows=queries.reshape(-1).nonzero().squeeze(1),
            key_rows=keys.reshape(-1).nonzero().squeeze(1),
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            max_seqlen_q=max_q,
            max_seqlen_k=max_k,
            query_mask=queries,
            every_query=every_query,
        )


class PrefixSplit(NamedTuple):
    """A prefix LM's attention (:meth:`VarlenPacking.prefix_lm`) as three varlen calls over disjoint queries (a
    varlen call aligns a row's queries with its last keys, so each causal one is causal): ``before``, the tokens
    before the bidirectional span over each other, causally; ``span``, the span's tokens over themselves and the
    tokens before them, not causally; ``after``, the tokens after the span over every real token, causally."""

    before: VarlenPacking
    span: VarlenPacking
    after: VarlenPacking


class RecursionKV(NamedTuple):
    """The cache of one layer of a Mixture-of-Recursions recursion (recursion-wise caching): the keys
    and values of the tokens that ran the recursion, and only those.

    ``key_value``: a :class:`recursive.cache.LayerKV` (B, C, Hkv, .) whose columns are shared by the
    batch: each step appends as many as the row with the most tokens in the recursion needs, and each
    row's tokens lie in their order among its columns; ``token_mask``: (B, C) bool, the columns that
    hold one of the row's tokens (the others are never attended to); ``length``: the sequence length
    the cache covers (the ``S_past`` of a plain :class:`recursive.cache.LayerKV`).
    """

    key_value: LayerKV
    token_mask: Tensor
    length: int


PastKeyValues = Tuple[Optional[Union[LayerKV, RecursionKV]], ...]
