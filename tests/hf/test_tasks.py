"""hf tier for tasks (issue 15): load_task detects the method of a checkpoint and registers it inactive,
list_tasks lists every task, and set_row_tasks gives row b exactly what running it alone with its
task gives (adapters of any config, a Fuse, mask sets and the base in one batch), gradients included."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pefops.hf as hf  # noqa: E402
from tests.hf.test_adapters_api import tiny  # noqa: E402
from tests.hf.test_task_checkpoints import masked_model, wide_bert  # noqa: E402

pytestmark = pytest.mark.hf
TOKENS = torch.tensor([[5, 6, 7, 8, 9, 10], [12, 13, 14, 15, 1, 1], [20, 21, 22, 23, 24, 25], [30, 31, 32, 2, 2, 2],
                       [40, 41, 42, 43, 44, 45]])
ATTENTION = (TOKENS > 2).long()


def randomise(parameters):
    with torch.no_grad():
        for parameter in parameters:
            parameter.normal_(0, 0.1)


def read_out(hidden, attention):
    """A fixed random read-out of the real positions of hidden [B, S, H] (attention [B, S]). A sum of
    squares of the final normalised outputs is nearly constant, so its gradients check little."""
    probe = torch.randn(hidden.shape[-2:], generator=torch.Generator().manual_seed(3))
    return (hidden * attention[..., None] * probe).sum()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per model type: directories of an adapter "houlsby" (double_seq_bn), a parallel one, a fusion over
    "seq" and "houlsby" with both adapters in sub-directories, and a mask set."""
    saved = {}
    for model_type in ("bert", "gpt2", "llama"):
        root = tmp_path_factory.mktemp(model_type)
        model = tiny(model_type)
        for name, config in (("houlsby", "double_seq_bn"), ("parallel", "par_bn"), ("seq", "seq_bn")):
            hf.add_adapter(model, name, config)
            randomise(hf.adapter_parameters(model, name).values())
        hf.add_adapter_fusion(model, ["seq", "houlsby"])
        randomise(hf.fusion_parameters(model, ["seq", "houlsby"]).values())
        for name in ("houlsby", "parallel"):
            hf.save_adapter(model, str(root / name), name)
        hf.save_adapter_fusion(model, str(root / "fusion"), ["seq", "houlsby"])
        for name in ("seq", "houlsby"):
            hf.save_adapter(model, str(root / "fusion" / name), name)
        hf.save_masks(masked_model(model_type), str(root / "masks"))
        saved[model_type] = root
    return saved


def model_with_tasks(model_type, root):
    model = tiny(model_type)
    for name in ("houlsby", "parallel", "fusion", "masks"):
        hf.load_task(model, name, root / name)
    return model


def alone(model_type, root, name, row):
    """Row `row` run alone with only task `name` active, by the method's own activation."""
    model = tiny(model_type)
    if name in ("houlsby", "parallel"):
        hf.load_adapter(model, str(root / name), set_active=True)
    elif name == "fusion":
        for adapter in ("seq", "houlsby"):
            hf.load_adapter(model, str(root / "fusion" / adapter))
        hf.load_adapter_fusion(model, str(root / "fusion"), set_active=True)
    elif name == "masks":
        hf.load_masks(model, str(root / "masks"))
    with torch.no_grad():
        return model(input_ids=TOKENS[row:row + 1], attention_mask=ATTENTION[row:row + 1]).last_hidden_state


def test_load_task_registers_every_method_inactive_and_lists_it(checkpoints):
    root = checkpoints["bert"]
    model = tiny("bert")
    with torch.no_grad():
        base = model(input_ids=TOKENS, attention_mask=ATTENTION).last_hidden_state
    methods = {name: hf.load_task(model, name, root / name) for name in ("houlsby", "parallel", "fusion", "masks")}
    assert methods == {"houlsby": "bottleneck_adapter", "parallel": "bottleneck_adapter", "fusion": "adapter_fusion",
                       "masks": "mask_tuning"}
    with torch.no_grad():  # every task inactive: the base model
        torch.testing.assert_close(model(input_ids=TOKENS, attention_mask=ATTENTION).last_hidden_state, base,
                                   atol=1e-5, rtol=0)
    listing = hf.list_tasks(model)
    assert {name: entry["method"] for name, entry in listing.items()} == {
        "houlsby": "bottleneck_adapter", "parallel": "bottleneck_adapter", "seq": "bottleneck_adapter",
        "fusion": "adapter_fusion", "masks": "mask_tuning"}
    adapter_count = sum(p.numel() for p in hf.adapter_parameters(model, "houlsby").values())
    assert listing["houlsby"]["stored_parameters"] == adapter_count > 0
    masked = hf.masked_modules(model)
    assert listing["masks"]["stored_parameters"] == sum(m.out_features * m.in_features for m in masked.values())
    # ~1 bit per weight plus the JSON and safetensors headers: far under the 4 bytes per weight of a copy
    assert listing["masks"]["bytes_on_disk"] < listing["masks"]["stored_parameters"] / 2
    assert listing["seq"]["bytes_on_disk"] is None  # loaded with the fusion, not as a task of its own


