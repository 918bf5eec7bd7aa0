"""AdapterCall (#14 item 3): the one carrier of a bottleneck-adapter call, flattened to the custom ops'
flat schemas, which stay exactly what torch inferred from the annotations before (torch.compile graphs
and saved programs name these arguments)."""

import dataclasses
import importlib

import pytest
import torch

import pefops  # noqa: F401  (registers the custom ops)
from pefops.ops.adapter_call import FORWARD_PARAMETERS, AdapterCall, parameter_names, routed_parameters

SCHEMAS = {
    "bottleneck_adapter_fwd": "pefops::bottleneck_adapter_fwd(Tensor x, Tensor down_weight, Tensor? down_bias, "
    "Tensor up_weight, Tensor? up_bias, Tensor? scaling, float scaling_value, Tensor? residual, Tensor? ln_weight, "
    "Tensor? ln_bias, float ln_eps, bool layer_norm, SymInt activation, float negative_slope, str backend) -> "
    "(Tensor, Tensor, Tensor, Tensor)",
    "bottleneck_adapter_bwd": "pefops::bottleneck_adapter_bwd(Tensor grad_out, Tensor x, Tensor down_weight, "
    "Tensor? down_bias, Tensor up_weight, Tensor? up_bias, Tensor? scaling, float scaling_value, Tensor? residual, "
    "Tensor? ln_weight, Tensor? ln_bias, bool layer_norm, Tensor z, Tensor mean, Tensor rstd, SymInt activation, "
    "float negative_slope, bool[] grad_mask, str backend) -> Tensor[]",
    "multi_adapter_fwd": "pefops::multi_adapter_fwd(Tensor x, Tensor index, Tensor down_weight, Tensor? down_bias, "
    "Tensor up_weight, Tensor? up_bias, Tensor? scaling, float scaling_value, Tensor? residual, Tensor? ln_weight, "
    "Tensor? ln_bias, float ln_eps, bool layer_norm, SymInt activation, float negative_slope, str backend) -> "
    "(Tensor, Tensor, Tensor, Tensor)",
    "multi_adapter_bwd": "pefops::multi_adapter_bwd(Tensor grad_out, Tensor x, Tensor index, Tensor down_weight, "
    "Tensor? down_bias, Tensor up_weight, Tensor? up_bias, Tensor? scaling, float scaling_value, Tensor? residual, "
    "Tensor? ln_weight, Tensor? ln_bias, bool layer_norm, Tensor z, Tensor mean, Tensor rstd, SymInt activation, "
    "float negative_slope, bool[] grad_mask, str backend) -> Tensor[]",
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_custom_op_schemas_are_unchanged(name):
    assert str(getattr(torch.ops.pefops, name).default._schema) == SCHEMAS[name]


def _call(index=None):
    hidden, rank = 8, 3
    stacked = () if index is None else (2,)
    return AdapterCall(
        x=torch.randn(5, hidden), down_weight=torch.randn(*stacked, rank, hidden), down_bias=None,
        up_weight=torch.randn(*stacked, hidden, rank), up_bias=torch.randn(*stacked, hidden),
        scaling=torch.randn(*stacked, hidden), scaling_value=1.0, residual=torch.randn(5, hidden),
        ln_weight=torch.randn(hidden), ln_bias=None, ln_eps=1e-6, layer_norm=True, activation=2,
        negative_slope=0.2, index=index,
    )


@pytest.mark.parametrize("routed", [False, True])
def test_forward_arguments_round_trip(routed):
    call = _call(torch.tensor([0, 1, 1, 0, 1]) if routed else None)
    parameters = routed_parameters(FORWARD_PARAMETERS) if routed else FORWARD_PARAMETERS
    arguments = call.forward_arguments("torch")
    named = dict(zip(parameter_names(parameters), arguments))
    assert len(arguments) == len(parameters) and named["backend"] == "torch"
    rebuilt = AdapterCall.from_schema_arguments(named)
    for field in dataclasses.fields(AdapterCall):
        assert getattr(rebuilt, field.name) is getattr(call, field.name), field.name


def test_the_forward_op_returns_what_the_reference_does():
    call = _call()
    out = torch.ops.pefops.bottleneck_adapter_fwd(*call.forward_arguments("torch"))[0]
    module = importlib.import_module("pefops.ops.bottleneck_adapter")  # the module, not the function
    assert torch.equal(out, module._torch_forward(call)[0])
