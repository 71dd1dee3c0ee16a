"""Generation for :class:`recursive.RecursiveForCausalLM`: sampling (``sampling``), KV-cached decoding
(``decode``: the model's ``generate``) with early exit (``early_exit``), and continuous depth-wise batching
(``engine``: :class:`DepthBatchingEngine`, whose runs are in ``engine_run`` and ``recursion_run``).

Loops. A model's loop is the shortest run of effective layers whose block pattern repeats over the
whole depth: with cycle sharing (layer l runs block ``l mod B``) the ``N = L / B`` loops are the passes
over the B blocks, loop n being layers ``n*B .. n*B + B - 1``; one shared block (any scheme) loops L
times over one layer. Sequence sharing with several blocks, middle-cycle sharing and untied models run
their stack as a single loop.

Early exit (``exit_threshold``). At the end of every loop but the last, a decoded token leaves by an exit rule
(:mod:`recursive.generation.exit_rules`): by default the model's own at that threshold, Ouro's gate for a model with
one (its cumulative exit probability, after at least two loops), Huginn's KL criterion for its recurrent core (read
out through its coda), else the LM head's top probability there (final norm, ``lm_head``, softmax); its next-token
logits are those at that boundary. Later tokens still attend to it at
the deeper layers: each deeper layer takes its keys and values from the token's hidden state at exit, through that
layer's own input norm and k/v projections with its depth's adapters
(:meth:`recursive.nn.RecursiveBlock.key_value`). Prompts (prefill) always run the full depth; early
exit applies to decoded tokens. ``None`` and ``1.0`` turn it off (1.0 is read as "off" because a
probability that rounds to 1.0 would otherwise reach it); a threshold below 1 on a model with a single
loop raises ``ValueError``.

Mixture-of-Recursions (causal routing, ``config.kv_cacheable``): ``generate`` decodes through the model's
own forward and recursion-wise cache; :class:`DepthBatchingEngine` runs one recursion per row and step,
and a token's routing (:class:`RouterExit`, the same interface as the other exit rules), not its confidence, ends
its run.
"""

from .decode import GenerationMixin, generate_in_batches
from .early_exit import calibrate_exit_threshold
from .engine import DepthBatchingEngine
from .engine_run import EngineStats
from .exit_rules import ConfidenceExit, ExitRule, GateExit, KLExit, RouterExit
from .sampling import next_tokens, top_k_filter, top_p_filter

__all__ = ["ConfidenceExit", "DepthBatchingEngine", "EngineStats", "ExitRule", "GateExit", "GenerationMixin", "KLExit",
           "RouterExit", "calibrate_exit_threshold", "generate_in_batches", "next_tokens", "top_k_filter",
           "top_p_filter"]
