"""No top-level name of the source tree shadows an installed package.

`python -m pytest`, `python -m bench` and bench/gpu_check.sh all put the checkout's root first on
sys.path. A regular package there named like an installed distribution wins over it: our old
kernels/__init__.py hid Hugging Face's `kernels`, which transformers >= 5.25 imports, and every
Reformer / PEFT test failed at collection. Each check runs in a fresh interpreter, as a user's would.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Every top-level folder of the checkout that Python could import by name.
TOP_LEVEL_FOLDERS = ("kernels", "bench", "tests", "csrc")


def run_with_root_first(code: str, extra_path: str | None = None) -> dict:
    """Runs `code` in a new interpreter whose sys.path starts with the checkout's root (then
    `extra_path`, then the venv's site-packages) from a neutral directory; returns its JSON output."""
    prelude = (
        "import sys, json\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        + (f"sys.path.insert(1, {extra_path!r})\n" if extra_path else "")
    )
    result = subprocess.run(
        [sys.executable, "-c", prelude + code],
        cwd=str(ROOT.parent),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", TOP_LEVEL_FOLDERS)
def test_top_level_folder_is_not_a_regular_package(name):
    assert not (ROOT / name / "__init__.py").exists(), (
        f"{name}/__init__.py makes `{name}` a regular package that shadows any installed `{name}` "
        "whenever the checkout's root is on sys.path"
    )


def test_installed_packages_win_over_source_tree_folders(tmp_path):
    # A stand-in distribution for each top-level name, on sys.path *after* the root.
    for name in TOP_LEVEL_FOLDERS:
        package = tmp_path / name
        package.mkdir()
        (package / "__init__.py").write_text(f"MARKER = 'installed {name}'\n")
    code = (
        "import importlib\n"
        f"names = {list(TOP_LEVEL_FOLDERS)!r}\n"
        "print(json.dumps({n: getattr(importlib.import_module(n), 'MARKER', None) for n in names}))\n"
    )
    seen = run_with_root_first(code, extra_path=str(tmp_path))
    assert seen == {name: f"installed {name}" for name in TOP_LEVEL_FOLDERS}


@pytest.mark.hf
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_transformers_and_pefops_hf_import_with_root_first():
    code = (
        "from transformers import BertModel\n"
        "import pefops.hf, pefops.kernels\n"
        "from pefops.kernels import launch\n"
        "import importlib.util\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "origin = None if spec is None else (spec.origin or list(spec.submodule_search_locations))\n"
        "print(json.dumps({'kernels': str(origin), 'launch': launch.__file__,"
        " 'pefops_kernels_path': list(pefops.kernels.__path__)}))\n"
    )
    seen = run_with_root_first(code)
    assert seen["launch"] == str(ROOT / "kernels" / "launch.py")
    assert seen["pefops_kernels_path"] == [str(ROOT / "kernels")]
    hub_kernels_installed = any(
        (Path(p) / "kernels" / "__init__.py").exists() for p in sys.path if "site-packages" in p
    )
    if hub_kernels_installed:
        # Hugging Face's package, not our folder.
        assert "site-packages" in seen["kernels"] and str(ROOT / "kernels") not in seen["kernels"], seen
