"""recursive.flops against torch.utils.flop_counter.FlopCounterMode on real models (torch backend) and
the parameter counts against the built models."""

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from recursive import RecursiveConfig, RecursiveEncoder, RecursiveForCausalLM
from recursive.config import RELAXATIONS
from recursive.flops import ParameterCounts, forward_flops, parameter_counts, training_step_flops
from tests.helpers import tiny_config

BATCH, SEQ = 2, 7
SHARING = {"cycle": (4, 2), "sequence": (4, 2), "middle_cycle": (5, 3)}  # scheme -> (num_layers, num_blocks)


def flops_config(relaxation="depth_lora", sharing="cycle", **overrides) -> RecursiveConfig:
    """The shared tiny config (tests/helpers.py) with ``sharing``'s layers and blocks, on the torch backend (the
    one FlopCounterMode sees through)."""
    num_layers, num_blocks = SHARING[sharing]
    return tiny_config(**{"vocab_size": 61, "intermediate_size": 40, "num_layers": num_layers, "num_blocks": num_blocks,
                          "sharing": sharing, "relaxation": relaxation, "circuit_rank": 2, "num_experts_per_tok": 4,
                          "start_index": 1, "backend": "torch", **overrides})


def counted(model, input_ids, attention_mask=None, labels=None, backward=False) -> int:
    """FlopCounterMode's total for a forward (and backward of the loss)."""
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids, attention_mask=attention_mask, labels=labels)
        if backward:
            out.loss.backward()
    return counter.get_total_flops()


def inputs(config, batch=BATCH, seq=SEQ):
    return torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("sharing", list(SHARING))
@pytest.mark.parametrize("relaxation", RELAXATIONS)
def test_forward_flops_match_flop_counter(relaxation, sharing):
    config = flops_config(relaxation, sharing)
    model = RecursiveForCausalLM(config)
    assert forward_flops(config, BATCH, SEQ) == counted(model, inputs(config))


@pytest.mark.parametrize("relaxation", RELAXATIONS)
def test_padded_batch_counts_attention_over_real_tokens(relaxation):
    config = flops_config(relaxation)
    model = RecursiveForCausalLM(config)
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[2, 5:] = 0  # right padding
    lengths = [SEQ - 3, SEQ, 5]
    expected = counted(model, inputs(config, 3), mask)
    assert forward_flops(config, 3, SEQ, lengths=lengths) == expected
    assert forward_flops(config, 3, SEQ) > expected


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_key_value_heads=4),  # multi-head
        dict(num_key_value_heads=1),  # multi-query
        dict(head_dim=6, qkv_bias=True),  # head_dim not hidden / heads, biases (Qwen2, Gemma)
        # rank 40 clamps
        dict(lora_rank={"q": 2, "v": 5, "gate": 1, "down": 40}, lora_targets=("q", "v", "gate", "down")),
        dict(start_index=0, tie_word_embeddings=True),
        dict(start_index=4),  # no layer relaxed
    ],
    ids=["mha", "mqa", "head_dim-bias", "rank-dict-clamped", "tied-start0", "start-at-end"],
)
def test_forward_flops_variants(overrides):
    config = flops_config("depth_lora", **overrides)
    model = RecursiveForCausalLM(config)
    assert forward_flops(config, BATCH, SEQ) == counted(model, inputs(config))


def test_mixture_counts_routed_experts():
    """The count is the routed cost (top-k experts per token), linear in k; when every expert is chosen
    the torch reference (which evaluates all experts) is counted exactly."""
    def flops(top_k):
        return forward_flops(flops_config("mol", num_experts_per_tok=top_k), BATCH, SEQ)

    per_expert = flops(2) - flops(1)
    assert per_expert > 0 and flops(4) - flops(2) == 2 * per_expert
    config = flops_config("mol", num_experts_per_tok=2)
    # The reference's dense evaluation costs as much as routing to all four experts.
    assert counted(RecursiveForCausalLM(config), inputs(config)) == flops(4) == flops(2) + 2 * per_expert


