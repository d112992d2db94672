"""The C++/CUDA extension ``fastcore._C``, compiled just in time on first use.

The build is cached per (torch, python, CPU flags, CUDA) and serialised with an
exclusive file lock, so several processes starting at once build it once.
If no compiler is found the ``cpu``/``cuda`` backends report why, and
everything else keeps working. If only the CUDA part fails to build, the extension is built
for CPU alone, the ``cuda`` backend reports the compiler's error, and the failure is
remembered in the cache, so later processes do not try again.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import platform
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch

from fastcore.files import write_text_atomic

_module = None
_error: str | None = None
_cuda_error: str | None = None  # why the CUDA build failed, when the extension fell back to CPU alone
_FAILED = "fastcore.failed"  # in a CUDA build's directory: what it was built from, and its error

# -fno-math-errno lets loops with sqrt vectorise.
CXX_FLAGS = ["-O3", "-fopenmp", "-march=native", "-ffp-contract=fast", "-fno-math-errno"]
# No --use_fast_math: it flushes fp32 subnormals (pack's x * 1.0 would no longer be exact) and makes
# AdamW's sqrt and division approximate; the kernels are memory-bound, so it bought nothing.
CUDA_FLAGS = ["-O3"]


def source_dir() -> Path | None:
    """Where csrc/ lives: beside the package in a checkout, inside it once installed."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "bindings.cpp").exists():
            return candidate
    return None


def cache_dir() -> Path:
    root = os.environ.get("FASTCORE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fastcore")
    return Path(root)


def _cuda_wanted() -> bool:
    return bool(torch.version.cuda) and torch.cuda.is_available() and cuda_home() is not None


