"""pefops: fused Triton and CUDA kernels for parameter-efficient fine-tuning.

`pip install .` (or `-e .`) works without a GPU or nvcc: the CUDA sources under csrc/ are shipped
inside the package and built just-in-time on first use on a CUDA machine. With PEFOPS_BUILD_CUDA=1
they are built ahead of time into pefops._C instead (needs torch with CUDA and nvcc in the build
environment: `PEFOPS_BUILD_CUDA=1 pip install --no-build-isolation .`).
"""

import glob
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC_PATTERNS = ("*.cu", "*.cpp", "*.h", "*.cuh", "*.hpp")


def csrc_files():
    return sorted(f for pattern in CSRC_PATTERNS for f in glob.glob(os.path.join(ROOT, "csrc", pattern)))


class BuildPyWithCsrcSources(build_py):
    """Copies csrc/ into pefops/_csrc_sources so an installed (non-editable) pefops can JIT-build it,
    and gives the installed pefops.kernels the __init__.py that the source folder kernels/ must not
    have (there it would shadow Hugging Face's `kernels` package; see pefops/__init__.py)."""

    def run(self):
        super().run()
        kernels_init = os.path.join(self.build_lib, "pefops", "kernels", "__init__.py")
        with open(kernels_init, "w") as f:
            f.write('"""Triton kernels of pefops, one file per op family (see pefops.KERNELS_DOC)."""\n')
        target = os.path.join(self.build_lib, "pefops", "_csrc_sources")
        os.makedirs(target, exist_ok=True)
        for source in csrc_files():
            shutil.copy2(source, target)


ext_modules = []
cmdclass = {"build_py": BuildPyWithCsrcSources}
if os.environ.get("PEFOPS_BUILD_CUDA", "0") == "1":
    import importlib.util

    # pefops/csrc.py finds the toolkit and the wheel-shipped CUDA headers; load it by path so the
    # build needs neither an installed pefops nor its imports.
    spec = importlib.util.spec_from_file_location("pefops_csrc_loader", os.path.join(ROOT, "pefops", "csrc.py"))
    csrc_loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(csrc_loader)
    cuda_home = csrc_loader.find_cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", str(cuda_home))
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = [os.path.relpath(f, ROOT) for f in csrc_files() if f.endswith((".cu", ".cpp"))]
    ext_modules.append(CUDAExtension("pefops._C", sources=sources, extra_compile_args=csrc_loader.extension_compile_args()))
    cmdclass["build_ext"] = BuildExtension

setup(
    name="pefops",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for parameter-efficient fine-tuning and efficient attention",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["pefops", "pefops.ops", "pefops.nn", "pefops.hf", "pefops.kernels"],
    package_dir={"pefops.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "numpy",
    ],
    extras_require={
        "hf": ["transformers>=5.0", "safetensors>=0.4"],
        "test": ["pytest>=8", "hypothesis>=6", "pytest-timeout", "ninja", "peft>=0.17"],
        "bench": ["matplotlib>=3.7", "tqdm>=4.60", "pytest-benchmark>=4"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["pefops-info=pefops.__main__:main"]},
)
