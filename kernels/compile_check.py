"""Ahead-of-time compilation of the Triton kernels for a GPU target on a machine with no GPU:
catches what the interpreter cannot (layouts, dot shapes, types on the real backend) and reports
registers, spills and shared memory from ptxas, so tile choices can be read before any device time.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_TENSOR_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_FLOAT_SCALARS = {"scale_value", "eps", "negative_slope", "dropout_p"}


def compile_for_target(kernel, dtype: str, constexprs: dict, data_pointers: set, num_warps=4, num_stages=3,
                       capability=90, values: dict | None = None):
    """Compile `kernel` (a triton.jit function) for sm_<capability>. Pointers named in
    `data_pointers` get the activation dtype; other pointers are fp32; float scalars by name; the
    remaining runtime arguments are i32.

    Launch hints as a real launch specialises them: pointers 16-byte aligned; an integer argument
    whose value is given in `values` (the dims and strides a headline launch passes) is marked
    divisible by 16 when it is, and becomes the constant 1 when it is 1; a stride with no value
    given is assumed divisible (contiguous rows of a hidden size that is a multiple of 16). Names in
    `values` that are not arguments of `kernel` are ignored (one table may serve a forward and a
    backward kernel)."""
    parameters = list(inspect.signature(kernel.fn).parameters)
    values = {name: value for name, value in (values or {}).items() if name in parameters}
    constexprs = dict(constexprs)
    for name, value in values.items():
        if value == 1 and name not in constexprs:
            constexprs[name] = 1  # Triton specialises an integer argument equal to 1 into a constant
    signature, hinted = {}, []
    for index, name in enumerate(parameters):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            signature[name] = f"*{_TENSOR_DTYPE[dtype]}" if name in data_pointers else "*fp32"
            hinted.append(index)
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in values:
                if int(values[name]) % 16 == 0:
                    hinted.append(index)
            elif name.startswith("stride"):
                hinted.append(index)
    # Real launches specialise 16-byte-aligned pointers and integers divisible by 16 (vector loads);
    # without the same hint ptxas sees scalar loads and reports a worst case.
    attributes = {(index,): [["tt.divisibility", 16]] for index in hinted}
    try:
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attributes)
    except TypeError:  # older Triton: no attrs argument
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def name_at(kernel, index: int) -> str:
    return list(inspect.signature(kernel.fn).parameters)[index]


def ptxas_report(compiled, capability=90) -> dict:
    """Registers, spill bytes and stack frame from the bundled ptxas, and Triton's shared memory."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    gpu_name = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as directory:
        ptx_path = os.path.join(directory, "kernel.ptx")
        with open(ptx_path, "w") as handle:
            handle.write(compiled.asm["ptx"])
        result = subprocess.run([ptxas, "-v", "--gpu-name", gpu_name, ptx_path, "-o", os.path.join(directory, "k.cubin")],
                                capture_output=True, text=True, check=True)
    text = result.stdout + result.stderr
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else 0  # noqa: E731
    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "stack_frame": number(r"(\d+) bytes stack frame"),
        "shared_bytes": compiled.metadata.shared,
    }


KERNEL_MODULES = ("bottleneck_adapter", "masked_linear", "gated_blend", "fusion_mix", "multi_adapter", "prefix_attention",
                  "lsh_attention")


def main(argv=None) -> int:
    """python -m pefops.kernels.compile_check [--capability 90] [--json]: compile every registered
    variant for the target and print ptxas' registers/spills (needs TRITON_INTERPRET unset)."""
    import argparse
    import importlib
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--capability", type=int, default=90)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for a GPU")
    rows = []
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(f"pefops.kernels.{module_name}")
        for name, kernel, dtype, constexprs, pointers, warps, stages, *rest in module.compile_variants():
            # an optional 8th entry: the integer arguments of a real launch (dims, strides) for its hints
            compiled = compile_for_target(kernel, dtype, constexprs, set(pointers), warps, stages, args.capability,
                                          values=rest[0] if rest else None)
            rows.append({"kernel": f"{module_name}:{name}", "num_warps": warps, "num_stages": stages,
                         **ptxas_report(compiled, args.capability)})
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(f"{row['kernel']:<44} warps {row['num_warps']} regs {row['registers']:>3} "
                  f"spill {row['spill_stores']:>4}/{row['spill_loads']:<4} smem {row['shared_bytes']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
