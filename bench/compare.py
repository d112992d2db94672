"""The performance-regression gate: compare fastcore's speedups over PyTorch eager with a baseline.

Absolute times on shared machines drift; the ratio of two providers timed round-robin in the
same run drifts much less. A case regresses when its speedup falls below the baseline's by more
than its noise margin: ``current < baseline * (1 - margin)``.
"""
from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from fastcore.bench.harness import RESULTS_FORMAT

# For cases whose baseline row carries no margin_pct: the margin `baseline` gives the largest
# drop below the median of any quick-set speedup (25% over 19 runs on the 2-core CI VM, 2026-11-22;
# see bench/baselines/NOISE.md): twice that, rounded up to 5.
DEFAULT_MARGIN_PCT = 50.0
# `fastcore bench baseline` sets each case's margin to SPREAD_FACTOR times the largest drop of its
# speedup below the median over several runs, and never below MIN_MARGIN_PCT.
SPREAD_FACTOR = 2.0
MIN_MARGIN_PCT = 10.0
# A case whose margin would exceed this is too noisy to gate on; `baseline` leaves it out.
MAX_MARGIN_PCT = 90.0


def key(row: dict) -> tuple:
    """A case's identity; its label holds the shape, the dtype and the mode."""
    return row["op"], row["provider"], row["case"]


def gated(data: dict) -> dict:
    """The rows the gate checks: fastcore's, which carry a speedup."""
    return {key(r): r for r in data["results"] if "speedup" in r}


