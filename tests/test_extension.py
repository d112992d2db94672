"""The just-in-time C++/CUDA extension: one build under concurrency, a clean refusal without a compiler,
and a type-check of the CUDA binding path on machines without a CUDA build of torch."""
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

import fastcore
from fastcore import extension

HAS_CPP = "cpu" in fastcore.available_backends("layer_norm", "cpu")


def _python(code: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.skipif(not HAS_CPP, reason="no C++ toolchain here")
def test_concurrent_first_use_builds_once(tmp_path):
    env = dict(os.environ, FASTCORE_CACHE_DIR=str(tmp_path))
    code = """
        import torch, fastcore
        y = fastcore.layer_norm(torch.randn(3, 5), backend="cpu")
        print("ok", tuple(y.shape))
    """
    procs = [_python(code, env) for _ in range(3)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert out.strip() == "ok (3, 5)"
    messages = sum(err.count("fastcore: compiling the C++ extension") for _, err in outputs)
    assert messages == 1, [err for _, err in outputs]


def test_without_a_compiler_cpp_backends_are_unavailable_and_the_rest_works(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), PATH=str(bin_dir), FASTCORE_CACHE_DIR=str(tmp_path))
    code = """
        import torch, fastcore
        from fastcore import backends
        assert "cpu" not in fastcore.available_backends("layer_norm", "cpu")
        print(backends.why_unavailable("cpu", "cpu"))
        try:
            fastcore.layer_norm(torch.randn(2, 4), backend="cpu")
        except RuntimeError as exc:
            print("refused:", exc)
        x = torch.randn(3, 16, dtype=torch.float64)
        y = fastcore.layer_norm(x)
        print("auto ok", torch.allclose(y, torch.nn.functional.layer_norm(x, (16,))))
    """
    proc = _python(code, env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "no C++ compiler found" in out
    assert "refused: layer_norm: backend 'cpu' cannot run here: no C++ compiler found" in out
    assert "auto ok True" in out


def _cuda_include():
    home = extension.cuda_home()
    return Path(home) / "include" if home else None


@pytest.mark.skipif(not HAS_CPP or _cuda_include() is None, reason="needs a C++ compiler and the CUDA headers")
def test_cuda_binding_type_checks(tmp_path):
    """Compile the binding files with their CUDA branch enabled, against torch's headers, without linking.

    CPU wheels of torch ship c10/cuda headers but not the generated cuda_cmake_macros.h; a stub stands in.
    """
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    torch_inc = Path(torch.__file__).parent / "include"
    src = extension.source_dir()
    cmd = [extension._compiler(), "-std=c++20", "-fsyntax-only", "-Wall", "-Werror=return-type",
           "-DFASTCORE_WITH_CUDA", "-DTORCH_EXTENSION_NAME=fastcore_C",
           f"-I{tmp_path}", f"-I{src}", f"-I{torch_inc}", f"-I{torch_inc / 'torch/csrc/api/include'}",
           f"-I{_cuda_include()}", f"-I{sysconfig.get_paths()['include']}"]
    for binding in sorted(src.glob("*.cpp")):  # bindings.cpp and one file per op's binding
        proc = subprocess.run(cmd + [str(binding)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{binding.name}: {proc.stderr[-4000:]}"


def test_cuda_backend_is_available_before_the_first_build(monkeypatch, tmp_path):
    """On a GPU machine the cuda backend must be listed before anything has loaded the extension."""
    if extension.why_unavailable() is not None:
        pytest.skip("no C++ toolchain here")
    monkeypatch.setattr(extension, "_module", None)
    monkeypatch.setattr(extension, "_cuda_wanted", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(extension, "_cuda_error", None)
    monkeypatch.setenv("FASTCORE_CACHE_DIR", str(tmp_path))  # no remembered failure of a CUDA build
    assert fastcore.backends.why_unavailable("cuda", "cuda") is None
    monkeypatch.setattr(extension, "_cuda_wanted", lambda: False)
    assert "without CUDA" in fastcore.backends.why_unavailable("cuda", "cuda")


def test_cuda_home_is_where_the_headers_are(tmp_path, monkeypatch):
    """torch guesses CUDA_HOME as the folder above the first nvcc on PATH; for a link in /usr/local/bin
    that folder has no headers, and the build failed. The toolkit the link points to is taken."""
    from torch.utils import cpp_extension

    toolkit, bin_dir = tmp_path / "cuda-13.0", tmp_path / "local" / "bin"
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    (toolkit / "bin").mkdir()
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    bin_dir.mkdir(parents=True)
    (bin_dir / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "local"))  # torch's guess: no headers
    assert extension.cuda_home() == str(toolkit)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(toolkit))
    assert extension.cuda_home() == str(toolkit)


def test_a_cuda_build_is_cached_per_gpu_architecture(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCORE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    h100 = extension._build_dir(True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert h100.name.endswith("-cuda-sm90") and extension._build_dir(True).name.endswith("-cuda-sm80")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    assert extension._build_dir(True).name.endswith("-cuda-8.0_9.0+PTX")
    assert extension._build_dir(False).name.endswith("-cpu")


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """load() with its compile step replaced: a record of the calls, and control over what they do."""
    monkeypatch.setenv("FASTCORE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(extension, "_module", None)
    monkeypatch.setattr(extension, "_error", None)
    monkeypatch.setattr(extension, "why_unavailable", lambda: None)
    monkeypatch.setattr(extension, "_cuda_wanted", lambda: False)
    calls, failures = [], []

    def compile_(sources, build, with_cuda):
        calls.append(sorted(p.name for p in build.iterdir()))  # what the build found in its directory
        if failures:
            raise failures.pop(0)
        (build / "fastcore_C.so").write_text("built")
        (build / "norm.o").write_text("object")
        return type("Module", (), {"__file__": str(build / "fastcore_C.so"), "WITH_CUDA": with_cuda})()
    monkeypatch.setattr(extension, "_compile", compile_)
    monkeypatch.setitem(sys.modules, "fastcore._C", None)
    return calls, failures


def test_changed_sources_rebuild_from_scratch(fake_build, monkeypatch):
    calls, _ = fake_build
    monkeypatch.setattr(extension, "_digest", lambda sources: "A")
    extension.load()
    extension._module = None
    extension.load()                                         # same sources: the cached build
    monkeypatch.setattr(extension, "_digest", lambda sources: "B")
    extension._module = None
    extension.load()                                         # other sources, whatever their times
    assert calls == [["fastcore.lock"], ["fastcore.lock", "fastcore.stamp", "fastcore_C.so", "norm.o"],
                     ["fastcore.lock"]]


def test_a_cached_build_that_does_not_load_is_built_again_once(fake_build, monkeypatch):
    calls, failures = fake_build
    monkeypatch.setattr(extension, "_digest", lambda sources: "A")
    extension.load()
    extension._module = None
    failures.append(ImportError("fastcore_C.so: file too short"))
    extension.load()
    assert len(calls) == 3 and calls[2] == ["fastcore.lock"]
    extension._module = None
    failures += [ImportError("fastcore_C.so: file too short"), RuntimeError("Error building extension 'fastcore_C': [1/2] c++ -c norm.cpp\n"
                                                                  "norm.cpp:3:1: error: 'foo' does not name a type\n"
                                                                  "ninja: build stopped: subcommand failed.")]
    with pytest.raises(RuntimeError, match=r"building it failed: norm\.cpp:3:1: error: 'foo' does not name a type "
                                           r"\.\.\. ninja: build stopped"):
        extension.load()


def test_an_unwritable_cache_is_a_reason_not_a_traceback(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("FASTCORE_CACHE_DIR", str(tmp_path / "file"))
    monkeypatch.setattr(extension, "_module", None)
    monkeypatch.setattr(extension, "_error", None)
    with pytest.raises(RuntimeError, match=r"cache directory .* cannot be written \(Not a directory\); set "
                                           r"FASTCORE_CACHE_DIR"):
        extension.load()
    monkeypatch.setattr(extension, "_error", None)  # (try_load warns once, on the first failure)
    with pytest.warns(RuntimeWarning, match="falling back"):
        assert not extension.try_load()


def test_the_compiler_is_the_one_torch_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    assert extension._compiler() is None  # torch would not fall back to g++ either
    monkeypatch.delenv("CXX")
    assert extension._compiler() == shutil.which("c++")


NVCC_ERROR = RuntimeError("Error building extension 'fastcore_C': [1/9] nvcc -c norm.cu\n"
                          "norm.cu:1:10: fatal error: cuda_bf16.h: No such file or directory\n"
                          "ninja: build stopped: subcommand failed.")


@pytest.fixture
def cuda_build(fake_build, monkeypatch):
    """fake_build on a GPU machine: which builds load() compiles, with CUDA or without."""
    calls, failures = fake_build
    monkeypatch.setattr(extension, "_cuda_wanted", lambda: True)
    monkeypatch.setattr(extension, "_cuda_error", None)
    monkeypatch.setattr(extension, "cuda_home", lambda: "/opt/cuda-a")
    monkeypatch.setattr(extension, "_digest", lambda sources: "A")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    compiled, inner = [], extension._compile

    def compile_(sources, build, with_cuda):
        compiled.append(with_cuda)
        return inner(sources, build, with_cuda)
    monkeypatch.setattr(extension, "_compile", compile_)
    return compiled, failures


def _new_process():
    extension._module = extension._cuda_error = None


def test_a_failed_cuda_build_leaves_the_extension_for_cpu_alone(cuda_build):
    compiled, failures = cuda_build
    failures.append(NVCC_ERROR)
    with pytest.warns(RuntimeWarning, match=r"building its CUDA kernels failed: norm\.cu:1:10: fatal error: "
                                            r"cuda_bf16\.h.* it is built for CPU alone"):
        module = extension.load()
    assert compiled == [True, False] and module.__file__.endswith("-cpu/fastcore_C.so")
    assert not extension.has_cuda()
    assert "cuda_bf16.h: No such file" in extension.state()
    # The cuda backend names the compiler's error; the cpu backend runs.
    assert "cuda_bf16.h: No such file" in fastcore.backends.why_unavailable("cuda", "cuda")
    assert fastcore.backends.why_unavailable("cpu", "cpu") is None
    with pytest.raises(RuntimeError, match=r"pack: backend 'cuda' cannot run here: building its CUDA kernels failed"):
        fastcore.backends.resolve_backend("pack", "cuda", torch.device("cuda"), torch.float32)


def test_fastcore_build_fails_when_the_cuda_kernels_do_not_build(cuda_build, capsys):
    from fastcore import cli

    cuda_build[1].append(NVCC_ERROR)
    with pytest.warns(RuntimeWarning):
        assert cli.main(["build"]) == 1
    assert "loaded (CPU)" in capsys.readouterr().out  # the CPU build is there for the cpu backends
    _new_process()
    with pytest.warns(RuntimeWarning):
        assert cli.main(["build"]) == 1  # and stays a failure while the toolkit is the same


def test_a_failed_cuda_build_is_not_tried_again_until_the_toolkit_or_sources_change(cuda_build, monkeypatch):
    compiled, failures = cuda_build
    failures.append(NVCC_ERROR)
    with pytest.warns(RuntimeWarning):
        extension.load()
    _new_process()
    # Known before anything loads: the cuda backend is not offered, and the next process warns again.
    assert not extension.has_cuda() and "cuda_bf16.h" in fastcore.backends.why_unavailable("cuda", "cuda")
    with pytest.warns(RuntimeWarning, match=r"cuda_bf16\.h.*delete .*-cuda-sm90 to try again"):
        extension.load()
    assert compiled == [True, False, False]  # the CPU build, from its cache
    _new_process()
    monkeypatch.setattr(extension, "cuda_home", lambda: "/opt/cuda-b")  # another toolkit: tried, and it builds
    assert extension.has_cuda()
    extension.load()
    assert compiled == [True, False, False, True] and extension.has_cuda()
    _new_process()
    monkeypatch.setattr(extension, "cuda_home", lambda: "/opt/cuda-a")  # the failure was forgotten on success
    extension.load()
    assert compiled == [True, False, False, True, True]


def test_a_cuda_build_that_did_not_reach_the_compiler_is_tried_again(cuda_build):
    compiled, failures = cuda_build
    failures.append(RuntimeError("Error building extension 'fastcore_C_cuda': [3/9] nvcc -c adamw.cu\n"
                                 "Killed\nninja: build stopped: subcommand failed."))  # out of memory, say
    with pytest.warns(RuntimeWarning, match="build stopped"):
        extension.load()
    _new_process()
    assert extension.has_cuda()
    extension.load()
    assert compiled == [True, False, True]


def test_the_cpu_and_cuda_builds_have_their_own_names(monkeypatch, tmp_path):
    """torch renames a second build of one name in a process (name_v1): a CPU build after a failed CUDA
    build would get another name, and the next process would compile it all again."""
    from torch.utils import cpp_extension

    names = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: names.append((kw["name"], kw["with_cuda"])))
    monkeypatch.setattr(extension, "cuda_home", lambda: str(tmp_path))
    for with_cuda in (True, False):
        extension._compile([], tmp_path, with_cuda)
    assert names == [("fastcore_C_cuda", True), ("fastcore_C", False)]
