"""The recursive model family: a shared-block backbone, a causal LM and a bidirectional encoder.

Hugging Face conventions: ``model(input_ids, attention_mask=None, labels=None)`` returns an output with
``.logits`` and ``.loss`` (None without labels); ``attention_mask`` is (B, S_past + S) of 1 (token) and 0
(padding); labels of -100 are ignored; the causal LM shifts its labels inside. Checkpoints are a
directory with ``config.json`` and ``model.safetensors`` (never pickle).

Padding: when ``attention_mask`` has a zero, every layer attends over the real tokens only, through
:func:`recursive_kernels.circuit_attention_varlen` (:class:`recursive.cache.VarlenPacking`), which is exact for left
padding (decoding) as for right padding; without one, the dense :func:`recursive_kernels.circuit_attention`
runs. Default positions count real tokens only (``cumsum(attention_mask) - 1``), so a left-padded row
gets the positions it would have alone.

Cache: ``past_key_values`` is a tuple with one :class:`recursive.cache.LayerKV` per effective layer
(keys and values after RoPE, token-major (B, S_past, Hkv, D), plus the circuit's ``key_c``/``value_c``); a forward
with ``use_cache=True`` returns it extended by the new tokens. A Mixture-of-Recursions model caches
recursion-wise: a recursion's layers hold a :class:`recursive.cache.RecursionKV` with the keys of the tokens that ran
it only (with KV sharing the later recursions hold None: they read the first one's).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from .cache import KVCache, LayerKV, PastKeyValues, RecursionKV, SharedKeyValue, VarlenPacking
from .checks import check_id_range, is_number
from .config import RecursiveConfig
from .generation import GenerationMixin
from .loops import INPUT, LayerInputs, LayerStep, loop_shape
from .losses import (
    IGNORE_INDEX,
    exit_distribution,
    exit_readout,
    expected_exit_loss,
    next_token_loss,
    upcast,
    with_router_losses,
)
from .mixture_of_recursions import mixture_of_recursions
from .nn import RecursiveBlock, RMSNorm, activation, rotary_embedding
from .outputs import CausalLMOutput, EncoderOutput, LayersOutput, RecursiveModelOutput
from .pretrained import RecursivePreTrainedModel


class RecursiveModel(nn.Module):
    """The backbone: embeddings, the ``num_blocks`` shared blocks run over ``num_layers`` effective
    layers by the sharing scheme, and the final norm.

    Parameters: ``embed_tokens`` (vocab, embedding_size or hidden), ``embed_proj`` (hidden <-
    embedding_size, factorised embeddings only), ``blocks.{b}`` (:class:`recursive.nn.RecursiveBlock`),
    ``mor_router`` (recursions <- hidden, Mixture-of-Recursions only), ``norm``. ``causal`` picks
    decoder (True) or encoder (False) attention.

    One method runs effective layers, :meth:`run_layers`, reading the model's :attr:`shape`
    (:func:`recursive.loops.loop_shape`: the order of blocks, which state each layer updates and what mixes into
    it (the HRM data flow of ``hierarchical`` sharing), and where a loop ends for early exit); the forward,
    decoding, the engines and exit calibration all call it, and the Mixture-of-Recursions flow
    (:mod:`recursive.mixture_of_recursions`) is written on it. A Mixture-of-Recursions forward has no
    ``output_hidden_states`` (its recursions run on token subsets) and a cache only when ``config.kv_cacheable``
    (causal routing): the layers before and after the recursions cache every token
    (:class:`recursive.cache.LayerKV`), a recursion's layers the tokens that ran it
    (:class:`recursive.cache.RecursionKV`); with KV sharing the later recursions' entries are None, as they read
    the first's.
    """

    adapter_parameters = ("mor_router.weight",)

    def __init__(self, config: RecursiveConfig, causal: bool = True) -> None:
        super().__init__()
        self.config = config
        embedding_size = config.embedding_size or config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, embedding_size)
        if config.embedding_size is not None:
            self.embed_proj = nn.Linear(config.embedding_size, config.hidden_size, bias=False)
        else:
            self.register_module("embed_proj", None)
        self.blocks = nn.ModuleList(RecursiveBlock(config, b, causal) for b in range(config.num_blocks))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset, config.norm_weight)
        if config.exit_gate:  # Ouro's: one logit per token and loop
            self.exit_gate = nn.Linear(config.hidden_size, 1)
        else:
            self.register_module("exit_gate", None)
        if config.injection == "linear":  # Huginn's: the core state and the prelude's output, to the core state
            self.adapter = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        else:
            self.register_module("adapter", None)
        if config.hrm_flow == "hrm_text":  # where the fast state starts (HRM-Text's z_L_init; zeros unless loaded)
            self.register_buffer("fast_init", torch.zeros(config.hidden_size))
        else:
            self.register_buffer("fast_init", None)
        self.shape = loop_shape(config)  # the order of blocks and how states flow: what run_layers reads
        self.gradient_checkpointing = False  # RecursivePreTrainedModel.gradient_checkpointing_enable
        if config.mor_routing is not None:
            # Row r scores recursion r (expert choice); all rows together assign depths (token choice).
            self.mor_router = nn.Linear(config.hidden_size, len(config.recursions()[1]), bias=False)
        else:
            self.register_module("mor_router", None)

    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, S) token ids -> (B, S, hidden)."""
        hidden = self.embed_tokens(input_ids)
        if self.embed_proj is not None:
            hidden = self.embed_proj(hidden)
        if self.config.embed_scale != 1.0:
            # Hugging Face Gemma rounds the multiplier to the activations' dtype first; so do we.
            hidden = hidden * torch.tensor(self.config.embed_scale, dtype=hidden.dtype)
        return hidden

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        past_key_values: Optional[PastKeyValues] = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        *,
        token_type_ids: Optional[Tensor] = None,
        check_indices: bool = True,
    ) -> RecursiveModelOutput:
        """Args:
            input_ids: (B, S) int64.
            attention_mask: (B, S_past + S) of 1 and 0, or None (no padding).
            position_ids: (B, S); default: the count of earlier real tokens (see the module docstring).
            past_key_values: one cache per effective layer (the module docstring), or None.
            use_cache: return the extended cache.
            output_hidden_states: also return the embeddings and every layer's output (e.g. for the
                loss of early exit at loop boundaries, :func:`recursive.losses.exit_loss`).
            token_type_ids: (B, S) of 0 and 1, a prefix LM's first forward (``config.prefix_lm``, no cache): each
                row's tokens of type 1, one contiguous span, attend to each other both ways, the rest causally.
            check_indices: False trusts ``input_ids`` to lie in the vocabulary (their range is read on the host
                with the mask's in one read, a synchronisation on the GPU): for ids right by construction.
        """
        if (not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point
                or input_ids.dtype == torch.bool):
            raise ValueError("input_ids: expected an int tensor (B, S), "
                             f"got {getattr(input_ids, 'shape', input_ids)!r}")
        B, S = input_ids.shape
        past_length = 0
        if past_key_values is not None:
            if len(past_key_values) != self.config.num_layers:
                raise ValueError(
                    f"past_key_values: expected one entry per effective layer ({self.config.num_layers}), "
                    f"got {len(past_key_values)}"
                )
            past_length = self._past_length(past_key_values)
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past_length + S):
            raise ValueError(
                f"attention_mask: expected shape (B={B}, past + S={past_length + S}), got {tuple(attention_mask.shape)}"
            )
        if position_ids is None:
            position_ids = self._default_position_ids(B, S, past_length, attention_mask, input_ids.device)
        elif tuple(position_ids.shape) != (B, S):
            raise ValueError(f"position_ids: expected shape ({B}, {S}), got {tuple(position_ids.shape)}")

        mor = self.config.mor_routing is not None
        cached = past_key_values is not None or use_cache
        if mor and (output_hidden_states or (cached and not self.config.kv_cacheable)):
            name = ("output_hidden_states" if output_hidden_states
                    else "past_key_values" if past_key_values is not None else "use_cache")
            raise ValueError(f"{name}: a Mixture-of-Recursions model runs its recursions on token subsets; it has no "
                             f"per-layer hidden states, and a KV cache only with causal routing (token choice, or "
                             f"expert choice with mor_threshold_routing)")

        padded = self._read_inputs(input_ids, attention_mask, check_indices)
        hidden = self.embed(input_ids)
        position_embeddings = rotary_embedding(position_ids, self.config.head_dim, self.config.rope_theta, hidden.dtype)
        if token_type_ids is not None:
            self._check_prefix(token_type_ids, B, S, past_key_values)
            packing = VarlenPacking.prefix_lm(attention_mask, token_type_ids)
        else:
            packing = VarlenPacking.from_attention_mask(attention_mask, S) if padded else None
        return self.run(hidden, position_ids, LayerInputs(position_embeddings, packing), past_key_values, use_cache,
                        output_hidden_states)

    def run(
        self, hidden: Tensor, position_ids: Tensor, inputs: LayerInputs,
        past_key_values: Optional[PastKeyValues] = None, use_cache: bool = False, output_hidden_states: bool = False,
    ) -> RecursiveModelOutput:
        """:meth:`forward` from the embeddings ``hidden`` (B, S, hidden) on: the model's data flow over its
        effective layers, then the final norm. ``inputs``: the rows' :class:`recursive.loops.LayerInputs`;
        ``position_ids`` (B, S) (a Mixture-of-Recursions model's recursions take their tokens' RoPE rows);
        the rest as :meth:`forward`, whose checks it trusts (decoding calls it directly)."""
        cached = past_key_values is not None or use_cache
        recursion_loss = recursion_depths = hidden_states = loop_states = exit_probabilities = None
        if self.config.mor_routing is not None:
            B, S = hidden.shape[:2]
            real = (inputs.packing.query_mask if inputs.packing is not None
                    else torch.ones(B, S, dtype=torch.bool, device=hidden.device))
            out = mixture_of_recursions(self, hidden, real, position_ids, inputs, past_key_values, cached)
            hidden, aux_losses, recursion_loss, recursion_depths = out.hidden, out.aux_losses, out.loss, out.depths
            presents = tuple(out.presents.get(layer) for layer in range(self.config.num_layers))
        else:
            gated = self.exit_gate is not None
            run = self.run_layers(hidden, self.shape.steps, inputs, past_key_values, use_cache=cached,
                                  output_hidden_states=output_hidden_states or gated)
            if output_hidden_states:
                hidden_states = (hidden, *run.outputs)
            if gated:
                loop_states = tuple(self.final_norm(run.outputs[i]) for i, step in enumerate(self.shape.steps)
                                    if step.exit_after or i + 1 == len(self.shape.steps))
                exit_probabilities = exit_distribution(torch.cat([self.exit_gate(h) for h in loop_states], -1))
            hidden, presents, aux_losses = run.hidden, tuple(run.presents), run.aux_losses
        return RecursiveModelOutput(
            last_hidden_state=self.final_norm(hidden),
            past_key_values=presents if use_cache else None,
            aux_loss=torch.stack(aux_losses).mean() if aux_losses else None,
            hidden_states=hidden_states,
            recursion_loss=recursion_loss,
            recursion_depths=recursion_depths,
            loop_hidden_states=loop_states,
            exit_probabilities=exit_probabilities,
        )

    def final_norm(self, hidden: Tensor) -> Tensor:
        """The norm that ends a run (of all the layers, or of a loop where a token exits): :attr:`norm`, unless the
        loop shape already normed the state at the end of each loop (HRM-Text's module ends)."""
        return hidden if self.shape.ends_normed else self.norm(hidden)

    def run_layers(
        self,
        hidden: Tensor,
        steps: Sequence[LayerStep],
        inputs: LayerInputs,
        caches: Optional[Sequence[Optional[KVCache]]] = None,
        *,
        use_cache: bool = False,
        shared: Optional[Sequence[SharedKeyValue]] = None,
        active: Optional[Tensor] = None,
        keys_only: bool = False,
        output_hidden_states: bool = False,
        states: Optional[Sequence[Tensor]] = None,
    ) -> LayersOutput:
        """Run ``steps`` (of :attr:`shape`, :class:`recursive.loops.LayerStep`) on ``hidden`` (B, S, hidden): the
        one loop over effective layers, which the forward, decoding, the engines and exit calibration all run.

        The states of :attr:`shape` start from ``hidden`` (the others from zero, HRM-Text's fast state from
        ``fast_init``, Huginn's core state at random); each step injects (``inject``) or adds its ``adds`` into its
        state, runs its block there at depth ``step.layer + inputs.depth_shift`` and, with ``norm_after``, the norm.

        Args:
            hidden: (B, S, hidden), the rows' input.
            steps: consecutive steps of the model's shape (a loop, a recursion, or all).
            inputs: the rows' RoPE, packing and depth shift (:class:`recursive.loops.LayerInputs`).
            caches: one :class:`recursive.cache.KVCache` (or None) per step, extended by the step's new keys.
            use_cache: return each step's extended cache (:attr:`LayersOutput.presents`).
            shared: per step, the keys and values it attends over instead of its own (Mixture-of-Recursions'
                KV sharing: :class:`recursive.cache.SharedKeyValue`).
            active: (B,) bool: rows that run; the others keep their state (tokens that left early), from which
                the steps still compute their keys and values.
            keys_only: only extend ``caches`` with the keys and values of ``hidden`` at each step, running no
                block (the layers a token that left skips).
            output_hidden_states: also return each step's output.
            states: every state to start from (to go on from an earlier run's :attr:`LayersOutput.states`); then
                ``hidden`` is not read.
        """
        if states is None:
            states = [hidden] + [self.initial_state(hidden)] * (self.shape.num_states - 1)
        states = list(states)
        presents, aux_losses, outputs = [], [], []
        recording = torch.is_grad_enabled()
        for i, step in enumerate(steps):
            block = self.blocks[step.block]
            indices = block.adapter_index(step.layer + inputs.depth_shift, inputs.check_indices)
            past = None if caches is None else caches[i]
            with torch.set_grad_enabled(recording and step.records):
                h = states[step.state]
                if step.inject:
                    h = self.adapter(torch.cat((h, states[INPUT]), -1))
                for source in step.adds:
                    h = h + states[source]
                if keys_only:
                    new = block.key_value(h, indices, inputs.position_embeddings, check_indices=False)
                    presents.append(new if past is None else past.append(new))
                    continue
                out, present, aux_loss = self._run_block(block, h, indices, inputs, past, use_cache,
                                                         None if shared is None else shared[i])
                if step.norm_after:
                    out = self.norm(out)
            if active is not None:  # the others keep their state
                out = torch.where(active[:, None, None], out, states[step.state])
            states[step.state] = out
            presents.append(present)
            if aux_loss is not None:
                aux_losses.append(aux_loss)
            if output_hidden_states:
                outputs.append(out)
        return LayersOutput(states[self.shape.output_state], presents, aux_losses, outputs, states)

    def initial_state(self, hidden: Tensor) -> Tensor:
        """Where the states other than the input start: HRM-Text's ``fast_init``, Huginn's random core state
        (``config.core_state_std``), else zeros; shaped like ``hidden``."""
        if self.fast_init is not None:
            return self.fast_init.to(hidden.dtype).expand_as(hidden)
        std = self.config.core_state_std
        if not std:
            return torch.zeros_like(hidden)
        state = torch.randn_like(hidden)  # drawn, then redrawn, as Huginn does: the same seed gives its state
        nn.init.trunc_normal_(state, 0.0, std, -3 * std, 3 * std)
        return state * self.config.embed_scale

    def _run_block(self, block: RecursiveBlock, hidden: Tensor, indices, inputs: LayerInputs, past: Optional[KVCache],
                   use_cache: bool, shared: Optional[SharedKeyValue]):
        options = {"check_indices": False, "shared_key_value": shared}
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # The whole block again (no early stop): the fused ops recompute whole anyway, and
            # recursive.flops.training_step_flops counts it so, on every backend.
            with set_checkpoint_early_stop(False):
                return checkpoint(block, hidden, indices, inputs.position_embeddings, inputs.packing, past, use_cache,
                                  use_reentrant=False, **options)
        return block(hidden, indices, inputs.position_embeddings, inputs.packing, past, use_cache, **options)

    def _check_prefix(self, token_type_ids: Tensor, batch: int, length: int,
                      past_key_values: Optional[PastKeyValues]) -> None:
        if not self.config.prefix_lm:
            raise ValueError("token_type_ids: this model is no prefix LM (config.prefix_lm is False)")
        if past_key_values is not None:
            raise ValueError("token_type_ids: the prefix attends both ways in the first forward only (no "
                             "past_key_values); later tokens are causal")
        if (not isinstance(token_type_ids, Tensor) or tuple(token_type_ids.shape) != (batch, length)
                or token_type_ids.dtype.is_floating_point):
            raise ValueError(f"token_type_ids: expected an int tensor ({batch}, {length}) like input_ids, "
                             f"got {getattr(token_type_ids, 'shape', token_type_ids)!r}")

    def _read_inputs(self, input_ids: Tensor, attention_mask: Optional[Tensor], check_indices: bool) -> bool:
        """Whether ``attention_mask`` pads (it has a zero), and with ``check_indices`` that ``input_ids`` lie in the
        vocabulary: one host read for both."""
        reads = []
        if check_indices and input_ids.numel():
            reads.extend(torch.aminmax(input_ids))
        if attention_mask is not None:
            reads.append(~attention_mask.bool().all())
        if not reads:
            return False
        values = torch.stack([read.long() for read in reads]).tolist()
        if check_indices and input_ids.numel():
            check_id_range("input_ids", *values[:2], self.config.vocab_size)
        return attention_mask is not None and bool(values[-1])

    def _past_length(self, past_key_values: PastKeyValues) -> int:
        """The sequence length a cache covers (Mixture-of-Recursions: after checking that each entry is
        of its layer's kind, as the module docstring has it)."""
        config = self.config
        if config.mor_routing is None:
            return past_key_values[0].key.shape[1]
        recursions = config.recursions()[1]
        kinds = {layer: RecursionKV for recursion in recursions for layer in recursion}
        if config.mor_kv_sharing:
            kinds.update((layer, type(None)) for recursion in recursions[1:] for layer in recursion)
        lengths = set()
        for layer, entry in enumerate(past_key_values):
            kind = kinds.get(layer, LayerKV)
            if not isinstance(entry, kind):
                expected = "None" if kind is type(None) else kind.__name__
                raise ValueError(f"past_key_values: entry {layer} must be {expected}, got {type(entry).__name__}")
            if entry is not None:
                lengths.add(entry.length if kind is RecursionKV else entry.key.shape[1])
        if len(lengths) != 1:
            raise ValueError(f"past_key_values: the entries cover different sequence lengths {sorted(lengths)}")
        return lengths.pop()

    @staticmethod
    def _default_position_ids(batch: int, length: int, past_length: int, attention_mask: Optional[Tensor],
                              device) -> Tensor:
        if attention_mask is None:
            return torch.arange(past_length, past_length + length, device=device).expand(batch, length)
        positions = attention_mask.long().cumsum(-1) - 1
        return positions[:, past_length:].clamp(min=0)  # padding gets position 0; it is never attended to


