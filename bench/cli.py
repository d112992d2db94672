"""``fastcore bench``: run the registered benchmarks, compare results with a baseline, render them.

    fastcore bench [OP ...] [--device cpu|cuda] [--quick] [--json PATH] [--markdown] [--plot DIR]
    fastcore bench compare BASELINE.json|DIR CURRENT.json [--margin PCT] [--write PATH]
    fastcore bench baseline RUN.json RUN.json [...] --out PATH
    fastcore bench show RESULTS.json [--markdown] [--plot DIR]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

SUBCOMMANDS = ("compare", "baseline", "show")


def spin_openmp_workers(argv: list[str]) -> None:
    """Re-run this command with OMP_WAIT_POLICY=ACTIVE unless it is already set.

    Sleeping OpenMP workers take milliseconds to wake on small VMs, which swamps CPU timings of
    every provider alike; the policy is read when torch loads OpenMP, so it needs a fresh process.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    sys.stdout.flush()
    # The exact invocation again (console script or -m, with its interpreter flags), so that the
    # same fastcore runs; `-m` from another directory could pick up a different one.
    again = sys.orig_argv or [sys.executable, "-m", "fastcore", "bench", *argv]  # empty when embedded
    os.execve(sys.executable, again, dict(os.environ, OMP_WAIT_POLICY="ACTIVE"))


def _write_json(data: dict, path: Path) -> None:
    from fastcore.files import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def _check_paths(p: argparse.ArgumentParser, files: dict, plot_dir: Path | None = None) -> None:
    """Output paths checked before any work, so that a long run never ends on a bad one."""
    for flag, path in files.items():
        if path is None:
            continue
        if path.is_dir():
            p.error(f"{flag}: {path} is a directory; expected a file path")
        _check_parent(p, flag, path.parent)
    if plot_dir is not None:
        if plot_dir.exists() and not plot_dir.is_dir():
            p.error(f"--plot: {plot_dir} exists and is not a directory")
        _check_parent(p, "--plot", plot_dir)
        try:
            importlib.import_module("matplotlib")
        except ImportError:
            p.error("--plot needs matplotlib: pip install 'fastcore-engine[bench]'")


def _check_parent(p: argparse.ArgumentParser, flag: str, path: Path) -> None:
    # The nearest existing ancestor must be a directory: mkdir cannot go through a file.
    for up in (path, *path.parents):
        if up.exists():
            if not up.is_dir():
                p.error(f"{flag}: {up} is a file, so {path} cannot be a directory")
            return


def _render(data: dict, markdown: bool, plot_dir: Path | None) -> None:
    from fastcore.bench import report

    if markdown:
        print(report.markdown(data))
    if plot_dir is not None:
        for path in report.plot(data, plot_dir):
            print(f"wrote {path}")


def run_main(argv: list[str], command_line: bool) -> int:
    import torch

    from fastcore.bench import harness, report

    ops = sorted(harness.registered())
    p = argparse.ArgumentParser(prog="fastcore bench", description="Run the registered benchmarks. "
                                "Subcommands: " + ", ".join(SUBCOMMANDS) + " (see fastcore bench SUBCOMMAND -h).")
    p.add_argument("ops", nargs="*", metavar="OP", help=f"ops to run (default: all of {', '.join(ops)})")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="the small set CI gates on")
    p.add_argument("--json", type=Path, help="results file (default: bench/results/<device-slug>/<ops>.json)")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables at the end")
    p.add_argument("--plot", type=Path, metavar="DIR", help="write one PNG per op here")
    p.add_argument("--repeats", type=int, default=25, help=f"CPU timing samples per case (>= {harness.MIN_REPEATS})")
    p.add_argument("--no-compile", action="store_true", help="skip the providers that compile (torch.compile, fastcore-compile)")
    args = p.parse_args(argv)
    try:
        harness.check_args(args.ops, args.device, args.repeats)
    except ValueError as exc:
        p.error(str(exc))
    _check_paths(p, {"--json": args.json}, args.plot)
    if args.device == "cpu" and command_line:
        spin_openmp_workers(argv)

    print(report.HEADER, flush=True)
    result = harness.run(args.ops, device=args.device, quick=args.quick, repeats=args.repeats,
                         no_compile=args.no_compile, on_row=lambda row: print(report.console_line(row), flush=True),
                         on_progress=lambda line: print(line, file=sys.stderr, flush=True))
    for line in report.skipped_lines(result.skipped) + report.speedup_summary(result.rows):
        print(line)
    data = result.to_json()
    name = "-".join(args.ops) or "all"
    path = args.json or Path("bench/results") / result.machine["slug"] / f"{name}{'-quick' if args.quick else ''}.json"
    _write_json(data, path)
    print(f"wrote {path}")
    _render(data, args.markdown, args.plot)
    if result.interrupted:
        print(f"interrupted: {path} holds the {len(result.rows)} rows measured before it", file=sys.stderr)
        return 1
    return 0


