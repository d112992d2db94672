"""The ``fastcore`` command line: ``fastcore info``, ``fastcore build`` and ``fastcore bench``."""
from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as exc:  # not installed, or broken: say which
        return f"not importable ({type(exc).__name__})"


def _compiler_line() -> str:
    from fastcore import extension

    cxx = extension._compiler()
    if cxx is None:
        return "none found"
    try:
        first = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        first = "version unknown"
    return f"{cxx} ({first})"


def info() -> str:
    """The environment, for bug reports."""
    import torch

    import fastcore
    from fastcore import backends, extension

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    nvcc = shutil.which("nvcc") or "not found"
    lines = [
        f"fastcore      {fastcore.__version__}",
        f"python        {platform.python_version()} ({sys.executable})",
        f"platform      {platform.platform()}",
        f"torch         {torch.__version__} (threads: {torch.get_num_threads()})",
        f"triton        {_version('triton')}" + (" [TRITON_INTERPRET=1]" if backends.triton_interpreting() else ""),
        f"CUDA          {torch.version.cuda or 'none (CPU build of torch)'}; nvcc: {nvcc}",
        f"GPU           {gpu}",
        f"compiler      {_compiler_line()}",
        f"extension     {extension.state()}",
        "backends:",
    ]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op in backends.OPS:
        for device in devices:
            ok = backends.available_backends(op, device)
            lines.append(f"  {op:<12} {device:<5} auto -> {ok[0] if ok else 'none'}; available: {', '.join(ok)}")
            for name in backends.OPS[op]:
                reason = backends.why_unavailable(name, device, op=op)
                if reason:
                    lines.append(f"  {'':<12} {'':<5}   {name}: {reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from fastcore.bench import cli

        return cli.main(argv[1:], command_line)
    parser = argparse.ArgumentParser(prog="fastcore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print the environment, the extension state and the backends per op")
    sub.add_parser("build", help="compile the C++/CUDA extension now instead of on first use")
    sub.add_parser("bench", help="run benchmarks, compare with a baseline (fastcore bench -h)")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
        return 0
    if args.command == "build":
        from fastcore import extension

        try:
            extension.load()
        except RuntimeError as exc:
            print(f"fastcore build: {exc}", file=sys.stderr)
            return 1
        print(f"fastcore build: {extension.state()}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