def load(path: Path, what: str) -> dict:
    """A results or baseline file, checked; ValueError naming ``what`` and the problem otherwise."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{what}: no such file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: {path} is not JSON ({exc})") from None
    except OSError as exc:  # a directory, no permission
        raise ValueError(f"{what}: cannot read {path} ({exc.strerror})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list) or "machine" not in data:
        raise ValueError(f"{what}: {path} is not a fastcore bench results file "
                         "(expected {\"machine\": ..., \"results\": [...]})")
    if data.get("format") != RESULTS_FORMAT:
        raise ValueError(f"{what}: {path} has format {data.get('format')!r}; this fastcore reads format "
                         f"{RESULTS_FORMAT} (run the benchmark again)")
    if not isinstance(data["machine"], dict) or "slug" not in data["machine"]:
        raise ValueError(f"{what}: {path}: machine lacks its slug")
    seen = set()
    for i, row in enumerate(data["results"]):
        missing = {"op", "provider", "case", "mode"} - set(row)
        if missing:
            raise ValueError(f"{what}: {path}: results[{i}] lacks {sorted(missing)}")
        if key(row) in seen:
            raise ValueError(f"{what}: {path}: results[{i}] repeats the case {key(row)}")
        seen.add(key(row))
        if "speedup" in row and not (isinstance(row["speedup"], (int, float)) and row["speedup"] > 0):
            raise ValueError(f"{what}: {path}: results[{i}] has speedup {row['speedup']!r}; expected a positive number")
        if "margin_pct" in row and not (isinstance(row["margin_pct"], (int, float)) and 0 <= row["margin_pct"] < 100):
            raise ValueError(f"{what}: {path}: results[{i}] has margin_pct {row['margin_pct']!r}; "
                             "expected a percentage in [0, 100)")
    for i, row in enumerate(data.get("left_out", [])):
        if not {"op", "provider", "case"} <= set(row):
            raise ValueError(f"{what}: {path}: left_out[{i}] lacks op, provider or case")
    return data


def baseline_path(path: Path, current: dict) -> tuple[Path, str | None]:
    """A baseline file, or the one for the current run's machine class in a directory of them,
    with a note when it had to settle for the nearest class: a CPU of the same vendor and thread
    count but another model string (another vendor's vector units shift the speedups)."""
    path = Path(path)
    if not path.is_dir():
        return path, None
    slug = current["machine"]["slug"]
    exact = path / f"{slug}.json"
    cls = re.fullmatch(r"cpu-([a-z0-9]+)-.*-(\d+core)", slug)
    if exact.exists() or not cls:
        return exact, None
    near = sorted(path.glob(f"cpu-{cls.group(1)}-*-{cls.group(2)}.json"))
    if len(near) != 1:
        return exact, None
    return near[0], f"no baseline for {slug}; using the nearest machine class, {near[0].stem}"


@dataclass
class Entry:
    key: tuple
    baseline: float | None
    current: float | None
    margin_pct: float
    status: str  # ok | regressed | improved | missing | new | reference changed

    @property
    def change_pct(self) -> float | None:
        if self.baseline is None or self.current is None:
            return None
        return (self.current / self.baseline - 1) * 100


def compare(baseline: dict, current: dict, margin_pct: float | None = None) -> list[Entry]:
    """Every gated case of either file. ``margin_pct`` overrides the margins written in the baseline."""
    if margin_pct is not None and not (0 <= margin_pct < 100):
        raise ValueError(f"margin: expected a percentage in [0, 100), got {margin_pct}")
    base, cur = gated(baseline), gated(current)
    if not base:
        raise ValueError("baseline: it has no rows with a speedup, so there is nothing to gate on")
    left_out = {key(r) for r in baseline.get("left_out", [])}
    entries = []
    for k, row in base.items():
        margin = margin_pct if margin_pct is not None else row.get("margin_pct", DEFAULT_MARGIN_PCT)
        now = cur.get(k, {}).get("speedup")
        over = (row.get("speedup_over"), cur.get(k, {}).get("speedup_over"))
        if now is None:
            status = "missing"
        elif None not in over and over[0] != over[1]:
            status = "reference changed"  # a ratio over another provider: not comparable
        elif now < row["speedup"] * (1 - margin / 100):
            status = "regressed"
        elif now > row["speedup"] * (1 + margin / 100):
            status = "improved"
        else:
            status = "ok"
        entries.append(Entry(k, row["speedup"], now, margin, status))
    for k, row in cur.items():
        if k not in base and k not in left_out:
            entries.append(Entry(k, None, row["speedup"], DEFAULT_MARGIN_PCT if margin_pct is None else margin_pct, "new"))
    return entries


def failed(entries: list[Entry]) -> list[Entry]:
    return [e for e in entries if e.status in ("regressed", "missing", "reference changed")]


def table(entries: list[Entry]) -> str:
    lines = [f"{'op':<11}{'case':<36}{'provider':<18}{'baseline':>9}{'current':>9}{'change':>9}{'margin':>8}  status"]
    for e in entries:
        fmt = lambda s: "-" if s is None else f"{s:.2f}x"  # noqa: E731
        change = "-" if e.change_pct is None else f"{e.change_pct:+.1f}%"
        lines.append(f"{e.key[0]:<11}{e.key[2]:<36}{e.key[1]:<18}{fmt(e.baseline):>9}{fmt(e.current):>9}"
                     f"{change:>9}{e.margin_pct:>7.0f}%  {e.status.upper() if e.status != 'ok' else 'ok'}")
    return "\n".join(lines)


def _slim(row: dict, margin_pct: float) -> dict:
    keep = ("op", "provider", "case", "mode", "speedup", "speedup_over")
    return {**{k: row[k] for k in keep if k in row}, "margin_pct": margin_pct}


def updated_baseline(baseline: dict, current: dict) -> dict:
    """The current run's speedups with the baseline's margins: the file to commit to accept them."""
    base = gated(baseline)
    left_out = baseline.get("left_out", [])
    skip = {key(r) for r in left_out}
    rows = [_slim(r, base.get(k, {}).get("margin_pct", DEFAULT_MARGIN_PCT))
            for k, r in gated(current).items() if k not in skip]
    return {"format": RESULTS_FORMAT, "machine": current["machine"], "results": rows, "left_out": left_out}


def from_runs(runs: list[dict]) -> dict:
    """A baseline from several runs of an unchanged tree: median speedups, margins from how far they fell.
    Cases too noisy to gate on are listed under ``left_out``, so that the gate does not take them
    for new ones."""
    if len(runs) < 2:
        raise ValueError("runs: need at least two results files to measure the run-to-run spread")
    slugs = {r["machine"].get("slug") for r in runs}
    if len(slugs) != 1:
        raise ValueError(f"runs: they come from different machine classes {sorted(map(str, slugs))}")
    per_run = [gated(r) for r in runs]
    common = set.intersection(*(set(g) for g in per_run))
    if not common:
        raise ValueError("runs: no case with a speedup appears in every run")
    rows, noisy = [], []
    for row in runs[-1]["results"]:
        k = key(row)
        if k not in common:
            continue
        speedups = [g[k]["speedup"] for g in per_run]
        med = statistics.median(speedups)
        # The gate fails only on the low side, so the noise that matters is how far runs fall below.
        drop = max(0.0, 1 - min(speedups) / med) * 100
        margin = max(MIN_MARGIN_PCT, 5 * math.ceil(round(SPREAD_FACTOR * drop, 6) / 5))  # round: 2 x 15.0000001 is 30
        if margin > MAX_MARGIN_PCT:
            noisy.append({"op": k[0], "provider": k[1], "case": k[2], "drop_pct": round(drop, 1)})
        else:
            rows.append({**_slim(row, margin), "speedup": med, "drop_pct": round(drop, 1), "runs": len(runs)})
    if not rows:
        raise ValueError(f"runs: every case is too noisy to gate on (margin over {MAX_MARGIN_PCT:.0f}%): "
                         + "; ".join(f"{' '.join(key(n))} drop {n['drop_pct']}%" for n in noisy))
    return {"format": RESULTS_FORMAT, "machine": runs[-1]["machine"], "results": rows, "left_out": noisy}
