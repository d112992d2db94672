"""The benchmark harness, its results file, its renderers and the performance-regression gate."""
import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastcore.bench import cli, compare, harness, report

ROOT = Path(__file__).resolve().parents[1]
TOY = "toy_scale"
NUMEL = 1 << 16
RESULT_KEYS = {"op", "provider", "case", "mode", "shape", "dtype", "size", "median_ms", "iqr_ms", "repeats",
               "gbps", "floor_frac", "peak_mem_bytes"}


class FakeClock:
    """perf_counter for the harness: providers spend exact amounts, every reading costs 1 us."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1e-6
        return self.now

    def spender(self, ms):
        def fn(x):
            self.now += ms / 1000
            return x * 2
        return fn


CLOCK = FakeClock()


def _cannot_set_up(x):
    return x


def _toy_providers(device):
    return {
        "fastcore-slow": CLOCK.spender(4),   # a known speedup over "torch": 2/4
        "torch": CLOCK.spender(2),
        "fastcore-fast": lambda x: torch.mul(x, 2),
        "fastcore-broken": _cannot_set_up,
        "liger": "liger-kernel is not installed",
    }


def _toy_setup(fn, case, device):
    if fn is _cannot_set_up:
        raise RuntimeError("this provider cannot build its inputs")
    x = torch.randn(case.shape, dtype=case.dtype)
    return lambda: fn(x)


def _toy_cases(device, quick):
    sizes = (NUMEL,) if quick else (NUMEL, 2 * NUMEL)
    return [harness.Case((n,), torch.float32, "fwd", size=n) for n in sizes]


@pytest.fixture(scope="module")
def toy():
    """A registered benchmark, y = 2x, with a known byte count and known relative speeds."""
    bench = harness.register(harness.Benchmark(op=TOY, providers=_toy_providers, cases=_toy_cases, setup=_toy_setup,
                                               work=lambda case: ("bytes", 2 * case.shape[0] * 4),
                                               size_name="elements"))
    yield bench
    harness.unregister(TOY)


@pytest.fixture(scope="module")
def toy_run(toy):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness, "clock", CLOCK.perf_counter)
        mp.setattr(harness, "copy_bandwidth", lambda device: 10.0)
        return harness.run([TOY], device="cpu", quick=False, repeats=harness.MIN_REPEATS).to_json()


def _rows(data, provider):
    return [r for r in data["results"] if r["provider"] == provider]


# ---------------------------------------------------------------- harness and results file
def test_results_schema_and_derived_figures(toy_run):
    assert toy_run["format"] == harness.RESULTS_FORMAT
    m = toy_run["machine"]
    for k in ("device", "slug", "cpu", "threads", "torch", "triton", "cuda", "commit", "date", "copy_gbps"):
        assert k in m, f"machine lacks {k}"
    assert m["slug"].startswith("cpu-") and m["slug"].endswith(f"-{torch.get_num_threads()}core")
    assert m["copy_gbps"] == 10.0
    assert {r["provider"] for r in toy_run["results"]} == {"fastcore-slow", "torch", "fastcore-fast"}
    for row in toy_run["results"]:
        assert RESULT_KEYS <= set(row), f"row lacks {RESULT_KEYS - set(row)}"
        assert row["case"] == f"{row['shape'][0]} float32 fwd" and row["mode"] == "fwd"
        assert row["median_ms"] > 0 and row["iqr_ms"] >= 0 and row["repeats"] == harness.MIN_REPEATS
        assert row["gbps"] == pytest.approx(2 * row["shape"][0] * 4 / (row["median_ms"] * 1e-3) / 1e9)
        assert row["floor_frac"] == pytest.approx(row["gbps"] / m["copy_gbps"])
        # y = 2x allocates one output of numel float32s, plus a few bytes for the wrapped scalar 2.
        assert row["shape"][0] * 4 <= row["peak_mem_bytes"] <= row["shape"][0] * 4 + 64
        assert ("speedup" in row) == row["provider"].startswith("fastcore-")
    # Under the fake clock each sample is the provider's spend plus one 1-us clock reading.
    for row in _rows(toy_run, "torch"):
        assert row["median_ms"] == pytest.approx(2.001) and row["iqr_ms"] == pytest.approx(0, abs=1e-9)
    for row in _rows(toy_run, "fastcore-slow"):
        assert row["median_ms"] == pytest.approx(4.001) and row["speedup"] == pytest.approx(2.001 / 4.001)
    for row in _rows(toy_run, "fastcore-fast"):
        assert row["median_ms"] == pytest.approx(0.001) and row["speedup"] == pytest.approx(2001)


def _run_once(bench: harness.Benchmark) -> list:
    """The rows of one quick run of ``bench`` under the fake clock; registered only meanwhile."""
    harness.register(bench)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(harness, "clock", CLOCK.perf_counter)
            mp.setattr(harness, "copy_bandwidth", lambda device: 10.0)
            return harness.run([bench.op], device="cpu", quick=True, repeats=harness.MIN_REPEATS).rows
    finally:
        harness.unregister(bench.op)


def test_a_benchmark_can_name_its_baseline_provider():
    """AdamW measures speedups over torch's fused AdamW, not over the eager provider."""
    rows = _run_once(harness.Benchmark(op="toy_baseline", providers=_toy_providers, cases=_toy_cases,
                                       setup=_toy_setup, work=lambda case: ("bytes", 8), baseline="fastcore-fast"))
    slow = next(r for r in rows if r["provider"] == "fastcore-slow")
    assert slow["speedup_over"] == "fastcore-fast" and slow["speedup"] == pytest.approx(0.001 / 4.001)