class RecursiveForCausalLM(GenerationMixin, RecursivePreTrainedModel):
    """A recursive decoder with a language-modelling head; ``generate`` comes from
    :class:`recursive.generation.GenerationMixin`.

    Parameters: ``model`` (:class:`RecursiveModel`, causal) and ``lm_head`` (vocab <- hidden, no bias;
    the embedding matrix when ``tie_word_embeddings``). Factorised embeddings are an encoder option.
    """

    def __init__(self, config: RecursiveConfig) -> None:
        super().__init__(config)
        if config.embedding_size is not None:
            raise ValueError("config: embedding_size (factorised embeddings) is an encoder option; "
                             "use RecursiveEncoder")
        self.model = RecursiveModel(config, causal=True)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._tie_and_init()

    def tied_weights(self) -> Tuple[Tuple[str, str], ...]:
        return (("lm_head.weight", "model.embed_tokens.weight"),) if self.config.tie_word_embeddings else ()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        past_key_values: Optional[PastKeyValues] = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        *,
        token_type_ids: Optional[Tensor] = None,
        exit_threshold: Optional[float] = None,
        check_indices: bool = True,
    ) -> CausalLMOutput:
        """Args:
            input_ids: (B, S).
            attention_mask: (B, S_past + S) of 1 and 0, or None.
            labels: (B, S) token ids (-100: ignored); the loss predicts ``labels[:, t + 1]`` from position t.
            position_ids, past_key_values, use_cache, output_hidden_states, token_type_ids, check_indices: as
                :meth:`RecursiveModel.forward`.
            exit_threshold: with Ouro's exit gate, each token's logits are those of the first loop whose
                cumulative exit probability reaches this (in (0, 1]; the last loop when none does): Ouro's
                readout (every loop runs). None: the last loop's.
        """
        gated = self.config.exit_gate
        if exit_threshold is not None and (not gated or not is_number(exit_threshold)
                                           or not 0 < exit_threshold <= 1):
            raise ValueError(f"exit_threshold: expected a number in (0, 1] for a model with an exit gate "
                             f"(config.exit_gate is {gated}), got {exit_threshold!r}")
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache, output_hidden_states,
                         token_type_ids=token_type_ids, check_indices=check_indices)
        if labels is not None and tuple(labels.shape) != tuple(input_ids.shape):
            raise ValueError(f"labels: expected shape {tuple(input_ids.shape)} like input_ids, "
                             f"got {tuple(labels.shape)}")
        # Ouro's objective reads every loop's logits; the last loop's are then the output's
        loop_logits = [self.lm_head(h) for h in out.loop_hidden_states] if gated and labels is not None else None
        exit_loops = None
        if exit_threshold is not None:
            exit_loops = exit_readout(out.exit_probabilities, exit_threshold)
            states = torch.stack(out.loop_hidden_states, 2)  # (B, S, T, hidden)
            read = states.gather(2, exit_loops[:, :, None, None].expand(-1, -1, 1, states.shape[-1])).squeeze(2)
            logits = self.lm_head(read)
        else:
            logits = self.lm_head(out.last_hidden_state) if loop_logits is None else loop_logits[-1]
        loss = None
        if labels is not None:
            if gated:
                task_loss = expected_exit_loss(loop_logits, out.exit_probabilities, labels,
                                               self.config.exit_entropy_coef)
            else:
                task_loss = next_token_loss(logits, labels)
            loss = with_router_losses(task_loss, out, self.config)
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=out.aux_loss, past_key_values=out.past_key_values,
                              hidden_states=out.hidden_states, recursion_loss=out.recursion_loss,
                              recursion_depths=out.recursion_depths, exit_probabilities=out.exit_probabilities,
                              exit_loops=exit_loops)

    def logits_at(self, hidden: Tensor) -> Tensor:
        """The LM head at any depth (early exit, the loss at loop boundaries): the final norm, then ``lm_head``;
        (*, hidden) -> (*, vocab)."""
        return self.lm_head(self.model.final_norm(hidden))


