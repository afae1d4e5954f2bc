"""``benchmarks/bench_linear_attention.py --quick`` end to end on CPU, and its scaling bookkeeping."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# benchmarks/ is a directory of scripts next to the package, not part of the installed diffboost.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import bench_linear_attention as bench  # noqa: E402


def test_quick_cpu_end_to_end(tmp_path, capsys):
    assert bench.main(["--quick", "--device", "cpu", "--dims", "40", "--threads", "1", "--e2e",
                       "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("linear-attention-quick-cpu-*.json")
    doc = json.loads(path.read_text())
    assert doc["command"].startswith("python -m benchmarks.bench_linear_attention --quick")
    rows = {(r["group"], r["name"]): r for r in doc["rows"]}
    groups = {r["group"] for r in doc["rows"]}
    assert groups == {"h2-d40-n128", "h2-d40-n512", "h2-d40-n2048", "e2e-tiny-sd-unet-128px"}
    for n in (128, 512, 2048):
        ours = rows[f"h2-d40-n{n}", "diffboost-linear"]
        assert ours["status"] == "ok", ours["reason"]
        assert ours["baseline_name"].startswith("sdpa-") and ours["ratio_to_baseline"] > 0
        assert ours["metrics"]["cos_sim"] > 0.9999 and ours["metrics"]["max_abs_err"] < 0.02
        assert ("scaling_x4" in ours["metrics"]) == (n > 128)
    e2e = [rows["e2e-tiny-sd-unet-128px", name] for name in ("unet-softmax", "unet-linear-diffboost")]
    assert all(row["status"] == "ok" for row in e2e), [row["reason"] for row in e2e]
    out = capsys.readouterr().out
    assert "diffboost-linear   h2 d40: time ~ N^" in out


def test_scaling_bookkeeping():
    def row(name, n, ms):
        return {"name": name, "status": "ok", "median_ms": ms, "metrics": {}, "shapes": {"H": 8, "D": 40, "N": n}}

    rows = [row("a", 1024, 1.0), row("a", 4096, 4.0), row("a", 16384, 16.0), row("b", 1024, 1.0), row("b", 4096, 16.0)]
    bench.add_scaling(rows)
    assert "scaling_x4" not in rows[0]["metrics"]
    assert rows[1]["metrics"]["scaling_x4"] == pytest.approx(4.0) and rows[4]["metrics"]["scaling_x4"] == 16.0
    lines = bench.scaling_summary(rows)
    assert lines[0].endswith("time ~ N^1.00 over N = 1024, 4096, 16384") and "N^2.00" in lines[1]


def test_bad_dims(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--device", "cpu", "--dims", "48", "--out", str(tmp_path)])