def compare_main(argv: list[str]) -> int:
    from fastcore.bench import compare

    p = argparse.ArgumentParser(prog="fastcore bench compare", description=compare.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("baseline", type=Path, help="a baseline file, or a directory holding <device-slug>.json files")
    p.add_argument("current", type=Path)
    p.add_argument("--margin", type=float, metavar="PCT",
                   help=f"noise margin for every case, overriding the baseline's (default: its own, else "
                        f"{compare.DEFAULT_MARGIN_PCT:.0f})")
    p.add_argument("--write", type=Path, metavar="PATH", help="also write the updated baseline here")
    args = p.parse_args(argv)
    _check_paths(p, {"--write": args.write})
    try:
        current = compare.load(args.current, "current")
        path, note = compare.baseline_path(args.baseline, current)
        if note:
            print(f"note: {note}")
        if args.baseline.is_dir() and not path.exists():
            print(f"fastcore bench compare: no baseline for machine class {current['machine']['slug']} in "
                  f"{args.baseline}; nothing to gate. To start one, run the quick set a few times and use "
                  f"`fastcore bench baseline RUN.json ... --out {path}`.")
            return 0
        baseline = compare.load(path, "baseline")
        entries = compare.compare(baseline, current, args.margin)
    except ValueError as exc:
        p.error(str(exc))
    if baseline["machine"].get("slug") != current["machine"].get("slug"):
        print(f"warning: baseline machine {baseline['machine'].get('slug')} != current "
              f"{current['machine'].get('slug')}; speedups may differ by machine, not by change")
    print(f"baseline {path} (commit {baseline['machine'].get('commit')}) vs current {args.current} "
          f"(commit {current['machine'].get('commit')})")
    print(compare.table(entries))
    bad = compare.failed(entries)
    better = [e for e in entries if e.status == "improved"]
    updated = compare.updated_baseline(baseline, current)
    print(f"\n{len(bad)} regressed, missing or measured over another reference, {len(better)} improved, "
          f"{sum(e.status == 'new' for e in entries)} new, of {len(entries)} cases.")
    print(f"updated baseline: this run's speedups with the baseline's margins. Committing it as {path} "
          "accepts them; a baseline from several runs (`fastcore bench baseline`) is steadier:")
    print(json.dumps(updated, indent=1))
    if args.write:
        _write_json(updated, args.write)
        print(f"wrote {args.write}")
    if bad:
        print("PERFORMANCE GATE FAILED: " + "; ".join(f"{e.key[0]} {e.key[2]} {e.key[1]}: {e.status}" for e in bad))
        return 1
    return 0


def baseline_main(argv: list[str]) -> int:
    from fastcore.bench import compare

    p = argparse.ArgumentParser(prog="fastcore bench baseline", description=compare.from_runs.__doc__)
    p.add_argument("runs", type=Path, nargs="+", help="results files of the same tree on one machine class")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    _check_paths(p, {"--out": args.out})
    try:
        data = compare.from_runs([compare.load(r, "runs") for r in args.runs])
    except ValueError as exc:
        p.error(str(exc))
    for n in data["left_out"]:
        print(f"left out, too noisy to gate on (margin would pass {compare.MAX_MARGIN_PCT:.0f}%): "
              f"{n['op']} {n['case']} {n['provider']}: drop {n['drop_pct']}%")
    _write_json(data, args.out)
    for row in data["results"]:
        print(f"{row['op']:<11}{row['case']:<36}{row['provider']:<18}{row['speedup']:>7.2f}x  "
              f"drop {row['drop_pct']:>5.1f}%  margin {row['margin_pct']:.0f}%")
    print(f"wrote {args.out}")
    return 0


def show_main(argv: list[str]) -> int:
    from fastcore.bench import compare, report

    p = argparse.ArgumentParser(prog="fastcore bench show", description="Render a results file.")
    p.add_argument("results", type=Path)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--plot", type=Path, metavar="DIR")
    args = p.parse_args(argv)
    _check_paths(p, {}, args.plot)
    try:
        data = compare.load(args.results, "results")
    except ValueError as exc:
        p.error(str(exc))
    if any("median_ms" not in row for row in data["results"]):
        p.error(f"results: {args.results} holds no timings (a baseline?); nothing to render")
    if not (args.markdown or args.plot):
        print(report.HEADER)
        for row in data["results"]:
            print(report.console_line(row))
    _render(data, args.markdown, args.plot)
    return 0


def main(argv: list[str], command_line: bool = False) -> int:
    """``command_line`` is true for a real command line, which may re-exec itself (see spin_openmp_workers)."""
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    if argv and argv[0] == "baseline":
        return baseline_main(argv[1:])
    if argv and argv[0] == "show":
        return show_main(argv[1:])
    return run_main(argv, command_line)
