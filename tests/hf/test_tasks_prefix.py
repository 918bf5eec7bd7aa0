"""hf tier for prefix rows in a mixed-task batch (issue 15): pefops and PEFT prefix-tuning checkpoints,
loaded with load_task, share one batch with an adapter, a fusion, a mask set and the base. Row b
equals its task alone by the method's own activation (load_prefix / load_peft_prefix ...): hidden
states and the gradients of each task's parameters, on tiny BERT, GPT-2 and LLaMA."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import pefops.hf as hf  # noqa: E402
from tests.hf.test_adapters_api import tiny  # noqa: E402
from tests.hf import test_tasks  # noqa: E402
from tests.hf.test_tasks import ATTENTION, TOKENS, alone, model_with_tasks, randomise, read_out  # noqa: E402

pytestmark = pytest.mark.hf
checkpoints = test_tasks.checkpoints  # the module fixture prefix_checkpoints builds on
NAMES = ["prefix", "masks", None, "peft", "houlsby", "fusion"]


def save_prefixes(make_model, task_type, root):
    """Under root: "prefix", a pefops prefix (3 slots, MLP), and "peft", a PEFT prefix (4 slots,
    positions shifted by PEFT's rule) saved by PEFT from a model make_model() builds."""
    source = make_model()
    hf.apply_prefix_tuning(source, 3, projection_hidden=8)
    randomise(hf.prefix_parameters(source).values())
    hf.save_prefix(source, root / "prefix")
    save_with_peft(make_model, peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=4), root / "peft", 1.0)


def save_with_peft(make_model, config, directory, std: float) -> None:
    """PEFT's model of `config` over make_model(), its prompt encoder drawn from N(0, std), saved by PEFT."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_model(), config)
        with torch.no_grad():
            for parameter in theirs.prompt_encoder.parameters():
                parameter.normal_(0.0, std)
        theirs.save_pretrained(str(directory))


def train_only(model, names) -> dict:
    """Make the parameters of tasks `names` (prefix / prompt tasks by their modules, adapters by name) the
    model's only trainable ones; returns {task: {parameter name: parameter}}."""
    model.requires_grad_(False)
    modules = model.pefops_task_modules
    trained = {name: dict(modules[name].named_parameters()) if name in modules else hf.adapter_parameters(model, name)
               for name in names}
    for parameters in trained.values():
        for parameter in parameters.values():
            parameter.requires_grad_(True)
    return trained


@pytest.fixture(scope="module")
def prefix_checkpoints(checkpoints):
    for model_type, root in checkpoints.items():
        save_prefixes(lambda: tiny(model_type), "FEATURE_EXTRACTION", root)
    return checkpoints


def prefix_alone(model_type, root, name):
    """The model with task `name` applied by its method's own loader (and the loaded module)."""
    model = tiny(model_type)
    if name == "prefix":
        return model, hf.load_prefix(model, root / "prefix")
    return model, hf.load_peft_prefix(model, root / "peft")


def hidden_alone(model_type, root, name, row):
    if name not in ("prefix", "peft"):
        return alone(model_type, root, name, row)[0]
    model, _ = prefix_alone(model_type, root, name)
    with torch.no_grad():
        return model(input_ids=TOKENS[row:row + 1], attention_mask=ATTENTION[row:row + 1]).last_hidden_state[0]


def mixed_model(model_type, root):
    model = model_with_tasks(model_type, root)
    assert hf.load_task(model, "prefix", root / "prefix") == "prefix_tuning"
    assert hf.load_task(model, "peft", root / "peft") == "prefix_tuning"
    return model


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_each_row_equals_its_task_alone(prefix_checkpoints, model_type):
    root = prefix_checkpoints[model_type]
    model = mixed_model(model_type, root)
    implementation = model.config._attn_implementation
    for row_task in (torch.tensor([0, 1, 2, 3, 4]), torch.tensor([3, 5, 0, 2, 0])):
        hf.set_row_tasks(model, NAMES, row_task)
        with torch.no_grad():
            mixed = model(input_ids=TOKENS, attention_mask=ATTENTION).last_hidden_state
        for row, index in enumerate(row_task.tolist()):
            keep = ATTENTION[row].bool()  # padded positions are not compared (their values are free)
            expected = hidden_alone(model_type, root, NAMES[index], row)
            torch.testing.assert_close(mixed[row][keep], expected[keep], atol=2e-5, rtol=1e-4)
    hf.set_row_tasks(model, None)
    assert model.config._attn_implementation == implementation
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=TOKENS[:1], attention_mask=ATTENTION[:1]).last_hidden_state[0],
                                   alone(model_type, root, None, 0)[0], atol=2e-5, rtol=1e-4)


