"""fastcore's benchmarks and performance-regression gate, installed as ``fastcore.bench``.

Each op registers a :class:`~fastcore.bench.harness.Benchmark` in ``bench_<op>.py``;
``fastcore bench`` runs them, ``fastcore bench compare`` gates on their speedups.
"""
