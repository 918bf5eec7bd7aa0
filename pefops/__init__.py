"""pefops: fused Triton and CUDA kernels for parameter-efficient fine-tuning.

`import pefops` needs only torch: Triton, the CUDA extension and transformers are loaded on first
use, and a missing one only removes the backend or integration that needs it.
"""

__version__ = "0.1.0"

import importlib.machinery
import importlib.util
import os
import sys

KERNELS_DOC = """Triton kernels of pefops (kernels/ in the source tree), one file per op family.

Only @triton.jit functions and their launchers live here: tensors in, outputs allocated, grid and
config chosen. Autograd, modules and backend dispatch live in pefops.ops. Importing this package
does not import Triton; importing one of its modules does.
"""


def _expose_source_tree_kernels():
    # Installed, the Triton kernels are the subpackage pefops/kernels. In a source checkout (an
    # editable install, or the GPU machine running with PYTHONPATH at the root) they sit in kernels/
    # beside pefops/. That folder deliberately has no __init__.py: with the checkout's root on
    # sys.path a regular package named `kernels` there would shadow Hugging Face's `kernels`
    # distribution, which transformers imports. Without one it is at most a namespace portion, which
    # every installed regular package wins over; pefops.kernels is built here from its path.
    package_dir = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(package_dir, "kernels")) or "pefops.kernels" in sys.modules:
        return
    source_dir = os.path.join(os.path.dirname(package_dir), "kernels")
    if not os.path.isdir(source_dir):
        return
    spec = importlib.machinery.ModuleSpec("pefops.kernels", None, is_package=True)
    spec.submodule_search_locations = [source_dir]
    module = importlib.util.module_from_spec(spec)
    module.__doc__ = KERNELS_DOC
    sys.modules["pefops.kernels"] = module
    globals()["kernels"] = module


_expose_source_tree_kernels()

from pefops import backend, ops, nn  # noqa: E402  (ops registers the custom ops)

__all__ = ["backend", "ops", "nn", "__version__"]


def __getattr__(name):
    # pefops.hf imports transformers, which is optional: load it only when asked for.
    if name == "hf":
        import importlib

        return importlib.import_module("pefops.hf")
    raise AttributeError(f"module 'pefops' has no attribute {name!r}")
