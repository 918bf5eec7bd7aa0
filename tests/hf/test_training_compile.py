"""torch.compile of a whole training step (model + loss + backward) of tiny BERT and LLaMA with
adapters, masks and prefix-tuning (#16): no graph break attributable to pefops.

A break is pefops' when a frame of its user stack lies in the pefops package. Dynamo always breaks at
`loss.backward()` in the step itself (it does not trace Tensor.backward; AOTAutograd compiles the
backward graph of the forward it captured): that break is the step's, and it is the only one allowed.
No break inside transformers' own code occurs for these models, so none is excluded. The compiled
step (aot_eager: dynamo + AOTAutograd through the ops' fake and autograd registrations) must also give
the eager loss and gradients."""

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
import pefops  # noqa: E402
import pefops.hf as hf  # noqa: E402

pytestmark = [pytest.mark.hf, pytest.mark.slow]

PEFOPS_DIR = str(Path(pefops.__file__).resolve().parent)
VOCAB, SEQ, BATCH = 50, 8, 2


def tiny(kind):
    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=37, vocab_size=VOCAB, max_position_embeddings=64,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return transformers.BertForSequenceClassification(config)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def prepared(kind, method):
    model = tiny(kind)
    if method == "adapter":
        hf.add_adapter(model, "task", "seq_bn")
        hf.train_adapter(model, "task")
        for parameter in hf.adapter_parameters(model, "task").values():  # a zero up-projection has no grad upstream
            torch.nn.init.normal_(parameter, std=0.1)
    elif method == "masks":
        hf.apply_mask_tuning(model, threshold=0.0, init_sparsity=0.5)
    else:
        hf.apply_prefix_tuning(model, num_virtual_tokens=3, projection_hidden=16)
    return model


def inputs(kind):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # padding: the masked attention path, not only the plain causal one
    labels = torch.tensor([0, 1]) if kind == "bert" else ids
    return ids, mask, labels


def training_step(model):
    def step(ids, mask, labels):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach()

    return step


def pefops_frames(reason) -> list[str]:
    return [f"{frame.filename}:{frame.lineno} {frame.name}" for frame in reason.user_stack
            if str(Path(frame.filename).resolve()).startswith(PEFOPS_DIR)]


@pytest.mark.parametrize("method", ["adapter", "masks", "prefix"])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_compiled_training_step_has_no_pefops_graph_break(kind, method):
    torch._dynamo.reset()
    model = prepared(kind, method)
    explanation = torch._dynamo.explain(training_step(model))(*inputs(kind))
    ours = {reason.reason.splitlines()[0]: frames for reason in explanation.break_reasons
            if (frames := pefops_frames(reason))}
    assert not ours, f"graph breaks inside pefops: {ours}"
    others = {reason.reason.splitlines()[0] for reason in explanation.break_reasons}
    assert all("backward" in reason for reason in others), f"graph breaks other than the step's backward: {others}"
    model.zero_grad(set_to_none=True)

    eager_loss = training_step(model)(*inputs(kind))
    eager_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    assert eager_grads and all(grad.abs().sum() > 0 for grad in eager_grads.values()), "a parameter got no gradient"
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled_loss = torch.compile(training_step(model), backend="aot_eager")(*inputs(kind))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-6, msg=name)