def test_single_prefix_task_equals_its_own_activation(prefix_checkpoints):
    root = prefix_checkpoints["llama"]
    model = mixed_model("llama", root)
    for name in ("prefix", "peft"):
        hf.set_row_tasks(model, [name], torch.zeros(3, dtype=torch.long))
        own, _ = prefix_alone("llama", root, name)
        with torch.no_grad():
            routed = model(input_ids=TOKENS[:3], attention_mask=ATTENTION[:3]).last_hidden_state
            expected = own(input_ids=TOKENS[:3], attention_mask=ATTENTION[:3]).last_hidden_state
        keep = ATTENTION[:3].bool()
        torch.testing.assert_close(routed[keep], expected[keep], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_gradients_reach_each_task_from_its_rows_only(prefix_checkpoints, model_type):
    root = prefix_checkpoints[model_type]
    model = mixed_model(model_type, root)
    trained = train_only(model, ["prefix", "peft", "houlsby"])
    row_task = torch.tensor([0, 3, 4, 0, 1])  # prefix, peft, houlsby, prefix, masks
    hf.set_row_tasks(model, NAMES, row_task)
    out = model(input_ids=TOKENS, attention_mask=ATTENTION).last_hidden_state
    read_out(out, ATTENTION).backward()
    for name in ("prefix", "peft"):
        rows = [row for row, index in enumerate(row_task.tolist()) if NAMES[index] == name]
        own, tuning = prefix_alone(model_type, root, name)
        for row in rows:
            hidden = own(input_ids=TOKENS[row:row + 1], attention_mask=ATTENTION[row:row + 1]).last_hidden_state
            read_out(hidden, ATTENTION[row:row + 1]).backward()
        expected = dict(tuning.named_parameters())
        assert set(expected) == set(trained[name])
        for key, parameter in trained[name].items():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0
            torch.testing.assert_close(parameter.grad, expected[key].grad, atol=1e-5, rtol=1e-4)
    # the adapter's gradient comes from its row only: equal to that row alone with the adapter
    mixed_grads = {key: p.grad.clone() for key, p in trained["houlsby"].items()}
    for parameter in trained["houlsby"].values():
        parameter.grad = None
    hf.set_row_tasks(model, ["houlsby"], torch.zeros(1, dtype=torch.long))
    hidden = model(input_ids=TOKENS[2:3], attention_mask=ATTENTION[2:3]).last_hidden_state
    read_out(hidden, ATTENTION[2:3]).backward()
    for key, parameter in trained["houlsby"].items():
        torch.testing.assert_close(mixed_grads[key], parameter.grad, atol=1e-5, rtol=1e-4)


def test_bad_prefix_routing_is_refused_before_anything_changes(prefix_checkpoints):
    root = prefix_checkpoints["gpt2"]
    model = mixed_model("gpt2", root)
    implementation = model.config._attn_implementation
    with pytest.raises(ValueError, match=r"row_task values must be in \[0, 2\)"):
        hf.set_row_tasks(model, ["prefix", None], torch.tensor([0, 2]))
    assert model.config._attn_implementation == implementation
    hf.set_row_tasks(model, ["prefix", None], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"row_task must be an integer tensor \[3\] \(one task per sequence\)"):
        model(input_ids=TOKENS[:3])
    hf.set_row_tasks(model, None)
    only_prefix = tiny("gpt2")
    hf.load_task(only_prefix, "prefix", root / "prefix")
    hf.set_row_tasks(only_prefix, ["prefix", None], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="set_row_tasks routed 2 rows; this forward has 3"):
        only_prefix(input_ids=TOKENS[:3])
    own = tiny("gpt2")
    hf.load_task(own, "prefix", root / "prefix")
    hf.apply_prefix_tuning(own, 2)
    with pytest.raises(ValueError, match="has prefix-tuning or prompt tuning applied itself"):
        hf.set_row_tasks(own, ["prefix"], torch.tensor([0]))


@pytest.mark.triton
@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_triton_backend_serves_prefix_rows(prefix_checkpoints, model_type, monkeypatch):
    """PEFOPS_BACKEND=triton: the prefix rows' attention (its mask over [prefix ; keys]) runs on the Triton
    kernels (under the interpreter on CPU) and gives the torch backend's hidden states and gradients."""
    from pefops import backend as backends

    pytest.importorskip("triton")
    kernels = backends.import_kernels("prefix_attention")
    forward, prefix_masks = kernels.prefix_attention_forward, []

    def spy(q, k, v, prefix_k, prefix_v, mask, *args, **kwargs):
        prefix_masks.append(mask is not None and mask.shape[-1] == prefix_k.shape[2] + k.shape[2])
        return forward(q, k, v, prefix_k, prefix_v, mask, *args, **kwargs)

    monkeypatch.setattr(kernels, "prefix_attention_forward", spy)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("PEFOPS_BACKEND", backend)
        model = mixed_model(model_type, prefix_checkpoints[model_type])
        model.requires_grad_(False)
        trained = {f"{name}.{key}": parameter for name in ("prefix", "peft")
                   for key, parameter in model.pefops_task_modules[name].named_parameters()}
        for parameter in trained.values():
            parameter.requires_grad_(True)
        hf.set_row_tasks(model, NAMES, torch.tensor([0, 3, 2, 0, 1]))  # prefix, peft, base, prefix, masks
        out = model(input_ids=TOKENS, attention_mask=ATTENTION).last_hidden_state
        (out * ATTENTION[..., None]).square().sum().backward()
        results[backend] = out.detach(), {key: parameter.grad for key, parameter in trained.items()}
    assert prefix_masks and all(prefix_masks), "the Triton kernels did not serve the prefix rows"
    keep = ATTENTION.bool()
    torch.testing.assert_close(results["triton"][0][keep], results["torch"][0][keep], atol=2e-5, rtol=1e-4)
    for key, grad in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][key], grad, atol=1e-5, rtol=1e-4)