class RecursiveEncoder(RecursivePreTrainedModel):
    """A bidirectional recursive encoder (ModernALBERT style: RoPE, GeGLU with ``hidden_act="gelu"``,
    optional factorised embeddings) with the head named by ``config.encoder_head``.

    - ``"mlm"``: ``head_dense`` (width <- hidden, width = embedding_size or hidden), activation,
      ``head_norm``, ``decoder`` (vocab <- width, with bias; its weight is the embedding matrix when
      ``tie_word_embeddings``). Logits (B, S, vocab); loss: cross-entropy over labels != -100.
    - ``"sequence_classification"``: pooling (``classifier_pooling``: the mean over real tokens, or the
      first token), ``head_dense``, activation, ``head_norm``, ``classifier`` (num_labels <- hidden).
      Logits (B, num_labels); loss: cross-entropy over int labels (B,), or the squared error against
      float labels (B,) when ``num_labels == 1``.
    """

    def __init__(self, config: RecursiveConfig) -> None:
        super().__init__(config)
        self.model = RecursiveModel(config, causal=False)
        self.head_act = activation(config.hidden_act)
        if config.encoder_head == "mlm":
            width = config.embedding_size or config.hidden_size
            self.head_dense = nn.Linear(config.hidden_size, width)
            self.head_norm = RMSNorm(width, config.rms_norm_eps, config.norm_unit_offset)
            self.decoder = nn.Linear(width, config.vocab_size)
        else:
            self.head_dense = nn.Linear(config.hidden_size, config.hidden_size)
            self.head_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset)
            self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._tie_and_init()

    def tied_weights(self) -> Tuple[Tuple[str, str], ...]:
        if self.config.encoder_head == "mlm" and self.config.tie_word_embeddings:
            return (("decoder.weight", "model.embed_tokens.weight"),)
        return ()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        *,
        check_indices: bool = True,
    ) -> EncoderOutput:
        """Args:
            input_ids: (B, S).
            attention_mask: (B, S) of 1 and 0, or None.
            labels: "mlm": (B, S) token ids, -100 where not masked; classification: (B,).
            position_ids: (B, S); default as :meth:`RecursiveModel.forward`.
            check_indices: as :meth:`RecursiveModel.forward`.
        """
        out = self.model(input_ids, attention_mask, position_ids, check_indices=check_indices)
        hidden = out.last_hidden_state
        if self.config.encoder_head == "mlm":
            logits = self.decoder(self.head_norm(self.head_act(self.head_dense(hidden))))
        else:
            logits = self.classifier(self.head_norm(self.head_act(self.head_dense(self._pool(hidden, attention_mask)))))
        loss = None
        if labels is not None:
            loss = with_router_losses(self._loss(logits, labels), out, self.config)
        return EncoderOutput(logits=logits, loss=loss, last_hidden_state=hidden, aux_loss=out.aux_loss,
                             recursion_loss=out.recursion_loss, recursion_depths=out.recursion_depths)

    def _pool(self, hidden: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
        """(B, S, hidden) -> (B, hidden)."""
        if self.config.classifier_pooling == "cls":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden.mean(1)
        weight = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weight).sum(1) / weight.sum(1).clamp(min=1.0)

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.config.encoder_head == "mlm":
            if tuple(labels.shape) != tuple(logits.shape[:-1]):
                raise ValueError(f"labels: expected shape {tuple(logits.shape[:-1])} like input_ids, "
                                 f"got {tuple(labels.shape)}")
            return F.cross_entropy(upcast(logits).reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        if tuple(labels.shape) != (logits.shape[0],):
            raise ValueError(f"labels: expected shape ({logits.shape[0]},), one per sequence, "
                             f"got {tuple(labels.shape)}")
        if self.config.num_labels == 1:
            return F.mse_loss(upcast(logits).squeeze(-1), labels.to(upcast(logits).dtype))
        return F.cross_entropy(upcast(logits), labels)