RECURRENCE = {
    "hierarchical": dict(sharing="hierarchical", num_layers=6, num_blocks=2),
    "expert_choice": dict(mor_routing="expert_choice", num_layers=6),
    "expert_middle_cycle": dict(mor_routing="expert_choice", sharing="middle_cycle", num_layers=8, num_blocks=4,
                                mor_capacities=(1.0, 0.6, 0.3)),
    "token_choice": dict(mor_routing="token_choice", num_layers=6, mor_z_loss_coef=0.1),
    "expert_kv_sharing": dict(mor_routing="expert_choice", num_layers=6, mor_kv_sharing=True,
                              mor_capacities=(0.8, 0.5, 0.2)),
    "token_kv_sharing": dict(mor_routing="token_choice", num_layers=6, mor_kv_sharing=True),
    "expert_threshold": dict(mor_routing="expert_choice", num_layers=6, mor_threshold_routing=True),
    "hrm_text": dict(sharing="hierarchical", num_layers=6, num_blocks=2, hrm_flow="hrm_text", norm_weight=False,
                     attention_output_gate=True),
    "ouro": dict(num_layers=6, block_norms="pre_and_output", loop_norm=True, exit_gate=True),
    "huginn": dict(sharing="middle_cycle", num_layers=8, num_blocks=4, prelude_layers=1, coda_layers=1,
                   injection="linear", core_state_std=0.02, block_norms="pre_and_residual", qk_bias=True),
}


@pytest.mark.parametrize("variant", list(RECURRENCE))
def test_recurrence_flops_match_flop_counter(variant):
    """Hierarchical recurrence and Mixture-of-Recursions (each recursion on its routed tokens only)."""
    config = dataclasses.replace(flops_config(), **RECURRENCE[variant])
    model = RecursiveForCausalLM(config)
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[0, :3] = 0
    mask[2, 5:] = 0
    ids = inputs(config, 3)
    for attention_mask, lengths in ((None, None), (mask, [SEQ - 3, SEQ, 5])):
        with FlopCounterMode(display=False) as counter:
            out = model(ids, attention_mask=attention_mask)
        extra = {}
        if config.mor_routing == "token_choice" or config.mor_threshold_routing:
            depths = out.recursion_depths
            extra["recursion_tokens"] = [(depths > r).sum(1).tolist() for r in range(len(config.recursions()[1]))]
        assert forward_flops(config, 3, SEQ, lengths=lengths, **extra) == counter.get_total_flops()
    assert parameter_counts(config) == parameters_by_role(model)
    # fewer tokens run the later recursions
    if config.mor_routing == "expert_choice" and not config.mor_threshold_routing:
        assert forward_flops(config, 3, SEQ) < forward_flops(dataclasses.replace(
            config, mor_routing=None, mor_capacities=None, mor_kv_sharing=False), 3, SEQ)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(encoder_head="mlm", embedding_size=16, hidden_act="gelu"),
        dict(encoder_head="mlm", tie_word_embeddings=True, relaxation="mol"),
        dict(encoder_head="sequence_classification", num_labels=3, relaxation="circuit"),
        dict(encoder_head="sequence_classification", num_labels=1, classifier_pooling="cls"),
    ],
    ids=["mlm-factorised", "mlm-tied-mol", "classification", "regression-cls"],
)
def test_encoder_flops_and_parameters(overrides):
    config = flops_config(**{"relaxation": "depth_lora", **overrides})
    model = RecursiveEncoder(config)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, 4:] = 0
    assert forward_flops(config, BATCH, SEQ, model_type="encoder") == counted(model, inputs(config))
    assert (forward_flops(config, BATCH, SEQ, lengths=[SEQ, 4], model_type="encoder")
            == counted(model, inputs(config), mask))
    assert parameter_counts(config, "encoder") == parameters_by_role(model)


@pytest.mark.parametrize(
    "relaxation, sharing",
    [("none", "cycle"), ("depth_lora", "middle_cycle"), ("qkov_lora", "sequence"), ("circuit", "cycle"),
     ("mol", "cycle")],
)
def test_training_step_flops_match_forward_and_backward(relaxation, sharing):
    config = flops_config(relaxation, sharing)
    model = RecursiveForCausalLM(config)
    ids = inputs(config)
    assert training_step_flops(config, BATCH, SEQ) == counted(model, ids, labels=ids, backward=True)


