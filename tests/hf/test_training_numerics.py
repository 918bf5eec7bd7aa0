"""Gradient checkpointing and bf16 autocast training steps with every pefops method (#16)."""

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from tests.hf.training_models import METHODS, batch, build, dataset  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

pytestmark = pytest.mark.hf


def loss_and_grads(model, inputs):
    model.train()
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def enable_checkpointing(model):
    # the side-tuned classifier: checkpointing goes to its transformers base (which runs without grad anyway)
    target = model.tuned.base if hasattr(model, "tuned") else model
    with warnings.catch_warnings():  # transformers 5.2x renames it activation_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        target.gradient_checkpointing_enable()
    assert any(getattr(module, "gradient_checkpointing", False) for module in target.modules())


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_gives_equal_gradients(method):
    inputs = batch(dataset(4))
    loss, grads = loss_and_grads(build(method), inputs)
    model = build(method)
    enable_checkpointing(model)
    checkpointed_loss, checkpointed_grads = loss_and_grads(model, inputs)
    torch.testing.assert_close(checkpointed_loss, loss, rtol=1e-6, atol=1e-6)
    assert checkpointed_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert grad.abs().sum() > 0 or "scores" in name, f"{name}: no gradient"
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_training_step(method):
    inputs = batch(dataset(4))
    loss, grads = loss_and_grads(build(method), inputs)
    model = build(method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_loss = model(**inputs).loss
    autocast_loss.backward()
    assert autocast_loss.dtype == torch.float32  # cross-entropy runs in fp32 under autocast
    assert_close(autocast_loss, loss, torch.bfloat16, name=f"{method} loss")
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.dtype == parameter.dtype, name
            assert torch.isfinite(parameter.grad).all(), name
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    optimizer.step()  # the fp32 master parameters take the step
