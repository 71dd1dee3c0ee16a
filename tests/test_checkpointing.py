"""Activation checkpointing (``gradient_checkpointing_enable``): the same loss and gradients as without it,
in every variant of the model family, while autograd keeps far fewer activations. Float64, seeded, tiny.
"""

from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch
from torch import Tensor

from recursive import RecursiveEncoder, RecursiveForCausalLM
from tests.helpers import HIERARCHICAL, MIXTURE_OF_RECURSIONS, RELAXATIONS, VOCAB, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = {
    **{f"relaxation {name}": (RecursiveForCausalLM, options) for name, options in RELAXATIONS.items()},
    **{f"mor {name}": (RecursiveForCausalLM, MIXTURE_OF_RECURSIONS[name])
       for name in ("expert_cycle", "token_kv_sharing", "expert_threshold_kv_sharing")},
    **{f"hrm {name}": (RecursiveForCausalLM, HIERARCHICAL[name]) for name in ("modules_of_two", "one_step")},
    "encoder mol": (RecursiveEncoder, dict(RELAXATIONS["mol"], hidden_act="gelu", embedding_size=16)),
}


def training_step(model, input_ids: Tensor, attention_mask: Tensor) -> Tuple[Tensor, Dict[str, Tensor], int]:
    """Loss, gradients, and the bytes of the tensors autograd saved in the forward (outside checkpoints)."""
    model.zero_grad(set_to_none=True)
    saved = 0

    def pack(tensor: Tensor) -> Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids, attention_mask=attention_mask, labels=input_ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, saved


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkpointing_keeps_gradients_and_saves_activations(variant):
    cls, options = VARIANTS[variant]
    model = make_model(cls, seed=4, **options).train()
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, VOCAB, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # left padding: the varlen path
    attention_mask[2, 9:] = 0  # right padding
    loss, grads, saved = training_step(model, input_ids, attention_mask)
    assert not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    loss_c, grads_c, saved_c = training_step(model, input_ids, attention_mask)
    torch.testing.assert_close(loss_c, loss, rtol=1e-13, atol=0)
    assert grads_c.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-10, atol=1e-13, msg=name)
    assert saved_c < saved / 2, (saved_c, saved)

    model.gradient_checkpointing_disable()
    assert training_step(model, input_ids, attention_mask)[2] == saved
    model.gradient_checkpointing_enable()
    model.eval()  # checkpointing is for training only
    assert training_step(model, input_ids, attention_mask)[2] == saved


def test_checkpointing_under_torch_compile_matches_eager():
    model = make_model(seed=4, **RELAXATIONS["depth_lora"]).train()
    model.gradient_checkpointing_enable()
    input_ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(6))
    attention_mask = torch.ones_like(input_ids)
    loss, grads, _ = training_step(model, input_ids, attention_mask)
    compiled_loss, compiled_grads, _ = training_step(torch.compile(model, backend="aot_eager"), input_ids,
                                                     attention_mask)
    torch.testing.assert_close(compiled_loss, loss)
    compiled_grads = {name.removeprefix("_orig_mod."): grad for name, grad in compiled_grads.items()}
    assert compiled_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, msg=name)
