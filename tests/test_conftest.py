"""The test protocol itself: on a GPU machine, `pytest -m gpu` must select every case that runs on the GPU."""
import conftest


class _Item:
    def __init__(self, params=None, gpu=False):
        if params is not None:
            self.callspec = type("CallSpec", (), {"params": params})()
        self.keywords = {"gpu": True} if gpu else {}
        self.markers = []

    def add_marker(self, marker):
        self.markers.append(marker.name if hasattr(marker, "name") else marker.mark.name)


def test_cases_on_the_gpu_carry_the_gpu_mark_on_a_gpu_machine(monkeypatch):
    monkeypatch.setattr(conftest, "HAS_GPU", True)
    on_gpu, on_cpu, plain = _Item({"device": "cuda", "backend": "triton"}), _Item({"device": "cpu"}), _Item()
    conftest.pytest_collection_modifyitems(None, [on_gpu, on_cpu, plain])
    assert on_gpu.markers == ["gpu"] and on_cpu.markers == [] and plain.markers == []


def test_gpu_tests_are_skipped_without_a_gpu(monkeypatch):
    monkeypatch.setattr(conftest, "HAS_GPU", False)
    gpu, other = _Item(gpu=True), _Item({"device": "cpu"})
    conftest.pytest_collection_modifyitems(None, [gpu, other])
    assert gpu.markers == ["skip"] and other.markers == []


def test_the_hook_runs_before_the_mark_filter():
    """`-m gpu` deselects in pytest's own modifyitems hook; ours must mark first."""
    assert conftest.pytest_collection_modifyitems.pytest_impl["tryfirst"]