def test_load_task_refuses_before_anything_changes(checkpoints, tmp_path):
    root = checkpoints["bert"]
    model = wide_bert()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, match in (("houlsby", "hidden size 32 does not match the model's 48"),
                        ("masks", "saved from a model of hidden size 32; this model's is 48"),
                        ("fusion", "hidden size")):
        with pytest.raises(ValueError, match=match):
            hf.load_task(model, name, root / name)
    assert hf.list_tasks(model) == {} and model.state_dict().keys() == state.keys()
    bert = tiny("bert")
    hf.load_task(bert, "houlsby", root / "houlsby")
    with pytest.raises(ValueError, match="already has a task named 'houlsby'"):
        hf.load_task(bert, "houlsby", root / "parallel")
    hf.save_side(hf.side_tune(tiny("bert"), method="side", reduction_factor=4), str(tmp_path / "side"))
    with pytest.raises(ValueError, match="side-tuning changes the whole network"):
        hf.load_task(bert, "side", tmp_path / "side")
    with pytest.raises(ValueError, match="holds no checkpoint pefops reads"):
        hf.load_task(bert, "empty", tmp_path)
    with pytest.raises(ValueError, match="no tasks named \\['nope'\\]"):
        hf.set_row_tasks(bert, ["houlsby", "nope"], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="row_task values must be in \\[0, 2\\)"):
        hf.set_row_tasks(bert, ["houlsby", None], torch.tensor([0, 2]))
    assert hf.active_adapter(bert) is None


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_each_row_equals_its_task_alone(checkpoints, model_type):
    root = checkpoints[model_type]
    model = model_with_tasks(model_type, root)
    names = ["masks", None, "houlsby", "fusion", "parallel"]
    row_task = torch.tensor([4, 3, 2, 1, 0])
    hf.set_row_tasks(model, names, row_task)
    with torch.no_grad():
        mixed = model(input_ids=TOKENS, attention_mask=ATTENTION).last_hidden_state
    for row, index in enumerate(row_task.tolist()):
        keep = ATTENTION[row].bool()  # padded positions are not compared (their values are free)
        expected = alone(model_type, root, names[index], row)[0]
        torch.testing.assert_close(mixed[row][keep], expected[keep], atol=2e-5, rtol=1e-4)
    hf.set_row_tasks(model, None)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=TOKENS[:1], attention_mask=ATTENTION[:1]).last_hidden_state,
                                   alone(model_type, root, None, 0), atol=2e-5, rtol=1e-4)


def test_single_task_batch_equals_the_methods_own_activation(checkpoints):
    root = checkpoints["gpt2"]
    model = model_with_tasks("gpt2", root)
    for name in ("fusion", "masks"):
        hf.set_row_tasks(model, [name], torch.zeros(2, dtype=torch.long))
        with torch.no_grad():
            routed = model(input_ids=TOKENS[:2], attention_mask=ATTENTION[:2]).last_hidden_state
        for row in range(2):
            keep = ATTENTION[row].bool()
            torch.testing.assert_close(routed[row][keep], alone("gpt2", root, name, row)[0][keep], atol=2e-5,
                                       rtol=1e-4)


