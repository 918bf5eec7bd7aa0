"""Loader of pefops' CUDA C++ extension (the kernels in ``csrc/``).

``load()`` returns the extension module. It first tries ``pefops._C``, which
``PEFOPS_BUILD_CUDA=1 pip install .`` builds ahead of time from the same sources, and otherwise builds
``pefops_csrc`` just-in-time with ``torch.utils.cpp_extension.load`` (ninja + nvcc; a couple of
minutes the first time, then cached on disk under ``$PEFOPS_CACHE_DIR`` or ``~/.cache/pefops``, and in
memory for the rest of the process).

``unavailable_reasons(device)`` says cheaply (no build, no compiler run) why the extension cannot
serve; ``build_error()`` returns the message of the last failed build.

Importing this module never fails and never touches CUDA: it needs only the standard library, so
``setup.py`` may load it by path (``importlib.util.spec_from_file_location``) to read
``CSRC_SOURCES`` without importing torch or the rest of pefops.

Environment:
  PEFOPS_CACHE_DIR       where JIT builds go (default ``~/.cache/pefops``)
  PEFOPS_VERBOSE_BUILD   ``1`` shows the compiler commands and output
  CUDA_HOME / CUDA_PATH  the CUDA toolkit (otherwise found from ``nvcc`` on PATH or /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST   target architectures; when unset and no GPU is visible, "8.0;9.0"
  PEFOPS_CUDA_EXT        ``0`` keeps this process off the extension (no build, no load): e.g. while
                         another process builds it (bench/gpu_check.sh's warm-up runs beside the build)
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

__all__ = [
    "CSRC_SOURCES",
    "CSRC_HEADERS",
    "SOURCE_DIR",
    "EXTENSION_NAME",
    "PREBUILT_MODULE",
    "load",
    "unavailable_reasons",
    "build_error",
    "find_cuda_home",
    "build_directory",
    "extension_compile_args",
]

EXTENSION_NAME = "pefops_csrc"  # module name of the just-in-time build
PREBUILT_MODULE = "pefops._C"  # module name of the ahead-of-time build (setup.py)
DEFAULT_ARCH_LIST = "8.0;9.0"  # targets when no GPU is visible to ask
REQUIRED_SYMBOLS = ("bottleneck_adapter_decode_forward", "masked_linear_decode_forward", "multi_adapter_decode_forward",
                    "lsh_counting_sort")
EXTRA_CUDA_CFLAGS = ["-O3", "-lineinfo"]

_PACKAGE_DIR = Path(__file__).resolve().parent
# Source checkout / editable install: <repo>/csrc next to <repo>/pefops. Non-editable install:
# setup.py copies the sources to pefops/_csrc_sources.
SOURCE_DIR_CANDIDATES = (_PACKAGE_DIR.parent / "csrc", _PACKAGE_DIR / "_csrc_sources")


def _find_source_dir() -> Path | None:
    for candidate in SOURCE_DIR_CANDIDATES:
        if (candidate / "bindings.cpp").is_file():
            return candidate
    return None


def _glob(directory: Path | None, patterns: tuple[str, ...]) -> list[str]:
    if directory is None:
        return []
    found = set()
    for pattern in patterns:
        found.update(str(p) for p in directory.glob(pattern) if p.is_file())
    return sorted(found)


SOURCE_DIR: Path | None = _find_source_dir()
# Compiled translation units (absolute paths): every csrc/*.cu and csrc/*.cpp.
CSRC_SOURCES: list[str] = _glob(SOURCE_DIR, ("*.cu", "*.cpp"))
# Headers they include (setup.py must ship them too, e.g. into pefops/_csrc_sources).
CSRC_HEADERS: list[str] = _glob(SOURCE_DIR, ("*.h", "*.cuh", "*.hpp"))

_lock = threading.RLock()
_module = None
_build_error: str | None = None


# --------------------------------------------------------------------------------------------
# Toolchain discovery (no torch needed)


def _is_toolkit(path: str | os.PathLike | None) -> bool:
    if not path:
        return False
    p = Path(path)
    return (p / "bin" / "nvcc").is_file() and (p / "include" / "cuda_runtime.h").is_file()


def _toolkit_from_nvcc_dryrun(nvcc: str) -> str | None:
    # A wrapper script (e.g. /usr/local/bin/nvcc -> exec /usr/local/cuda-X/bin/nvcc) hides the
    # toolkit; nvcc itself reports where it lives.
    try:
        res = subprocess.run(
            [nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"_HERE_=(\S+)", res.stdout + res.stderr)
    if m:
        home = os.path.dirname(os.path.normpath(m.group(1)))
        if _is_toolkit(home):
            return home
    return None


def find_cuda_home() -> str | None:
    """The CUDA toolkit directory (with bin/nvcc and include/cuda_runtime.h), or None.

    Order: $CUDA_HOME, $CUDA_PATH, the toolkit of ``nvcc`` on PATH (following symlinks and wrapper
    scripts), /usr/local/cuda. Memoised per (CUDA_HOME, CUDA_PATH, PATH).
    """
    return _find_cuda_home_cached(
        os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), os.environ.get("PATH")
    )


@functools.lru_cache(maxsize=8)
def _find_cuda_home_cached(_cuda_home, _cuda_path, _path) -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(home):
            return home
    if _is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda"
    if nvcc is not None:
        return _toolkit_from_nvcc_dryrun(nvcc)
    return None


def _find_ninja() -> str | None:
    ninja = shutil.which("ninja")
    if ninja is not None:
        return ninja
    # The `ninja` wheel puts the binary in the environment's bin/, which is not on PATH when python
    # is run by its full path without activating the environment.
    candidates = [Path(sys.executable).parent / "ninja"]
    try:
        import ninja as ninja_pkg  # noqa: PLC0415

        candidates.insert(0, Path(ninja_pkg.BIN_DIR) / "ninja")
    except Exception:  # noqa: BLE001
        pass
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _prebuilt_spec_exists() -> bool:
    try:
        return importlib.util.find_spec(PREBUILT_MODULE) is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# Public API


def unavailable_reasons(device=None) -> list[str]:
    """Why the CUDA extension cannot serve `device` (a torch.device, str, index or None = current).

    Cheap: no build and no compiler run. An empty list means it should work (the first ``load()``
    may still have to compile it). A build that failed earlier in this process is a reason too.
    """
    reasons: list[str] = []
    if disabled():
        return ["disabled by PEFOPS_CUDA_EXT=0"]
    try:
        import torch  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001
        return [f"torch cannot be imported ({exc})"]

    if torch.version.cuda is None:
        what = "ROCm/HIP" if getattr(torch.version, "hip", None) else "CPU-only"
        reasons.append(f"torch {torch.__version__} was built without CUDA ({what} build)")

    with _lock:
        have_module = _module is not None
        failed = _build_error
    if not have_module and torch.version.cuda is not None:
        if failed is not None:
            first = failed.strip().splitlines()[0] if failed.strip() else "unknown error"
            reasons.append(f"the CUDA extension failed to build earlier in this process: {first}")
        elif not _prebuilt_spec_exists():
            if not CSRC_SOURCES:
                looked = ", ".join(str(c) for c in SOURCE_DIR_CANDIDATES)
                reasons.append(f"the csrc sources were not found (looked in {looked})")
            if find_cuda_home() is None:
                reasons.append("nvcc not found (set CUDA_HOME to a CUDA toolkit)")
            if _find_ninja() is None:
                reasons.append("ninja not found (pip install ninja)")

    if device is not None:
        dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        if dev.type != "cuda":
            reasons.append(f"device is {dev}, not a CUDA device")
            return reasons
    else:
        dev = None
    if torch.version.cuda is None:
        return reasons
    if not torch.cuda.is_available():
        reasons.append("no CUDA device (torch.cuda.is_available() is False)")
        return reasons
    index = dev.index if dev is not None and dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        reasons.append(f"no CUDA device cuda:{index} (there are {torch.cuda.device_count()})")
        return reasons
    major, minor = torch.cuda.get_device_capability(index)
    if major < 7:
        reasons.append(f"compute capability {major}.{minor} is below 7.0")
    return reasons


def disabled() -> bool:
    """PEFOPS_CUDA_EXT=0 (or off/false/no): this process neither builds nor loads the extension."""
    return os.environ.get("PEFOPS_CUDA_EXT", "").strip().lower() in ("0", "off", "false", "no")


def build_error() -> str | None:
    """The message of the last failed build in this process, or None."""
    with _lock:
        return _build_error


def build_directory() -> Path:
    """Where the JIT build of the current sources and configuration goes (not created here)."""
    import torch  # noqa: PLC0415

    root = os.environ.get("PEFOPS_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "pefops"
    )
    version = re.sub(r"[^A-Za-z0-9._+-]", "_", torch.__version__)
    return Path(root) / f"csrc-{version}-{_source_hash(_arch_list_for_build())}"


def extension_compile_args() -> dict[str, list[str]]:
    """Compiler flags for the extension: {"cxx": [...], "nvcc": [...]}, as CUDAExtension's
    extra_compile_args wants them (setup.py uses this for the ahead-of-time build too).

    Adds the CUDA headers that pip wheels ship (<site-packages>/nvidia/cu13/include) as -isystem
    directories; they come after the toolkit's include directory, so they only fill in what a bare
    toolkit lacks (cublas_v2.h, cusparse.h, ... which torch's headers include). Imports torch.
    """
    extra_system: list[str] = []
    for inc in _wheel_cuda_include_dirs():
        extra_system += ["-isystem", inc]
    return {"cxx": ["-O3", *extra_system], "nvcc": [*EXTRA_CUDA_CFLAGS, *extra_system]}


def load(verbose: bool | None = None):
    """Return the extension module (pefops._C if installed, else a just-in-time build).

    Builds at most once per process; raises RuntimeError with the reason (and the compiler's
    output when the build fails). A failed build is remembered: later calls raise the same error
    without compiling again.
    """
    global _module, _build_error
    if disabled():
        raise RuntimeError("the pefops CUDA extension is disabled in this process (PEFOPS_CUDA_EXT=0)")
    with _lock:
        if _module is not None:
            return _module
        if _build_error is not None:
            raise RuntimeError(_build_error)

        import torch  # noqa: PLC0415

        prebuilt = _import_prebuilt()
        if prebuilt is not None:
            _module = prebuilt
            return _module

        problems = []
        if torch.version.cuda is None:
            problems.append(f"torch {torch.__version__} was built without CUDA")
        if not CSRC_SOURCES:
            looked = ", ".join(str(c) for c in SOURCE_DIR_CANDIDATES)
            problems.append(f"the csrc sources were not found (looked in {looked})")
        cuda_home = find_cuda_home()
        if cuda_home is None:
            problems.append("nvcc not found (set CUDA_HOME to a CUDA toolkit)")
        ninja = _find_ninja()
        if ninja is None:
            problems.append("ninja not found (pip install ninja)")
        if problems:
            # Not a build failure: the environment may be fixed and load() called again.
            raise RuntimeError("cannot build the pefops CUDA extension: " + "; ".join(problems))

        if verbose is None:
            verbose = os.environ.get("PEFOPS_VERBOSE_BUILD", "").strip().lower() in (
                "1", "true", "yes", "on",
            )
        try:
            module = _jit_build(
                name=EXTENSION_NAME,
                sources=CSRC_SOURCES,
                headers=CSRC_HEADERS,
                cuda_home=cuda_home,
                ninja=ninja,
                verbose=verbose,
            )
        except Exception as exc:  # noqa: BLE001
            _build_error = f"building the pefops CUDA extension failed: {exc}"
            raise RuntimeError(_build_error) from exc
        missing = [s for s in REQUIRED_SYMBOLS if not hasattr(module, s)]
        if missing:
            _build_error = f"the built pefops CUDA extension lacks {', '.join(missing)}"
            raise RuntimeError(_build_error)
        _module = module
        return _module


# --------------------------------------------------------------------------------------------
# Internals


def _import_prebuilt():
    if not _prebuilt_spec_exists():
        return None
    try:
        module = importlib.import_module(PREBUILT_MODULE)
    except Exception:  # noqa: BLE001  (ImportError, OSError for a library/ABI mismatch, ...)
        return None
    if all(hasattr(module, s) for s in REQUIRED_SYMBOLS):
        return module
    return None  # stale build from older sources: fall back to the JIT build


def _arch_list_for_build() -> str:
    """The TORCH_CUDA_ARCH_LIST the build will use (part of the cache key)."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    import torch  # noqa: PLC0415

    if torch.version.cuda is not None and torch.cuda.is_available():
        caps = sorted(
            {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        )
        return ";".join(f"{a}.{b}" for a, b in caps)  # what torch targets when the list is unset
    return DEFAULT_ARCH_LIST


def _source_hash(arch_list: str) -> str:
    import torch  # noqa: PLC0415

    h = hashlib.sha256()
    for path in sorted(CSRC_SOURCES + CSRC_HEADERS):
        h.update(os.path.basename(path).encode())
        h.update(b"\0")
        h.update(Path(path).read_bytes())
        h.update(b"\0")
    h.update(f"torch={torch.__version__};cuda={torch.version.cuda};arch={arch_list};".encode())
    h.update(" ".join(EXTRA_CUDA_CFLAGS).encode())
    return h.hexdigest()[:16]


def _wheel_cuda_include_dirs() -> list[str]:
    """CUDA headers shipped in pip wheels (torch's cu13 wheels put cublas/cusparse/... headers in
    <site-packages>/nvidia/cu13/include); a bare toolkit may lack headers that torch's own headers
    include."""
    import torch  # noqa: PLC0415

    site_dirs = {Path(torch.__file__).resolve().parent.parent}
    try:
        import sysconfig  # noqa: PLC0415

        site_dirs.add(Path(sysconfig.get_paths()["purelib"]))
    except Exception:  # noqa: BLE001
        pass
    major = (torch.version.cuda or "").split(".")[0]
    dirs = []
    for site in sorted(site_dirs):
        for sub in (f"cu{major}", "cu13"):
            inc = site / "nvidia" / sub / "include"
            if inc.is_dir() and str(inc) not in dirs:
                dirs.append(str(inc))
    return dirs


def _jit_build(*, name, sources, headers, cuda_home, ninja, verbose, build_dir=None):
    import torch  # noqa: PLC0415
    import torch.utils.cpp_extension as cpp_extension  # noqa: PLC0415

    arch_list = _arch_list_for_build()
    if build_dir is None:
        build_dir = build_directory()
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)

    # Toolkit: cpp_extension computes CUDA_HOME when it is first imported (guessing /usr/local when
    # nvcc on PATH is a wrapper script); point it at the toolkit we found.
    if not _is_toolkit(getattr(cpp_extension, "CUDA_HOME", None)):
        cpp_extension.CUDA_HOME = cuda_home
    os.environ.setdefault("CUDA_HOME", cuda_home)
    ninja_dir = os.path.dirname(ninja)
    path_entries = os.environ.get("PATH", "").split(os.pathsep)
    if ninja_dir not in path_entries:
        os.environ["PATH"] = os.pathsep.join([ninja_dir, *path_entries])

    args = extension_compile_args()

    # With a GPU visible and no list given, torch targets the visible GPUs itself.
    set_arch = "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available()
    if set_arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        return cpp_extension.load(
            name=name,
            sources=list(sources),
            extra_cflags=args["cxx"],
            extra_cuda_cflags=args["nvcc"],
            extra_include_paths=sorted({os.path.dirname(p) for p in list(sources) + list(headers)}),
            build_directory=str(build_dir),
            verbose=bool(verbose),
            with_cuda=True,
        )
    finally:
        if set_arch:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