def cuda_home() -> str | None:
    """The CUDA toolkit to build with: torch's CUDA_HOME when it has the CUDA headers, else where nvcc
    really lives, else /usr/local/cuda. torch guesses the folder above the first nvcc on PATH, which
    for a wrapper script or a link (/usr/local/bin/nvcc) has no headers, and the build then fails."""
    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc")
    for home in (cpp_extension.CUDA_HOME, nvcc and str(Path(nvcc).resolve().parent.parent), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_runtime.h").exists():
            return home
    return None


def _sources(with_cuda: bool) -> list[Path]:
    src = source_dir()
    files = [*sorted(src.glob("*.cpp")), *sorted((src / "cpu").glob("*.cpp"))]  # bindings, then kernels
    if with_cuda:
        files += sorted((src / "cuda").glob("*.cu"))
    return files


@functools.lru_cache(maxsize=1)
def _cpu_flags_digest() -> str:
    # -march=native code must never be reused on a CPU with fewer instructions.
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((l for l in text.splitlines() if l.startswith("flags")), "")
    except OSError:
        flags = platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _compiler() -> str | None:
    # The one torch's cpp_extension will run: $CXX, else c++ (it tries no other).
    return shutil.which(os.environ.get("CXX", "c++"))


def _ensure_ninja_on_path() -> bool:
    # The ninja wheel's binary is not on PATH when the venv is not activated.
    try:
        import ninja

        path = os.environ.get("PATH", "")
        if ninja.BIN_DIR not in path.split(os.pathsep):
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    except ImportError:
        pass
    return shutil.which("ninja") is not None


def why_unavailable() -> str | None:
    """None when the extension is loaded or can be built, else why not (no build is started)."""
    if _module is not None:
        return None
    if _error is not None:
        return _error
    if source_dir() is None:
        return "its C++ sources (csrc/) are missing from this installation"
    if _compiler() is None:
        return f"no C++ compiler found: {os.environ.get('CXX', 'c++')!r} is not on PATH (install g++, or set CXX)"
    if not _ensure_ninja_on_path():
        return "ninja is not installed (pip install ninja)"
    return None


def state() -> str:
    """One line for `fastcore info`."""
    failed = cuda_error()
    failed = f"; CUDA: {failed}" if failed else ""
    if _module is not None:
        return f"loaded ({'CPU+CUDA' if has_cuda() else 'CPU'}) from {_module.__file__}{failed}"
    reason = why_unavailable()
    if reason is not None:
        return f"unavailable: {reason}"
    if failed:
        return f"CPU alone{failed}"
    build = _build_dir(_cuda_wanted())
    if (build / "fastcore.stamp").exists():
        return f"built, cached in {build}"
    return f"not built yet; compiles on first use into {build}"


def has_cuda() -> bool:
    """Whether the extension has (or, once built here, will have) its CUDA kernels."""
    if _module is not None:
        return bool(getattr(_module, "WITH_CUDA", False))
    return _cuda_wanted() and cuda_error() is None


def cuda_error() -> str | None:
    """Why the CUDA part of the extension failed to build (here, or in an earlier process), if it did."""
    if _cuda_error is not None or _module is not None or not _cuda_wanted():
        return _cuda_error
    reason = _remembered_cuda_failure()
    return reason and _cuda_failure(reason)


def _cuda_failure(reason: str) -> str:
    return f"building its CUDA kernels failed: {reason} (delete {_build_dir(True)} to try again)"


def _remembered_cuda_failure() -> str | None:
    """The compiler's error from the last CUDA build with this toolkit and these sources, if it failed."""
    try:
        key, reason = (_build_dir(True) / _FAILED).read_text().split("\n", 1)
    except (OSError, ValueError):  # none: the usual case, without hashing the sources
        return None
    return reason if key == _failure_key() else None


def _failure_key() -> str:
    """What a CUDA build's compiler error depends on: the sources, the toolkit (its folder and
    version.json, so an upgrade in place counts) and the host compiler nvcc runs."""
    home = cuda_home()
    try:
        version = hashlib.sha1((Path(home) / "version.json").read_bytes()).hexdigest()[:8] if home else ""
    except OSError:
        version = ""
    host = [os.environ.get(k, "") for k in ("CUDAHOSTCXX", "NVCC_CCBIN", "NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS")]
    return " ".join([_digest(_sources(True)), str(home), version, str(_compiler()), *host])


def _is_compiler_error(reason: str) -> bool:
    # Worth remembering: the same sources and tools fail the same way. A killed nvcc or a full disk is not.
    return bool(re.search(r": (fatal )?error:|nvcc fatal|#error", reason))


def _build_dir(with_cuda: bool) -> Path:
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    tag = f"torch{torch.__version__}-{py}-{platform.machine()}-{_cpu_flags_digest()}"
    if with_cuda:  # built for this GPU's architecture (or TORCH_CUDA_ARCH_LIST's): another needs its own
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "sm{}{}".format(*torch.cuda.get_device_capability())
        return cache_dir() / "ext" / f"{tag}-cuda-{re.sub(r'[^A-Za-z0-9.+]+', '_', archs)}"
    return cache_dir() / "ext" / f"{tag}-cpu"


def _digest(sources: list[Path]) -> str:
    """What the build depends on: flags, the sources it compiles and every header."""
    h = hashlib.sha1(" ".join(CXX_FLAGS + CUDA_FLAGS).encode())
    for f in sorted(set(sources) | set(source_dir().rglob("*.h"))):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def load():
    """Build (once, cached) and import ``fastcore._C``; raise RuntimeError saying why when it cannot.

    When the CUDA build fails, the extension is built for CPU alone, with a warning, and the
    failure is written into the CUDA build's directory: delete it to try again."""
    global _module, _error, _cuda_error
    if _module is not None:
        return _module
    reason = why_unavailable()
    if reason is not None:
        raise RuntimeError(f"the fastcore C++ extension is unavailable: {reason}")
    module = None
    try:
        if _cuda_wanted():
            try:
                module = _build_and_import(True)
            except _BuildFailed as exc:
                _cuda_error = _cuda_failure(str(exc))
        if module is None:
            module = _build_and_import(False)
            if _cuda_error is not None:
                warnings.warn(f"the fastcore C++ extension: {_cuda_error}; it is built for CPU alone, and the "
                              "'cuda' backend is unavailable", RuntimeWarning, stacklevel=2)
    except _BuildFailed as exc:
        _error = f"building it failed: {exc}"
        raise RuntimeError(f"the fastcore C++ extension is unavailable: {_error}") from exc.__cause__
    except _CacheUnwritable as exc:
        _error = f"{exc}; set FASTCORE_CACHE_DIR to a writable directory"
        raise RuntimeError(f"the fastcore C++ extension is unavailable: {_error}") from None
    sys.modules["fastcore._C"] = module
    _module = module
    return module


class _BuildFailed(Exception):
    """The compiler's error, shortened."""


class _CacheUnwritable(Exception):
    """A file in the way, a read-only or unwritable cache."""


def _build_and_import(with_cuda: bool):
    """The extension, with or without its CUDA kernels: from the cache when its stamp matches the
    sources, else compiled, under an exclusive lock on its build directory. A CUDA build that failed
    with this toolkit and these sources is not tried again (other ranks wait on the lock meanwhile)."""
    sources = _sources(with_cuda)
    build = _build_dir(with_cuda)
    stamp = build / "fastcore.stamp"
    digest = _digest(sources)
    try:
        build.mkdir(parents=True, exist_ok=True)
        lock = open(build / "fastcore.lock", "w")
    except OSError as exc:
        raise _CacheUnwritable(f"its cache directory {build} cannot be written ({exc.strerror})") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the OS even if this process dies, and on close
        remembered = _remembered_cuda_failure() if with_cuda else None
        if remembered is not None:
            raise _BuildFailed(remembered)
        try:
            # torch's own baton file outlives a killed build and would block forever; we hold the lock.
            (build / "lock").unlink(missing_ok=True)
            fresh = not (stamp.exists() and stamp.read_text() == digest)
            while True:
                if fresh:
                    # Objects of other sources must not survive: ninja compares times, not contents.
                    _clean(build)
                    print(f"fastcore: compiling the C++ extension (once; cached in {build}) ...", file=sys.stderr,
                          flush=True)
                try:
                    module = _compile(sources, build, with_cuda)
                    break
                except Exception:
                    if fresh:
                        raise
                    fresh = True  # a cached build that does not load (a truncated .so): built again, once
            if fresh:
                stamp.write_text(digest)
            (build / _FAILED).unlink(missing_ok=True)  # one from another toolkit or other sources
        except Exception as exc:  # compiler errors: keep the reason, let other backends run
            reason = _build_error(exc)
            if with_cuda and _is_compiler_error(reason):
                with contextlib.suppress(OSError):
                    write_text_atomic(build / _FAILED, f"{_failure_key()}\n{reason}")
            raise _BuildFailed(reason) from exc
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return module


def _compile(sources: list[Path], build: Path, with_cuda: bool):
    from torch.utils import cpp_extension

    cflags = CXX_FLAGS + (["-DFASTCORE_WITH_CUDA"] if with_cuda else [])
    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home()  # what cpp_extension builds with: it reads this global
    return cpp_extension.load(
        # Two names: torch renames a second build of one name in a process (fastcore_C_v1), and a CPU
        # build after a failed CUDA one would then be compiled again by the next process.
        name="fastcore_C_cuda" if with_cuda else "fastcore_C", sources=[str(s) for s in sources],
        extra_cflags=cflags, extra_cuda_cflags=CUDA_FLAGS, extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(source_dir())],
        build_directory=str(build), with_cuda=with_cuda, verbose=False)


def _clean(build: Path) -> None:
    """Remove a build's outputs and ninja's records of them; keep the lock."""
    for path in build.iterdir():
        if path.name != "fastcore.lock" and (path.suffix in (".o", ".so") or path.name.startswith(".ninja")
                                             or path.name in ("build.ninja", "fastcore.stamp")):
            path.unlink(missing_ok=True)


def _build_error(exc: Exception) -> str:
    """The compiler's first error line, and the build's last line: ninja's alone says nothing."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    first = next((line for line in lines if re.search(r": (fatal )?error:", line)), lines[-1])[:300]
    return first if first == lines[-1] else f"{first} ... {lines[-1]}"


def try_load() -> bool:
    """Load the extension for ``auto``; on failure warn once and return False."""
    if _module is not None:
        return True
    if _error is not None:
        return False
    try:
        load()
        return True
    except RuntimeError as exc:
        warnings.warn(f"{exc}; falling back to other backends", RuntimeWarning, stacklevel=3)
        return False