def test_a_step_can_add_figures_to_its_row():
    def setup(fn, case, device):
        step = _toy_setup(fn, case, device)
        step.extras = lambda: {"overlap": 0.25}
        return step
    rows = _run_once(harness.Benchmark(op="toy_extras", providers=lambda d: {"torch": CLOCK.spender(2)},
                                       cases=_toy_cases, setup=setup, work=lambda case: ("bytes", 8)))
    assert [r["overlap"] for r in rows] == [0.25]


@pytest.mark.parametrize("fails_in", ["timing", "extras"])
def test_a_provider_failing_while_measured_loses_only_its_own_row(fails_in):
    calls = {"n": 0}

    def breaks_on_third_call(x):
        calls["n"] += 1
        if calls["n"] == 3 and fails_in == "timing":
            raise RuntimeError("broke on its 3rd call")
        return x

    def setup(fn, case, device):
        step = _toy_setup(fn, case, device)
        if fails_in == "extras" and fn is breaks_on_third_call:
            step.extras = lambda: 1 / 0
        return step

    bench = harness.Benchmark(op="toy_breaks", providers=lambda d: {"torch": CLOCK.spender(2),
                                                                    "fastcore-breaks": breaks_on_third_call},
                              cases=_toy_cases, setup=setup, work=lambda case: ("bytes", 8))
    harness.register(bench)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(harness, "clock", CLOCK.perf_counter)
            mp.setattr(harness, "copy_bandwidth", lambda device: 10.0)
            result = harness.run([bench.op], device="cpu", quick=True, repeats=harness.MIN_REPEATS)
    finally:
        harness.unregister(bench.op)
    assert [r["provider"] for r in result.rows] == ["torch"]
    reason = "RuntimeError: broke on its 3rd call" if fails_in == "timing" else "ZeroDivisionError"
    assert [(e["provider"], e["reason"].startswith("failed while measured: " + reason)) for e in result.skipped] \
        == [("fastcore-breaks", True)]


def test_adamw_bytes_and_lists_by_hand():
    from fastcore.bench import bench_adamw

    shapes = bench_adamw.gpt2_small_shapes()
    assert len(shapes) == 148 and sum(torch.Size(s).numel() for s in shapes) == 124_439_808
    cpu = bench_adamw.param_lists("cpu")
    assert sum(torch.Size(s).numel() for s in cpu["gpt2-small-12m"]) == 11_836_928
    assert len(cpu["10k-small"]) == 10_000
    case = next(c for c in bench_adamw.cases("cpu", quick=True))
    assert bench_adamw.work(case) == ("bytes", 28 * 11_836_928)  # read p, g, m, v; write p, m, v in fp32


def test_train_flops_by_hand_and_a_step_of_each_model():
    from fastcore.bench import bench_train

    gpt2 = harness.Case((16, 1024), torch.bfloat16, "step", 16384, tag="gpt2-124m")
    # 6N + 6LCT per token; N = 123,689,472 without the position table (vocabulary padded to 50304).
    assert bench_train.work(gpt2) == ("flops", (6 * 123_689_472 + 6 * 12 * 768 * 1024) * 16 * 1024)
    assert [c.label for c in bench_train.cases("cpu", quick=False)] == ["8x256 float32 small step"]
    assert bench_train.cases("cpu", quick=True) == []
    tiny = harness.Case((2, 32), torch.float32, "step", 64, tag="tiny")
    makes = bench_train.providers("cpu")
    if isinstance(makes["fastcore-eager"], str):
        pytest.skip(makes["fastcore-eager"])
    losses = {}
    for name in ("fastcore-eager", "torch"):
        step = makes[name](tiny, "cpu")
        losses[name] = [step().item() for _ in range(3)]
        extras = step.extras()
        assert extras["tokens_per_step"] == 64 and extras["first_step_s"] > 0 and extras["peak_flops"] is None
        # The harness turns them into throughput and MFU from the row's median.
        bench = harness.Benchmark(op="train", providers=None, cases=None, setup=None, work=bench_train.work,
                                  baseline="torch")
        run = harness.Run("cpu", {"matmul_tflops": 1.0})
        row, = harness._rows(bench, tiny, {name: (20.0, 1.0, 5)}, {}, run, {name: {**extras, "peak_flops": 1e12}})
        assert row["tokens_per_s"] == pytest.approx(64 / 0.020)
        assert row["mfu"] == pytest.approx(64 / 0.020 * extras["flops_per_token"] / 1e12)
    # The same model, seed and tokens: the two steps train alike.
    # The first loss is the same forward (fp32 1e-5); the later ones also carry two AdamW steps, which
    # turn the rounding differences of the key bias's exactly-zero gradient into lr-sized moves.
    assert losses["fastcore-eager"][0] == pytest.approx(losses["torch"][0], rel=1e-5)
    assert losses["fastcore-eager"] == pytest.approx(losses["torch"], rel=1e-4)
    assert losses["torch"][2] < losses["torch"][0]


