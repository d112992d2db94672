"""Rendering results: the live console table, Markdown tables for the README, PNG plots."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from fastcore.bench.harness import EAGER, MODES, fmt_bytes

HEADER = (f"{'op':<11}{'case':<36}{'provider':<18}{'median ms':>10}{'iqr':>8}{'rate':>14}"
          f"{'floor':>7}{'peak mem':>11}{'speedup':>9}")


def rate(row: dict) -> str:
    return f"{row['tflops']:.3g} TFLOP/s" if "tflops" in row else f"{row['gbps']:.1f} GB/s"


def console_line(row: dict) -> str:
    speedup = f"{row['speedup']:.2f}x" if "speedup" in row else ""
    floor = f"{row['floor_frac']:.0%}" if "floor_frac" in row else "-"
    return (f"{row['op']:<11}{row['case']:<36}{row['provider']:<18}{row['median_ms']:>10.3f}{row['iqr_ms']:>8.3f}"
            f"{rate(row):>14}{floor:>7}{fmt_bytes(row.get('peak_mem_bytes')):>11}{speedup:>9}")


def skipped_lines(skipped: list) -> list[str]:
    seen, lines = set(), []
    for s in skipped:
        key = (s["op"], s["provider"], s["reason"])
        if key not in seen:
            seen.add(key)
            where = f" ({s['case']})" if "case" in s else ""
            lines.append(f"skipped {s['op']} {s['provider']}{where}: {s['reason']}")
    return lines


def _by_op(rows: list) -> dict[str, list]:
    ops = defaultdict(list)
    for row in rows:
        ops[row["op"]].append(row)
    return ops


def _provider_names(rows: list) -> list[str]:
    return list(dict.fromkeys(r["provider"] for r in rows))


def markdown(data: dict) -> str:
    """One table per op: each provider's median time, then each fastcore provider's speedups."""
    m = data["machine"]
    out = [f"Device `{m['slug']}` ({m['device']}, {m['threads']} threads), torch {m['torch']}, "
           f"commit {m.get('commit') or '?'}, {m['date'][:10]}. Times are medians in ms; "
           f"speedup is the other provider's time over fastcore's, on the same inputs in the same run."]
    for op, rows in _by_op(data["results"]).items():
        provs = _provider_names(rows)
        ours = [p for p in provs if p.startswith("fastcore-")]
        others = [p for p in provs if not p.startswith("fastcore-")]
        cells = {(r["case"], r["provider"]): r for r in rows}
        cols = [f"{p} ms" for p in provs] + [f"{f} vs {o}" for f in ours for o in others]
        out += ["", f"**{op}**", "", "| case | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for case in dict.fromkeys(r["case"] for r in rows):
            line = [f"{cells[case, p]['median_ms']:.3f}" if (case, p) in cells else "–" for p in provs]
            for f in ours:
                for o in others:
                    mine, theirs = cells.get((case, f)), cells.get((case, o))
                    line.append(f"{theirs['median_ms'] / mine['median_ms']:.2f}×" if mine and theirs else "–")
            out.append(f"| {case} | " + " | ".join(line) + " |")
    return "\n".join(out)


def plot(data: dict, outdir: Path) -> list[Path]:
    """One PNG per op: throughput against size, one line per provider, a panel per dtype and mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'fastcore-engine[bench]'") from exc
    outdir.mkdir(parents=True, exist_ok=True)
    m = data["machine"]
    written = []
    for op, rows in _by_op(data["results"]).items():
        unit = "tflops" if "tflops" in rows[0] else "gbps"
        panels = defaultdict(list)
        for r in rows:
            panels[(r["mode"], r["dtype"], _tag(r))].append(r)
        keys = sorted(panels, key=lambda k: (k[1], k[2], MODES.index(k[0]) if k[0] in MODES else len(MODES)))
        ncols = min(3, len(keys))
        nrows = -(-len(keys) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            for provider in _provider_names(panels[key]):
                for label, pts in _series(provider, [r for r in panels[key] if r["provider"] == provider], unit):
                    style = "-o" if provider.startswith("fastcore-") else "--."
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
            ax.set_xscale("log", base=2)
            ax.set_title(" ".join(k for k in (key[1], key[2], key[0]) if k))
            ax.set_xlabel(data.get("size_names", {}).get(op, "size"))
            ax.set_ylabel("TFLOP/s" if unit == "tflops" else "GB/s")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.set_visible(False)
        axes.flat[0].legend(fontsize=8)
        fig.suptitle(f"{op} on {m['device']} ({m['date'][:10]}, torch {m['torch']}, higher is better)")
        fig.tight_layout()
        path = outdir / f"{op}.png"
        fig.savefig(path, dpi=72)
        plt.close(fig)
        written.append(path)
    return written


def _tag(row: dict) -> str:
    """The words a case label holds between its dtype and its mode (``causal``, a preset's name)."""
    return " ".join(row["case"].split()[2:-1])


def _series(provider: str, rows: list, unit: str) -> list[tuple[str, list]]:
    """One line per provider over size; where cases share a size (attention's head dims), one per
    innermost dimension, so that no line joins unrelated cases."""
    if len({r["size"] for r in rows}) == len(rows):
        return [(provider, sorted((r["size"], r[unit]) for r in rows))]
    def inner(r):  # the label's shape, "BxHxTxD"
        return int(r["case"].split()[0].split("x")[-1])
    dims = sorted({inner(r) for r in rows})
    return [(f"{provider} (…×{d})", sorted((r["size"], r[unit]) for r in rows if inner(r) == d)) for d in dims]


def speedup_summary(rows: list) -> list[str]:
    """One line per fastcore provider: the range of its speedups over its benchmark's baseline provider."""
    lines = []
    for op, op_rows in _by_op(rows).items():
        for provider in _provider_names(op_rows):
            mine = [r for r in op_rows if r["provider"] == provider and "speedup" in r]
            if mine:
                s = [r["speedup"] for r in mine]
                over = mine[0].get("speedup_over", EAGER)
                lines.append(f"{op} {provider}: {min(s):.2f}x to {max(s):.2f}x of {over} over {len(s)} cases")
    return lines