@pytest.mark.parametrize("variant, overrides", [
    ("depth_lora", {}), ("circuit", {}),
    ("hierarchical", RECURRENCE["hierarchical"]),
    ("one-step", dict(RECURRENCE["hierarchical"], hrm_one_step_gradient=True)),
    ("one-step 8", dict(RECURRENCE["hierarchical"], num_layers=12, num_blocks=4, hrm_one_step_gradient=True)),
    ("expert_kv_sharing", RECURRENCE["expert_kv_sharing"]),
    ("hrm_text", dict(RECURRENCE["hrm_text"], hrm_fast_grad_cycles=(1,))),  # 1 of 2 fast steps records per cycle
    ("ouro", RECURRENCE["ouro"]),  # the LM head after every loop
    ("huginn", RECURRENCE["huginn"]),
], ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_step_flops_with_one_step_gradient_and_checkpointing(variant, overrides, checkpointing):
    """The recomputed forward of checkpointed layers, and HRM's layers that run without autograd."""
    config = dataclasses.replace(flops_config("circuit" if variant == "circuit" else "depth_lora"), **overrides)
    model = RecursiveForCausalLM(config).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, :2] = 0
    ids = inputs(config)
    expected = training_step_flops(config, BATCH, SEQ, lengths=[SEQ, SEQ - 2], gradient_checkpointing=checkpointing)
    assert expected == counted(model, ids, mask, labels=ids, backward=True)
    if checkpointing:
        assert expected > training_step_flops(config, BATCH, SEQ, lengths=[SEQ, SEQ - 2])


def test_frozen_weights_cost_less_in_flop_counter():
    """FlopCounterMode skips a frozen weight's gradient matmul; training_step_flops counts all trainable."""
    config = flops_config("depth_lora")
    model = RecursiveForCausalLM(config)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    ids = inputs(config)
    assert forward_flops(config, BATCH, SEQ) < counted(model, ids, labels=ids, backward=True) < training_step_flops(
        config, BATCH, SEQ)


def parameters_by_role(model) -> ParameterCounts:
    """The model's parameters sorted into ParameterCounts' roles by name."""
    adapter_names = ("lora_a", "lora_b", "qk_u", "qk_v", "ov_c", "ov_d", "router.weight")
    roles = dict(embedding=0, shared=0, adapter=0, head=0)
    for name, parameter in model.named_parameters():  # tied parameters appear once
        if name.startswith("model.embed_"):
            role = "embedding"
        elif name.endswith(adapter_names):
            role = "adapter"
        elif name.startswith(("model.blocks.", "model.adapter.")):
            role = "shared"
        else:
            role = "head"
        roles[role] += parameter.numel()
    return ParameterCounts(**roles)


@pytest.mark.parametrize("sharing", list(SHARING))
@pytest.mark.parametrize("relaxation", RELAXATIONS)
def test_parameter_counts_match_model(relaxation, sharing):
    for overrides in (dict(), dict(tie_word_embeddings=True, qkv_bias=True, start_index=0),
                      dict(qkv_bias=True, attention_output_gate=True, block_norms="pre_and_residual"),
                      dict(norm_weight=False, block_norms="pre_and_output")):
        config = flops_config(relaxation, sharing, **overrides)
        model = RecursiveForCausalLM(config)
        counts = parameter_counts(config)
        assert counts == parameters_by_role(model)
        assert counts.total == sum(p.numel() for p in model.parameters())
        assert counts.adapter == 0 if relaxation == "none" else counts.adapter > 0


def test_bad_arguments_raise_value_error_naming_them():
    config = flops_config()
    for kwargs, name in [
        (dict(config=None), "config"),
        (dict(batch_size=0), "batch_size"),
        (dict(seq_len=2.0), "seq_len"),
        (dict(lengths=[SEQ]), "lengths"),
        (dict(lengths=[SEQ, SEQ + 1]), "lengths"),
        (dict(model_type="seq2seq"), "model_type"),
    ]:
        arguments = {**dict(config=config, batch_size=BATCH, seq_len=SEQ), **kwargs}
        with pytest.raises(ValueError, match=name):
            forward_flops(**arguments)
        with pytest.raises(ValueError, match=name):
            training_step_flops(**arguments)
    token_choice = dataclasses.replace(config, mor_routing="token_choice")
    for bad_config, recursion_tokens in ((token_choice, None), (token_choice, [[SEQ, SEQ]]),
                                         (token_choice, [[SEQ + 1, 0]] * 2), (config, [[SEQ, SEQ]] * 2),
                                         (dataclasses.replace(token_choice, mor_routing="expert_choice"),
                                          [[SEQ, SEQ]] * 2)):
        with pytest.raises(ValueError, match="recursion_tokens"):
            forward_flops(bad_config, BATCH, SEQ, recursion_tokens=recursion_tokens)
    with pytest.raises(ValueError, match="model_type"):
        parameter_counts(config, "seq2seq")
    with pytest.raises(ValueError, match="config"):
        parameter_counts(flops_config(embedding_size=16))  # factorised embeddings: an encoder option