def test_mixed_gradients_equal_each_task_alone(checkpoints):
    root = checkpoints["llama"]
    model = model_with_tasks("llama", root)
    trained = {**hf.adapter_parameters(model, "houlsby"), **hf.fusion_parameters(model, ["seq", "houlsby"])}
    model.requires_grad_(False)  # the frozen base
    for parameter in trained.values():
        parameter.requires_grad_(True)
    names, row_task = ["houlsby", "masks", "fusion"], torch.tensor([0, 2, 1, 0, 2])
    hf.set_row_tasks(model, names, row_task)
    read_out(model(input_ids=TOKENS, attention_mask=ATTENTION).last_hidden_state, ATTENTION).backward()
    mixed = {n: p.grad.clone() for n, p in trained.items()}
    for p in trained.values():
        p.grad = None
    for row, index in enumerate(row_task.tolist()):  # each row alone, its task as the only one
        hf.set_row_tasks(model, [names[index]], torch.zeros(1, dtype=torch.long))
        loss = read_out(model(input_ids=TOKENS[row:row + 1], attention_mask=ATTENTION[row:row + 1]).last_hidden_state,
                        ATTENTION[row:row + 1])
        if loss.requires_grad:  # a mask row alone trains nothing here
            loss.backward()
    fusion_only = [n for n in trained if ".fusions." in n]
    assert all(mixed[n].abs().sum() > 0 for n in fusion_only)
    for n, p in trained.items():
        torch.testing.assert_close(mixed[n], p.grad, atol=1e-5, rtol=1e-4)


def test_prefix_and_prompt_checkpoints_load_as_inactive_tasks(tmp_path):
    for method, apply in (("prefix_tuning", lambda m: hf.apply_prefix_tuning(m, 3, projection_hidden=8)),
                          ("prompt_tuning", lambda m: hf.apply_prompt_tuning(m, 2))):
        source = tiny("gpt2")
        apply(source)
        hf.save_prefix(source, tmp_path / method)
    model = tiny("gpt2")
    with torch.no_grad():
        base = model(input_ids=TOKENS, attention_mask=ATTENTION).last_hidden_state
    implementation = model.config._attn_implementation
    assert hf.load_task(model, "p", tmp_path / "prefix_tuning") == "prefix_tuning"
    assert hf.load_task(model, "q", tmp_path / "prompt_tuning") == "prompt_tuning"
    assert model.config._attn_implementation == implementation  # inactive: the model's own attention
    assert getattr(model, "prefix_tuning", None) is None and getattr(model, "prompt_tuning", None) is None
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("pefops_task_modules."))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=TOKENS, attention_mask=ATTENTION).last_hidden_state, base)
    listing = hf.list_tasks(model)
    assert (listing["p"]["method"], listing["q"]["method"]) == ("prefix_tuning", "prompt_tuning")
    assert listing["q"]["stored_parameters"] == 2 * 32 and listing["q"]["trainable_parameters"] == 0


def test_a_new_row_index_reuses_the_mask_stacks_and_an_edited_mask_is_seen(checkpoints):
    """A serving loop calls set_row_tasks per batch with the same names: each masked layer keeps its
    stacked task masks; a mask edited in place (a new version) is stacked again."""
    from pefops.hf.mask_tuning import masked_modules
    from pefops.hf.tasks import _all_tasks

    root = checkpoints["bert"]
    model = model_with_tasks("bert", root)
    names = ["masks", None, "houlsby"]
    hf.set_row_tasks(model, names, torch.tensor([0, 1, 2, 0, 1]))
    layer, module = next(iter(masked_modules(model).items()))
    stack = module._row_masks[0]
    row_task = torch.tensor([2, 0, 1, 1, 0])
    hf.set_row_tasks(model, names, row_task)
    assert module._row_masks[0] is stack
    with torch.no_grad():
        before = model(input_ids=TOKENS, attention_mask=ATTENTION).last_hidden_state
    for row, index in enumerate(row_task.tolist()):
        keep = ATTENTION[row].bool()
        torch.testing.assert_close(before[row][keep], alone("bert", root, names[index], row)[0][keep], atol=2e-5,
                                   rtol=1e-4)
    mask = _all_tasks(model)["masks"].masks[layer]
    with torch.no_grad():
        mask.bitwise_not_()  # in place: the task now keeps the weights it dropped
    hf.set_row_tasks(model, names, row_task)
    assert module._row_masks[0] is not stack
    with torch.no_grad():
        after = model(input_ids=TOKENS, attention_mask=ATTENTION).last_hidden_state
        hf.set_row_tasks(model, ["masks"], torch.zeros(1, dtype=torch.long))
        mask_row_alone = model(input_ids=TOKENS[1:2], attention_mask=ATTENTION[1:2]).last_hidden_state[0]
    keep = ATTENTION[1].bool()
    assert not torch.allclose(after[1][keep], before[1][keep])
    torch.testing.assert_close(after[1][keep], mask_row_alone[keep], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(after[0], before[0])  # a row of another task is unchanged
