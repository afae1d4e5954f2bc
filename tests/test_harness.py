"""Benchmark harness, results report and ``bench_attention --quick``: fast CPU tests."""

import json
import sys
from pathlib import Path

import pytest
import torch

# benchmarks/ is a directory of scripts next to the package, not part of the installed diffboost.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import bench_attention, harness, report  # noqa: E402

FAST = {"warmup_ms": 2, "rep_ms": 20, "progress": None}


class VirtualClock:
    """Stands in for ``time`` inside the harness: work advances it by exact amounts, so the assertions below test the
    harness's bookkeeping (medians, ratios, throughput), not how loaded the machine is."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def work(self, ms: float) -> None:
        self.now += ms / 1e3


@pytest.fixture
def clock(monkeypatch):
    fake = VirtualClock()
    monkeypatch.setattr(harness, "time", fake)
    return fake


def small_tensor():
    return (torch.zeros(16),)


def fake_row(group, name, median_ms, *, baseline=False, status="ok"):
    return {"group": group, "name": name, "status": status, "median_ms": median_ms if status == "ok" else None,
            "baseline": baseline, "baseline_name": None, "ratio_to_baseline": None}


def test_two_cases_ratio_is_speedup_against_baseline(clock):
    cases = [
        harness.Case("once", fn=lambda x: clock.work(1), inputs=small_tensor, group="g", baseline=True, flops=1e9,
                     bytes=2e6),
        harness.Case("twice", fn=lambda x: clock.work(2), inputs=small_tensor, group="g", flops=1e9),
    ]
    once, twice = harness.run_cases(cases, **FAST)
    assert [once["status"], twice["status"]] == ["ok", "ok"]
    for key in ("p20_ms", "median_ms", "p80_ms"):
        assert once[key] == pytest.approx(1.0)
    assert twice["median_ms"] == pytest.approx(2.0)
    assert once["ratio_to_baseline"] == 1.0
    assert twice["ratio_to_baseline"] == pytest.approx(0.5)
    assert twice["baseline_name"] == once["baseline_name"] == "once"
    assert once["tflops"] == pytest.approx(1e9 / (once["median_ms"] / 1e3) / 1e12)
    assert once["gbps"] == pytest.approx(2e6 / (once["median_ms"] / 1e3) / 1e9)
    assert twice["gbps"] is None
    assert once["device"] == "cpu" and once["dtype"] == "float32" and once["shapes"] == {"arg0": [16]}
    assert once["timing"]["method"] == "time.perf_counter" and once["timing"]["runs"] >= 5
    assert once["timing"]["threads"] == torch.get_num_threads()


def test_fastest_baseline_candidate_wins_within_each_group():
    rows = [
        fake_row("a", "slow-base", 2.0, baseline=True),
        fake_row("a", "fast-base", 1.0, baseline=True),
        fake_row("a", "ours", 0.5),
        fake_row("a", "broken-base", None, baseline=True, status="error"),
        fake_row("b", "only", 3.0),
    ]
    harness.apply_baselines(rows)
    assert [r["baseline_name"] for r in rows] == ["fast-base"] * 4 + [None]
    assert [r["ratio_to_baseline"] for r in rows] == [0.5, 1.0, 2.0, None, None]


def test_errors_and_skips_become_rows_and_the_run_goes_on():
    def boom(x):
        raise ValueError("boom\nsecond line")

    def unsupported(x):
        raise harness.SkipCase("shape unsupported")

    def not_implemented(x):
        raise NotImplementedError("head_dim 48")

    cases = [
        harness.Case("error", fn=boom, inputs=small_tensor, group="g", baseline=True),
        harness.Case("skip-arg", fn=boom, group="g", skip="peer not installed"),
        harness.Case("skip-raised", make_fn=unsupported, inputs=small_tensor, group="g"),
        harness.Case("not-implemented", fn=not_implemented, inputs=small_tensor, group="g"),
        harness.Case("ok", fn=lambda x: x + 1, inputs=small_tensor, group="g"),
    ]
    rows = harness.run_cases(cases, **FAST)
    assert [(r["name"], r["status"]) for r in rows] == [
        ("error", "error"), ("skip-arg", "skipped"), ("skip-raised", "skipped"),
        ("not-implemented", "skipped"), ("ok", "ok")]
    assert rows[0]["reason"] == "ValueError: boom"
    assert rows[1]["reason"] == "peer not installed"
    assert rows[2]["reason"] == "shape unsupported"
    assert rows[3]["reason"] == "NotImplementedError: head_dim 48"
    assert rows[4]["ratio_to_baseline"] is None  # the only baseline failed: no ratio, rather than a wrong one
    assert all(r["median_ms"] is None for r in rows[:4])


def test_lost_cuda_context_stops_running_cases(monkeypatch):
    def crash(x):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(harness, "cuda_usable", lambda: False)
    cases = [
        harness.Case("crash", fn=crash, inputs=small_tensor, group="g", device="cuda"),
        harness.Case("after", fn=lambda x: pytest.fail("ran after the context was lost"), inputs=small_tensor,
                     group="g", device="cuda"),
    ]
    crashed, after = harness.run_cases(cases, **FAST)
    assert crashed["status"] == after["status"] == "error"
    assert after["reason"].startswith("not run: CUDA context lost in g / crash (RuntimeError: CUDA error")


def test_case_needs_exactly_one_of_fn_and_make_fn():
    with pytest.raises(ValueError):
        harness.Case("neither")
    with pytest.raises(ValueError):
        harness.Case("both", fn=print, make_fn=print)


def test_cpu_inputs_rotate_through_copies_larger_than_the_cache():
    assert harness.input_copies_needed(10 * 2**20, 32 * 2**20, 64) == 7
    assert harness.input_copies_needed(100 * 2**20, 32 * 2**20, 64) == 1
    assert harness.input_copies_needed(1, 32 * 2**20, 8) == 8

    seen = set()
    case = harness.Case("rotate", fn=lambda x: seen.add(x.data_ptr()), inputs=lambda: (torch.ones(8),))
    (row,) = harness.run_cases([case], max_copies=4, **FAST)
    assert row["timing"]["input_copies"] == 4
    assert len(seen) == 4


def test_make_fn_context_and_check():
    entered = []

    class Flag:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            entered.append(False)

    def make(x):
        assert entered == [True]  # setup runs inside the case's context
        return lambda: x * 2

    def check(out, x):
        return {"max_abs_err": (out - 2 * x).abs().max()}

    case = harness.Case("ctx", make_fn=make, inputs=lambda: (torch.ones(4, dtype=torch.bfloat16),),
                        context=Flag, check=check, shapes={"N": 4}, params={"impl": "x"})
    (row,) = harness.run_cases([case], max_copies=1, **FAST)
    assert row["status"] == "ok", row["reason"]
    assert entered == [True, False]
    assert row["metrics"] == {"max_abs_err": 0.0}
    assert row["shapes"] == {"N": 4} and row["dtype"] == "bfloat16" and row["params"] == {"impl": "x"}


def test_summarize_percentiles():
    stats = harness.summarize([5.0, 1.0, 2.0, 3.0, 4.0])
    assert stats == {"median_ms": 3.0, "p20_ms": 1.8, "p80_ms": 4.2}


def test_machine_info_describes_host_and_versions():
    info = harness.machine_info(packages=("surely-not-installed-pkg",))
    assert info["device"] in ("cpu", "cuda")
    assert info["cpu"]["logical_cores"] >= 1 and info["cpu"]["torch_threads"] == torch.get_num_threads()
    assert info["versions"]["torch"] and info["versions"]["python"]
    assert info["versions"]["surely-not-installed-pkg"] is None
    json.dumps(info)  # JSON-ready


def _timed_rows(clock):
    return harness.run_cases([
        harness.Case("base", fn=lambda x: clock.work(0.2), inputs=small_tensor, group="g1", baseline=True, flops=4e6),
        harness.Case("fast", fn=lambda x: clock.work(0.1), inputs=small_tensor, group="g1", flops=4e6),
        harness.Case("gone", fn=print, group="g1", skip="peer | not installed"),
        harness.Case("other", fn=lambda x: clock.work(0.05), inputs=small_tensor, group="g2"),
    ], **FAST)


def test_write_results_is_valid_stable_json(tmp_path, clock):
    rows = _timed_rows(clock)
    machine = harness.machine_info()
    path = harness.write_results(rows, "unit", out_dir=tmp_path, machine=machine, command="python -m x --y")
    assert path.parent == tmp_path
    assert path.name == f"unit-{harness.device_slug(machine, 'cpu')}.json"
    assert path.name.startswith("unit-cpu-")
    doc = json.loads(path.read_text())
    assert set(doc) == {"name", "machine", "command", "timestamp", "rows"}
    assert doc["command"] == "python -m x --y"
    assert doc["machine"]["versions"]["torch"] == torch.__version__
    assert [r["name"] for r in doc["rows"]] == ["base", "fast", "gone", "other"]
    assert doc["rows"][2]["status"] == "skipped"

    first = path.read_text()
    harness.write_results(rows, "unit", out_dir=tmp_path, machine=machine, command="python -m x --y")
    changed = [(a, b) for a, b in zip(first.splitlines(), path.read_text().splitlines()) if a != b]
    assert all('"timestamp"' in a for a, _ in changed)  # a rerun of the same rows differs only in its time


def test_report_renders_markdown(tmp_path, capsys, clock):
    rows = _timed_rows(clock)
    path = harness.write_results(rows, "unit", out_dir=tmp_path, command="python -m x")
    text = report.render_markdown([path])
    assert text.startswith("### unit on ")
    assert "- Command: `python -m x`" in text
    assert "#### g1" in text and "#### g2" in text
    assert "baseline: base" in text and "no baseline measured" in text
    assert "| name | median ms | p20-p80 ms | TFLOP/s | x baseline | note |" in text
    assert "| base |" in text and "1.00x" in text
    assert "skipped: peer \\| not installed" in text  # a pipe in a reason cannot break the table

    assert report.main([str(path), "--heading-level", "2"]) == 0
    assert capsys.readouterr().out.startswith("## unit on ")


def test_print_table(capsys, clock):
    harness.print_table(_timed_rows(clock))
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["group", "name", "median"]
    assert len(out) == 2 + 4


def test_attention_shapes():
    shapes = [shape for family in bench_attention.FAMILIES.values() for shape in family]
    assert len(shapes) == 8
    for variant in (shapes, [shape.tiny() for shape in shapes]):
        names = [shape.name for shape in variant]
        assert len(set(names)) == len(names)
    flux = bench_attention.FAMILIES["flux"][0]
    assert flux.flops == 4 * 1 * 24 * 4608 * 4608 * 128
    assert "sd15-s4096-kv77-d40" in [shape.name for shape in shapes]
    assert bench_attention.FAMILIES["sd15"][3].tiny().Lk == 77  # the text length stays


def test_bench_attention_quick_cpu_end_to_end(tmp_path, capsys):
    assert bench_attention.main(["--quick", "--device", "cpu", "--shapes", "sd15,flux", "--threads", "1",
                                 "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("attention-quick-cpu-*.json")
    doc = json.loads(path.read_text())
    assert doc["command"].startswith("python -m benchmarks.bench_attention --quick")
    assert "sageattention" in doc["machine"]["versions"]
    rows = {(r["group"], r["name"]): r for r in doc["rows"]}
    groups = {r["group"] for r in doc["rows"]}
    assert groups == {"sd15-s256-d40", "sd15-s64-d80", "sd15-s16-d160", "sd15-s256-kv77-d40", "flux-s288-d128"}
    for group in groups:
        flash = rows[group, "sdpa-flash"]
        assert flash["status"] == "ok", flash["reason"]
        assert flash["metrics"]["cos_sim"] > 0.999 and flash["metrics"]["max_abs_err"] < 0.05
        assert flash["tflops"] > 0 and flash["baseline_name"] in ("sdpa-flash", "sdpa-math")
        assert rows[group, "sdpa-cudnn"]["status"] == "skipped" and rows[group, "sdpa-cudnn"]["reason"]
        assert rows[group, "sageattention"]["status"] == "skipped"
        for name in ("diffboost-exact", "diffboost-int8"):
            assert rows[group, name]["status"] in ("ok", "skipped"), rows[group, name]["reason"]
    assert "sd15-s256-d40" in capsys.readouterr().out


def test_bench_attention_full_shapes_need_a_gpu(tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench_attention.main(["--device", "cpu", "--out", str(tmp_path)])
    assert exc.value.code == 2


def test_results_name_separates_partial_runs():
    results_name = harness.results_name
    assert results_name("cache", ["flux", "sd15", "sdxl"], ("sd15", "sdxl", "flux")) == "cache"
    assert results_name("cache", ["sdxl"], ("sd15", "sdxl", "flux")) == "cache-sdxl"
    assert results_name("quant", ["sd15", "flux"], ["flux", "sdxl"]) == "quant-sd15-flux"
