"""pefops: fused Triton and CUDA kernels for parameter-efficient fine-tuning.

`import pefops` needs only torch: Triton, the CUDA extension and transformers are loaded on first
use, and a missing one only removes the backend or integration that needs it.
"""

__version__ = "0.1.0"

import importlib.util
import os
import sys


def _expose_source_tree_kernels():
    # Installed, the Triton kernels are the subpackage pefops/kernels. In a source checkout (the GPU
    # machine runs from one, with PYTHONPATH at the root) they sit in kernels/ beside pefops/.
    package_dir = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(package_dir, "kernels")) or "pefops.kernels" in sys.modules:
        return
    source_dir = os.path.join(os.path.dirname(package_dir), "kernels")
    init_file = os.path.join(source_dir, "__init__.py")
    if not os.path.isfile(init_file):
        return
    spec = importlib.util.spec_from_file_location(
        "pefops.kernels", init_file, submodule_search_locations=[source_dir]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["pefops.kernels"] = module
    spec.loader.exec_module(module)


_expose_source_tree_kernels()

from pefops import backend, ops, nn  # noqa: E402  (ops registers the custom ops)

__all__ = ["backend", "ops", "nn", "__version__"]


def __getattr__(name):
    # pefops.hf imports transformers, which is optional: load it only when asked for.
    if name == "hf":
        import importlib

        return importlib.import_module("pefops.hf")
    raise AttributeError(f"module 'pefops' has no attribute {name!r}")