def test_data_parallel_overhead_at_world_size_one_trains_as_the_plain_step():
    """In a subprocess (it joins a process group): the trainer's step plain, in DataParallel and in DDP,
    on the tiny preset; at world size 1 the three train alike, and the harness gives the rows."""
    code = """if True:
        import json
        from fastcore.bench import bench_data_parallel as b, bench_train, harness
        bench_train.CASES["cpu"] = ("tiny", 2)
        makes = b.overhead_providers("cpu")
        if any(isinstance(m, str) for m in makes.values()):
            print(json.dumps({"skip": next(m for m in makes.values() if isinstance(m, str))}))
            raise SystemExit
        case, = bench_train.cases("cpu", False)
        losses = {}
        for name in b.OVERHEAD:
            step = makes[name](case, "cpu")
            losses[name] = [step().item() for _ in range(3)]
        run = harness.run(["data_parallel_overhead"], repeats=harness.MIN_REPEATS)
        print(json.dumps({"losses": losses, "rows": [[r["provider"], r.get("speedup_over")] for r in run.rows]}))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    plain = result["losses"]["plain"]
    assert plain[2] < plain[0]
    for name in ("fastcore-DataParallel", "torch-DDP"):  # the average over one rank is the gradient itself
        assert result["losses"][name] == pytest.approx(plain, rel=1e-6), name
    assert sorted(result["rows"]) == [["fastcore-DataParallel", "plain"], ["plain", None], ["torch-DDP", None]]


def test_copy_bandwidth_is_plausible():
    assert 0.5 < harness.copy_bandwidth("cpu") < 2000  # GB/s: any CPU from a laptop to a large server


def test_naming_an_op_twice_runs_it_once(toy):
    rows = harness.run([TOY, TOY], quick=True).rows
    assert len(rows) == len({(r["provider"], r["case"]) for r in rows}) == 3


def test_a_provider_failing_a_later_pass_gets_no_row():
    setups = []

    def setup(fn, case, device):
        setups.append(fn)
        if fn is flaky and len([f for f in setups if f is flaky]) > 2:
            raise RuntimeError("gone on the third setup")
        return lambda: fn(1)

    flaky = lambda x: x  # noqa: E731
    bench = harness.register(harness.Benchmark(
        op="toy_flaky", providers=lambda device: {"torch": lambda x: x, "fastcore-flaky": flaky},
        cases=lambda device, quick: [harness.Case((1,), torch.float32, "fwd", 1)], setup=setup,
        work=lambda case: ("bytes", 8)))
    try:
        result = harness.run([bench.op])
    finally:
        harness.unregister(bench.op)
    assert [r["provider"] for r in result.rows] == ["torch"]
    assert [s["reason"] for s in result.skipped] == ["failed: RuntimeError: gone on the third setup"]


def test_an_interrupted_run_keeps_the_cases_it_finished(tmp_path, capsys):
    """A time limit (``timeout -s INT``, as bench/gpu_session.sh sets one) at the second case of the
    last pass (a GPU run's only one): the first case's rows are written, the file says the run was
    cut short, and the exit status is 1."""
    setups = []

    def setup(fn, case, device):
        setups.append(case.size)
        if setups.count(2) == 2 * harness.CPU_PASSES:  # both providers, once a pass
            setups.clear()
            raise KeyboardInterrupt
        return lambda: fn(case.size)

    bench = harness.register(harness.Benchmark(
        op="toy_cut", providers=lambda device: {"torch": lambda x: x, "fastcore-a": lambda x: x},
        cases=lambda device, quick: [harness.Case((n,), torch.float32, "fwd", n) for n in (1, 2, 3)], setup=setup,
        work=lambda case: ("bytes", 8)))
    try:
        result = harness.run([bench.op])
        assert result.interrupted and {r["case"] for r in result.rows} == {"1 float32 fwd"}
        assert len(result.rows) == 2 and result.to_json()["interrupted"] is True
        path = tmp_path / "cut.json"
        assert cli.main([bench.op, "--json", str(path)]) == 1
    finally:
        harness.unregister(bench.op)
    data = json.loads(path.read_text())
    assert data["interrupted"] is True and [r["case"] for r in data["results"]] == ["1 float32 fwd"] * 2
    assert "interrupted: " in capsys.readouterr().err
    assert "interrupted" not in harness.Run("cpu", {}).to_json()


def test_gpu_timing_window_holds_enough_calls_of_a_long_step(monkeypatch):
    """do_bench's windows are milliseconds: a 30 ms step gets one of at least MIN_REPEATS calls, a
    microsecond kernel keeps the default 100 ms (thousands of calls)."""
    triton_testing = pytest.importorskip("triton.testing")
    windows = []

    def do_bench(fn, warmup, rep, quantiles):
        windows.append((warmup, rep))
        return 1.0, 2.0, 3.0
    monkeypatch.setattr(triton_testing, "do_bench", do_bench)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    assert harness.time_cuda(lambda: time.sleep(0.03)) == (2.0, 2.0)
    assert harness.time_cuda(lambda: None) == (2.0, 2.0)
    (warm_long, rep_long), (warm_short, rep_short) = windows
    assert rep_long >= harness.MIN_REPEATS * 30 and warm_long >= 60
    assert (warm_short, rep_short) == (25.0, 100.0)


def test_real_clock_timings_are_sane():
    """The real clock: a provider that sleeps 3 ms takes at least that, and one that does not is faster."""
    def sleeper(x):
        time.sleep(0.003)
        return x
    bench = harness.register(harness.Benchmark(
        op="toy_sleep", providers=lambda device: {"torch": sleeper, "fastcore-x": lambda x: x + 1},
        cases=lambda device, quick: [harness.Case((8,), torch.float32, "fwd", 8)],
        setup=lambda fn, case, device: (lambda x=torch.ones(8): fn(x)), work=lambda case: ("bytes", 64)))
    try:
        rows = {r["provider"]: r for r in harness.run([bench.op]).rows}
    finally:
        harness.unregister(bench.op)
    assert rows["torch"]["median_ms"] >= 3.0
    assert rows["fastcore-x"]["median_ms"] < 3.0 and rows["fastcore-x"]["speedup"] > 1


def test_skipped_providers_name_their_reason(toy_run):
    reasons = {(s["provider"], s.get("case")): s["reason"] for s in toy_run["skipped"]}
    assert reasons[("liger", None)] == "liger-kernel is not installed"
    failed = [r for (p, c), r in reasons.items() if p == "fastcore-broken"]
    assert len(failed) == 2 and all("cannot build its inputs" in r for r in failed)


def test_quick_is_a_subset_and_size_names_travel(toy):
    data = harness.run([TOY], device="cpu", quick=True).to_json()
    assert {r["size"] for r in data["results"]} == {NUMEL}
    assert data["size_names"] == {TOY: "elements"}


@pytest.mark.parametrize("kwargs,match", [
    (dict(ops=["no_such_op"]), "ops: unknown benchmark"),
    (dict(device="tpu"), "device: expected 'cpu' or 'cuda'"),
    (dict(repeats=5), "repeats: expected at least 15"),
])
def test_run_rejects_bad_arguments(toy, kwargs, match):
    kwargs = {"ops": [TOY], **kwargs}
    with pytest.raises(ValueError, match=match):
        harness.run(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_run_refuses_cuda_without_a_gpu(toy):
    with pytest.raises(ValueError, match="no CUDA GPU"):
        harness.run([TOY], device="cuda")


def test_peak_memory_counts_transients():
    def step():
        a = torch.empty(1000, dtype=torch.float32)  # 4000 B, freed at return
        b = torch.empty(500, dtype=torch.float64)   # 4000 B, both live at once
        return (a.numel() + b.numel())
    assert harness.peak_memory(step, "cpu") == 8000


def test_parked_openmp_workers_stop_spinning():
    """Under OMP_WAIT_POLICY=ACTIVE an idle worker takes a whole core; parked, it takes none."""
    code = ("import time, torch; from fastcore.bench import harness\n"
            "torch.set_num_threads(2); a = torch.randn(512, 512); a @ a\n"
            "def idle():\n    t = time.process_time(); time.sleep(0.5); return time.process_time() - t\n"
            "spinning = idle(); harness.park_openmp_workers(); print(spinning, idle())")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, OMP_WAIT_POLICY="ACTIVE"),
                         capture_output=True, text=True, timeout=120, check=True).stdout
    spinning, parked = map(float, out.split())
    assert spinning > 0.3 and parked < 0.1, (spinning, parked)


def test_device_slug():
    assert harness.device_slug("cpu", "AMD EPYC", 2) == "cpu-amd-epyc-2core"
    assert harness.device_slug("cpu", "Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz", 8) == \
        "cpu-intel-xeon-platinum-8480-8core"
    assert harness.device_slug("cpu", "AMD EPYC 9654 96-Core Processor", 4) == "cpu-amd-epyc-9654-4core"
    assert harness.device_slug("cuda", "NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_norm_min_bytes_by_hand():
    from fastcore.bench import bench_norm

    case = harness.Case((4096, 1024), torch.float32, "fwd", 1024)
    assert bench_norm.min_bytes("layer_norm", case) == 2 * 4096 * 1024 * 4 + 2 * 1024 * 4
    bwd = harness.Case((4096, 1024), torch.bfloat16, "bwd", 1024)
    assert bench_norm.min_bytes("rms_norm", bwd) == 3 * 4096 * 1024 * 2 + 2 * 1024 * 2
    both = harness.Case((8, 16), torch.float32, "fwd+bwd", 16)
    # forward: x, y, w, b; backward: x, dy, dx, then w read and dw, db written (b is not needed)
    assert bench_norm.min_bytes("layer_norm", both) == (2 * 8 * 16 + 2 * 16 + 3 * 8 * 16 + 3 * 16) * 4


# ---------------------------------------------------------------- renderers
def test_markdown_table(toy_run):
    md = report.markdown(toy_run)
    header = next(line for line in md.splitlines() if line.startswith("| case"))
    assert header.split(" | ")[1:4] == ["fastcore-slow ms", "torch ms", "fastcore-fast ms"]
    assert "fastcore-slow vs torch" in header
    slow = _rows(toy_run, "fastcore-slow")[0]
    line = next(line for line in md.splitlines() if line.startswith(f"| {slow['case']} |"))
    assert f"{slow['speedup']:.2f}×" in line and f"{slow['median_ms']:.3f}" in line


def test_plot_writes_one_png_per_op(toy_run, tmp_path):
    paths = report.plot(toy_run, tmp_path)
    assert paths == [tmp_path / f"{TOY}.png"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[0].stat().st_size > 5000


# ---------------------------------------------------------------- the gate
def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _gate(capsys, *args):
    code = cli.main(["compare", *map(str, args)])
    return code, capsys.readouterr().out


def _scaled(data, factor, **extra):
    data = copy.deepcopy(data)
    for row in data["results"]:
        if "speedup" in row:
            row["speedup"] *= factor
            row.update(extra)
    return data


def test_gate_passes_a_file_against_itself(toy_run, tmp_path, capsys):
    path = _write(tmp_path, "run.json", toy_run)
    code, out = _gate(capsys, path, path)
    assert code == 0, out
    assert "0 regressed, missing or measured over another reference, 0 improved" in out


def test_gate_fails_when_the_baseline_was_faster(toy_run, tmp_path, capsys):
    # Three times better than now: past the default margin (a third of the speedup is left).
    base = _write(tmp_path, "base.json", _scaled(toy_run, 3.0))
    cur = _write(tmp_path, "cur.json", toy_run)
    code, out = _gate(capsys, base, cur)
    assert code == 1
    assert out.count("REGRESSED") == 4 and "PERFORMANCE GATE FAILED" in out


def test_gate_fails_when_a_case_is_missing(toy_run, tmp_path, capsys):
    current = copy.deepcopy(toy_run)
    gone = next(i for i, r in enumerate(current["results"]) if r["provider"] == "fastcore-fast")
    missing = current["results"].pop(gone)
    code, out = _gate(capsys, _write(tmp_path, "base.json", toy_run), _write(tmp_path, "cur.json", current))
    assert code == 1
    assert "MISSING" in out and f"{missing['case']} fastcore-fast: missing" in out


def test_gate_reports_improvements_and_new_cases(toy_run, tmp_path, capsys):
    base = _scaled(toy_run, 0.5)
    base["results"] = [r for r in base["results"] if r["size"] == NUMEL]
    code, out = _gate(capsys, _write(tmp_path, "base.json", base), _write(tmp_path, "cur.json", toy_run))
    assert code == 0, out
    assert out.count("IMPROVED") == 2 and out.count("NEW") == 2


def test_gate_margins(toy_run, tmp_path, capsys):
    cur = _write(tmp_path, "cur.json", toy_run)
    # 15% better in the baseline: inside the default margin, outside a 10% one.
    assert _gate(capsys, _write(tmp_path, "b1.json", _scaled(toy_run, 1.15)), cur)[0] == 0
    assert _gate(capsys, _write(tmp_path, "b1.json", _scaled(toy_run, 1.15)), cur, "--margin", "10")[0] == 1
    # A margin written in the baseline is used...
    assert _gate(capsys, _write(tmp_path, "b2.json", _scaled(toy_run, 1.15, margin_pct=5)), cur)[0] == 1
    # ...unless --margin overrides it.
    assert _gate(capsys, _write(tmp_path, "b2.json", _scaled(toy_run, 1.15, margin_pct=5)), cur, "--margin", "20")[0] == 0


def test_gate_prints_and_writes_the_updated_baseline(toy_run, tmp_path, capsys):
    base = _write(tmp_path, "base.json", _scaled(toy_run, 0.5, margin_pct=12))
    cur = _write(tmp_path, "cur.json", toy_run)
    code, out = _gate(capsys, base, cur, "--write", tmp_path / "new.json")
    assert code == 0
    printed = json.loads(out[out.index("{", out.index("updated baseline")):out.rindex("}") + 1])
    written = json.loads((tmp_path / "new.json").read_text())
    assert printed == written
    assert {r["margin_pct"] for r in written["results"]} == {12}
    assert sorted(r["speedup"] for r in written["results"]) == sorted(r["speedup"] for r in toy_run["results"]
                                                                       if "speedup" in r)
    assert _gate(capsys, tmp_path / "new.json", cur)[0] == 0


def test_gate_picks_the_machine_class_from_a_directory(toy_run, tmp_path, capsys):
    cur = _write(tmp_path, "cur.json", toy_run)
    (tmp_path / "baselines").mkdir()
    code, out = _gate(capsys, tmp_path / "baselines", cur)
    assert code == 0 and "no baseline for machine class" in out and "nothing to gate" in out
    _write(tmp_path / "baselines", f"{toy_run['machine']['slug']}.json", _scaled(toy_run, 3.0))
    code, out = _gate(capsys, tmp_path / "baselines", cur)
    assert code == 1 and "REGRESSED" in out


def test_committed_baselines_load_and_pass_against_themselves(capsys):
    paths = sorted((ROOT / "bench" / "baselines").glob("*.json"))
    assert paths, "no committed baseline"
    for path in paths:
        data = compare.load(path, "baseline")
        assert path.stem == data["machine"]["slug"]
        assert all("margin_pct" in r and r["speedup"] > 0 for r in data["results"])
        code, out = _gate(capsys, path, path)
        assert code == 0, out


@pytest.mark.parametrize("content,match", [
    (None, "no such file"),
    ("not json", "is not JSON"),
    ('{"results": []}', "not a fastcore bench results file"),
    ('{"machine": {"slug": "x"}, "results": []}', "has format None; this fastcore reads format 1"),
    ('{"format": 1, "machine": {}, "results": []}', "machine lacks its slug"),
    ('{"format": 1, "machine": {"slug": "x"}, "results": [{"op": "x"}]}', r"results\[0\] lacks \['case', 'mode', 'provider'\]"),
    ('{"format": 1, "machine": {"slug": "x"}, "results": [' + ", ".join(['{"op": "x", "provider": "p", "case": "c", "mode": "fwd"}'] * 2) + "]}",
     r"results\[1\] repeats the case \('x', 'p', 'c'\)"),
    ('{"format": 1, "machine": {"slug": "x"}, "results": [{"op": "x", "provider": "p", "case": "c", "mode": "fwd", "speedup": -1}]}',
     "has speedup -1; expected a positive number"),
    ('{"format": 1, "machine": {"slug": "x"}, "results": [{"op": "x", "provider": "p", "case": "c", "mode": "fwd", "speedup": 2, "margin_pct": 120}]}',
     r"has margin_pct 120; expected a percentage in \[0, 100\)"),
    ('{"format": 1, "machine": {"slug": "x"}, "results": [{"op": "x", "provider": "torch", "case": "c", "mode": "fwd"}]}', "nothing to gate on"),
])
def test_gate_rejects_bad_files(toy_run, tmp_path, capsys, content, match):
    base = tmp_path / "base.json"
    if content is not None:
        base.write_text(content)
    with pytest.raises(SystemExit) as exc:
        cli.main(["compare", str(base), str(_write(tmp_path, "cur.json", toy_run))])
    assert exc.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_gate_rejects_a_bad_margin(toy_run, tmp_path, capsys):
    path = _write(tmp_path, "run.json", toy_run)
    with pytest.raises(SystemExit):
        cli.main(["compare", str(path), str(path), "--margin", "150"])
    assert "margin: expected a percentage in [0, 100)" in capsys.readouterr().err


def test_baseline_from_runs_sets_margins_from_the_drop(toy_run, tmp_path, capsys):
    runs = [_write(tmp_path, f"r{i}.json", _scaled(toy_run, f)) for i, f in enumerate((0.85, 1.0, 1.6))]
    assert cli.main(["baseline", *map(str, runs), "--out", str(tmp_path / "base.json")]) == 0
    capsys.readouterr()
    base = json.loads((tmp_path / "base.json").read_text())
    original = {compare.key(r): r["speedup"] for r in toy_run["results"] if "speedup" in r}
    assert len(base["results"]) == len(original) == 4 and base["left_out"] == []
    for row in base["results"]:
        s = original[compare.key(row)]
        assert row["speedup"] == pytest.approx(s)                  # the median run
        assert row["drop_pct"] == pytest.approx(15.0)              # the low run; the high one cannot fail the gate
        assert row["margin_pct"] == 30                             # 2 x 15
    with pytest.raises(SystemExit):
        cli.main(["baseline", str(runs[0]), "--out", str(tmp_path / "x.json")])
    assert "at least two results files" in capsys.readouterr().err


def test_baseline_margin_has_a_floor():
    rows = [{"op": "o", "provider": "fastcore-x", "case": "c", "speedup": s} for s in (1.0, 1.01)]
    base = compare.from_runs([{"machine": {"slug": "m"}, "results": [r]} for r in rows])
    assert base["results"][0]["margin_pct"] == compare.MIN_MARGIN_PCT and base["left_out"] == []


def test_baseline_leaves_out_cases_too_noisy_to_gate(toy_run, tmp_path, capsys):
    def run(slow_factor):
        data = copy.deepcopy(toy_run)
        for row in _rows(data, "fastcore-slow"):
            row["speedup"] *= slow_factor
        return data
    runs = [_write(tmp_path, f"r{i}.json", run(f)) for i, f in enumerate((0.4, 1.0, 1.0))]
    assert cli.main(["baseline", *map(str, runs), "--out", str(tmp_path / "base.json")]) == 0
    out = capsys.readouterr().out
    assert out.count("left out, too noisy to gate on") == 2 and "drop 60.0%" in out
    base = json.loads((tmp_path / "base.json").read_text())
    assert {r["provider"] for r in base["results"]} == {"fastcore-fast"}
    assert {r["provider"] for r in base["left_out"]} == {"fastcore-slow"}
    # The gate neither gates on them nor takes them for new cases, and the update keeps them out.
    code, out = _gate(capsys, tmp_path / "base.json", runs[0], "--write", tmp_path / "new.json")
    assert code == 0 and "NEW" not in out and "fastcore-slow" not in out.split("updated baseline")[0]
    new = json.loads((tmp_path / "new.json").read_text())
    assert new["left_out"] == base["left_out"] and {r["provider"] for r in new["results"]} == {"fastcore-fast"}


def test_baseline_refuses_when_every_case_is_too_noisy(toy_run, tmp_path, capsys):
    runs = [_write(tmp_path, f"r{i}.json", _scaled(toy_run, f)) for i, f in enumerate((0.4, 1.0, 1.0))]
    with pytest.raises(SystemExit) as exc:
        cli.main(["baseline", *map(str, runs), "--out", str(tmp_path / "base.json")])
    assert exc.value.code == 2 and "every case is too noisy to gate on" in capsys.readouterr().err
    assert not (tmp_path / "base.json").exists()


# ---------------------------------------------------------------- the command line
def _fastcore(*args, timeout=300):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([sys.executable, "-m", "fastcore", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("args,message", [
    (["no_such_op"], "ops: unknown benchmark(s) no_such_op; registered: {registered}"),
    (["--repeats", "3"], "repeats: expected at least 15 on CPU (medians of fewer are noise), got 3"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "device: 'cuda' was asked for, but no CUDA GPU")]))
def test_cli_rejects_bad_arguments(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    message = message.format(registered=", ".join(sorted(harness.registered())))
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_cli_show_renders_a_results_file(toy_run, tmp_path):
    path = _write(tmp_path, "run.json", toy_run)
    out = _fastcore("bench", "show", str(path), "--markdown", "--plot", str(tmp_path / "plots"))
    assert out.returncode == 0, out.stderr
    assert "| case |" in out.stdout and (tmp_path / "plots" / f"{TOY}.png").exists()


def test_cli_run_writes_results_markdown_and_plots(toy, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main([TOY, "--quick", "--markdown", "--plot", "plots"]) == 0
    out = capsys.readouterr().out
    slug = harness.device_slug("cpu")
    path = tmp_path / "bench" / "results" / slug / f"{TOY}-quick.json"
    data = compare.load(path, "results")
    assert {r["provider"] for r in data["results"]} == {"fastcore-slow", "torch", "fastcore-fast"}
    assert f"wrote bench/results/{slug}/{TOY}-quick.json" in out and "| case |" in out
    assert "skipped toy_scale liger: liger-kernel is not installed" in out
    assert (tmp_path / "plots" / f"{TOY}.png").exists()


def test_cli_respawns_with_spinning_openmp_workers(toy, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli.os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    cli.main([TOY, "--quick", "--json", str(tmp_path / "a.json")], command_line=True)
    assert calls == []  # the user's own setting stands
    monkeypatch.delenv("OMP_WAIT_POLICY")
    cli.main([TOY, "--quick", "--json", str(tmp_path / "b.json")], command_line=True)
    (exe, argv, env), = calls
    # The same invocation (console script or -m, interpreter flags included), not a rebuilt one.
    assert exe == sys.executable and argv == sys.orig_argv and env["OMP_WAIT_POLICY"] == "ACTIVE"


RESPAWN_SCRIPT = """
import os, sys, torch
from fastcore.bench import harness
from fastcore.cli import main
print("policy", os.environ.get("OMP_WAIT_POLICY"), flush=True)
harness.register(harness.Benchmark(
    op="toy_env", providers=lambda device: {"torch": lambda x: x},
    cases=lambda device, quick: [harness.Case((1,), torch.float32, "fwd", 1)],
    setup=lambda fn, case, device: (lambda: fn(1)), work=lambda case: ("bytes", 8)))
sys.argv = ["fastcore", "bench", "toy_env", "--json", sys.argv[1]]
sys.exit(main())
"""


def test_cli_respawn_for_real(tmp_path):
    """A real command line without OMP_WAIT_POLICY runs again, once, with it set to ACTIVE."""
    script = tmp_path / "respawn.py"
    script.write_text(RESPAWN_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "r.json")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("policy None") == 1 and out.stdout.count("policy ACTIVE") == 1
    assert out.stdout.count(report.HEADER) == 1
    assert compare.load(tmp_path / "r.json", "results")["results"][0]["op"] == "toy_env"


def test_every_case_gets_a_compiled_graph(tmp_path):
    """Dynamo stops compiling a function after 8 shapes and silently runs it eagerly; the harness
    lifts that limit, so the torch.compile rows of a long sweep measure compiled code."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(tuple(example_inputs[0].shape))
        return gm.forward

    compiled = torch.compile(lambda x: x * 2 + 1, backend=counting_backend, dynamic=False)
    sizes = [8 + i for i in range(10)]
    bench = harness.register(harness.Benchmark(
        op="toy_compiled", providers=lambda device: {"torch": lambda x: x * 2 + 1, "torch.compile": compiled},
        cases=lambda device, quick: [harness.Case((n,), torch.float32, "fwd", n) for n in sizes],
        setup=lambda fn, case, device: (lambda x=torch.ones(case.shape): fn(x)), work=lambda case: ("bytes", 8)))
    try:
        result = harness.run([bench.op])
    finally:
        harness.unregister(bench.op)
    assert result.skipped == []
    assert sorted(set(graphs)) == [(n,) for n in sizes]
    assert len([r for r in result.rows if r["provider"] == "torch.compile"]) == len(sizes)


def test_run_rejects_duplicate_case_labels():
    bench = harness.register(harness.Benchmark(
        op="toy_twins", providers=lambda device: {"torch": lambda x: x},
        cases=lambda device, quick: [harness.Case((4,), torch.float32, "fwd", 4)] * 2,
        setup=lambda fn, case, device: (lambda: fn(1)), work=lambda case: ("bytes", 8)))
    try:
        with pytest.raises(ValueError, match="toy_twins: its cases must have distinct labels"):
            harness.run([bench.op])
    finally:
        harness.unregister(bench.op)


def test_flops_benchmarks_report_tflops_against_the_matmul_rate():
    bench = harness.register(harness.Benchmark(
        op="toy_mm", providers=lambda device: {"torch": torch.mm, "fastcore-x": torch.mm},
        cases=lambda device, quick: [harness.Case((64, 64), torch.float32, "fwd", 64)],
        setup=lambda fn, case, device: (lambda a=torch.randn(case.shape): fn(a, a)),
        work=lambda case: ("flops", 2 * 64 ** 3)))
    try:
        result = harness.run([bench.op])
    finally:
        harness.unregister(bench.op)
    assert result.machine["matmul_tflops"] > 0 and "copy_gbps" not in result.machine
    for row in result.rows:
        assert "gbps" not in row
        assert row["tflops"] == pytest.approx(2 * 64 ** 3 / (row["median_ms"] * 1e-3) / 1e12)
        assert row["floor_frac"] == pytest.approx(row["tflops"] / result.machine["matmul_tflops"])


def test_attention_flops_by_hand():
    # FlashAttention's count: 4 * B * H * T^2 * D forward, halved when causal, x2.5 backward.
    assert harness.attention_flops(2, 3, 5, 5, 7, False, "fwd") == 4 * 2 * 3 * 25 * 7
    assert harness.attention_flops(2, 3, 5, 5, 7, True, "fwd") == 2 * 2 * 3 * 25 * 7
    assert harness.attention_flops(1, 1, 4, 6, 8, False, "bwd") == 2.5 * 4 * 4 * 6 * 8
    assert harness.attention_flops(1, 1, 4, 4, 8, True, "fwd+bwd") == 3.5 * 2 * 16 * 8


def test_gate_falls_back_to_the_nearest_machine_class_of_the_same_vendor(toy_run, tmp_path, capsys):
    (tmp_path / "baselines").mkdir()
    _write(tmp_path / "baselines", "cpu-amd-epyc-2core.json", _scaled(toy_run, 3.0))
    _write(tmp_path / "baselines", "cpu-amd-epyc-8core.json", toy_run)
    current = copy.deepcopy(toy_run)
    current["machine"]["slug"] = "cpu-amd-epyc-7b13-2core"
    code, out = _gate(capsys, tmp_path / "baselines", _write(tmp_path, "cur.json", current))
    assert "using the nearest machine class, cpu-amd-epyc-2core" in out
    assert code == 1 and "REGRESSED" in out
    # Another vendor's vector units shift the speedups: no fallback, nothing gated.
    current["machine"]["slug"] = "cpu-intel-xeon-platinum-8481c-2core"
    code, out = _gate(capsys, tmp_path / "baselines", _write(tmp_path, "cur.json", current))
    assert code == 0 and "no baseline for machine class cpu-intel-xeon-platinum-8481c-2core" in out


def test_gate_fails_a_speedup_measured_over_another_reference(toy_run, tmp_path, capsys):
    base = _write(tmp_path, "base.json", toy_run)
    cur = _write(tmp_path, "cur.json", _scaled(toy_run, 5.0, speedup_over="torch-foreach"))
    code, out = _gate(capsys, base, cur)
    assert code == 1 and out.count("REFERENCE CHANGED") == 4 and "PERFORMANCE GATE FAILED" in out
    assert all(r["speedup_over"] == "torch" for r in json.loads(
        json.dumps(compare.updated_baseline(toy_run, toy_run)))["results"])


def test_bench_output_paths_are_checked_before_the_run(toy, toy_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(harness, "run", lambda *a, **k: pytest.fail("ran before checking its output paths"))
    (tmp_path / "afile").write_text("")
    run_json = _write(tmp_path, "run.json", toy_run)
    for argv, message in (([TOY, "--quick", "--json", str(tmp_path)], f"--json: {tmp_path} is a directory"),
                          ([TOY, "--quick", "--json", "afile/x.json"], "--json: afile is a file"),
                          ([TOY, "--quick", "--plot", "afile"], "--plot: afile exists and is not a directory"),
                          (["compare", str(run_json), str(run_json), "--write", str(tmp_path)], "--write: "),
                          (["baseline", str(run_json), str(run_json), "--out", str(tmp_path)], "--out: "),
                          (["compare", str(run_json), str(tmp_path)], f"current: cannot read {tmp_path} (Is a directory)"),
                          (["show", str(tmp_path / "afile")], "is not JSON")):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err, (argv, err)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    with pytest.raises(SystemExit):
        cli.main([TOY, "--quick", "--plot", "plots"])
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_a_failed_baseline_write_leaves_the_old_file(toy_run, tmp_path, capsys, monkeypatch):
    base = _write(tmp_path, "base.json", toy_run)
    before = base.read_bytes()

    def full_disk(self, text, *a, **k):
        with open(self, "w") as f:
            f.write(text[:100])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        cli.main(["compare", str(base), str(base), "--write", str(base)])
    assert base.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["base.json"]


def test_plot_lines_never_join_cases_of_one_size():
    rows = [{"provider": "p", "size": 2048, "case": f"8x{h}x2048x{d} bfloat16 causal fwd", "tflops": t}
            for h, d, t in ((32, 64, 1.0), (16, 128, 2.0))] + \
           [{"provider": "p", "size": 4096, "case": f"4x{h}x4096x{d} bfloat16 causal fwd", "tflops": t}
            for h, d, t in ((32, 64, 3.0), (16, 128, 4.0))]
    assert report._series("p", rows, "tflops") == [("p (…×64)", [(2048, 1.0), (4096, 3.0)]),
                                                   ("p (…×128)", [(2048, 2.0), (4096, 4.0)])]
    assert report._series("p", rows[::2], "tflops") == [("p", [(2048, 1.0), (4096, 3.0)])]
    assert report._tag(rows[0]) == "causal"


def test_peer_libraries_that_fail_become_skip_reasons():
    assert harness.peer("lib", lambda: len) is len

    def missing():
        import no_such_module_here  # noqa: F401

    def broken():
        raise OSError("undefined symbol: _ZN3c10")
    def needs_other():
        import no_such_dependency  # noqa: F401

    def bad_build():
        raise ImportError("libc10.so: undefined symbol: _ZN3c10")
    assert harness.peer("no-such-module-here", missing) == "no-such-module-here is not installed"
    # A peer that is installed but cannot import says so, rather than "not installed".
    assert harness.peer("lib", needs_other).startswith("lib does not import: ModuleNotFoundError")
    assert harness.peer("lib", bad_build) == "lib does not import: ImportError: libc10.so: undefined symbol: _ZN3c10"
    assert harness.peer("lib", broken) == "lib does not import: OSError: undefined symbol: _ZN3c10"
