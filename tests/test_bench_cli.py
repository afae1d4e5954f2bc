"""``diffboost bench``: end to end on the tiny preset (table, JSON, PNG), the variant logic with stand-in features,
argument errors (exit code 2), ``bench kernels`` discovery, and the README results generator."""

import contextlib
import io
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from diffboost import patching
from diffboost.bench import pipeline as bench_pipeline
from diffboost.bench import report
from diffboost.bench.kernels import find_benchmarks, list_scripts
from diffboost.bench.pipeline import Settings, Variant, plan_variants, psnr, run_benchmark
from diffboost.cli import main
from diffboost.models import build_pipeline, example_inputs

# benchmarks/ is a directory of scripts next to the package, not part of the installed diffboost.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import readme_results  # noqa: E402

FAST = ["--preset", "tiny", "--device", "cpu", "--steps", "2", "--repeat", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _images(pipe, steps=2):
    with torch.no_grad():
        return pipe(**example_inputs(pipe, steps=steps)).images


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One CLI run on the tiny preset with attention and cache: (exit code, stdout, JSON document, PNG path).
    Shared by several tests (module scope), so stdout is captured here rather than with capsys."""
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "sub" / "bench.json", out / "bench.png"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["bench", *FAST, "--features", "attention,cache", "--json", str(json_path), "--plot",
                     str(png_path)])
    return code, stdout.getvalue(), json.loads(json_path.read_text()), png_path


def test_cli_tiny_prints_table_and_writes_json_and_png(cli_run):
    code, stdout, doc, png = cli_run
    assert code == 0
    names = [row["name"] for row in doc["rows"]]
    assert names == ["unpatched", "attention=exact", "attention=int8", "cache=3", "combined"]
    header = next(line for line in stdout.splitlines() if line.startswith("variant"))
    for column in ("s/image", "speedup", "denoiser s/image", "peak MiB", "PSNR dB"):
        assert column in header
    for name in names:
        assert any(line.startswith(name) for line in stdout.splitlines()), name
    assert "64x64 px, 2 steps" in stdout
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert doc["config"]["device"] == "cpu" and doc["config"]["steps"] == 2
    assert doc["machine"]["cpu"]["model"] and doc["machine"]["versions"]["torch"] == torch.__version__
    assert doc["command"].startswith("diffboost bench --preset tiny-sd")


def test_cli_rows_measure_and_explain(cli_run):
    rows = {row["name"]: row for row in cli_run[2]["rows"]}
    base, cache = rows["unpatched"], rows["cache=3"]
    assert base["status"] == "ok" and base["identical"] and base["speedup"] == 1.0
    # Two steps with CFG in one batch: the denoiser is called once per step; its time is part of the total.
    assert base["denoiser_calls"] == 2
    assert 0 < base["denoiser_ms"] <= base["median_ms"]
    assert base["min_ms"] <= base["median_ms"] <= base["max_ms"]
    assert base["peak_memory_mib"] > 0
    # Interval 3 over 2 steps: the second step is a cached one, so the image changes, by a bounded amount.
    assert cache["status"] == "ok" and not cache["identical"]
    assert 10 < cache["psnr_db"] < 200 and cache["finite"]
    assert cache["speedup"] > 0
    # On CPU in fp32 the fused attention kernel cannot run: listed with the registry's reason, not timed.
    for name in ("attention=exact", "attention=int8"):
        assert rows[name]["status"] == "fallback"
        assert rows[name]["backends"] == {"attention": {"sdpa": rows[name]["backends"]["attention"]["sdpa"]}}
        assert any("triton" in note and "float32" in note for note in rows[name]["fallbacks"])
    # The combined row is timed because caching works here, and says attention fell back.
    assert rows["combined"]["features"] == {"attention": "int8", "cache": 3}
    assert rows["combined"]["status"] == "ok" and rows["combined"]["fallbacks"]


def _stand_in(monkeypatch, name, order, install, uninstall):
    """Register a feature for this test only, with one benchmark setting."""
    feature = patching.Feature(name, order, lambda value: value, install, uninstall)
    monkeypatch.setitem(patching._FEATURES, name, feature)
    monkeypatch.setitem(bench_pipeline.FEATURE_VARIANTS, name, ("on",))


def test_run_benchmark_restores_the_pipeline_and_lists_what_does_not_apply(monkeypatch):
    def refuse(pipe, config):
        raise ValueError("stand-in: this pipeline has no such layers")

    _stand_in(monkeypatch, "refuser", 1, refuse, None)
    pipe = build_pipeline("tiny")
    before = _images(pipe)
    variants, unbenchmarked = plan_variants(["refuser", "cache"])
    assert [v.name for v in variants] == ["unpatched", "refuser=on", "cache=3"] and not unbenchmarked
    rows, notes = run_benchmark(lambda: pipe, variants, Settings(64, 64, steps=1, repeat=1, warmup=0),
                                device=torch.device("cpu"), progress=None)
    by_name = {row["name"]: row for row in rows}
    assert by_name["refuser=on"]["status"] == "n/a" and "no such layers" in by_name["refuser=on"]["reason"]
    assert by_name["cache=3"]["status"] == "ok"
    assert "combined" not in by_name  # cache is the only one of COMBINED's features here
    assert not patching.is_patched(pipe)
    assert torch.equal(_images(pipe), before)


def test_run_benchmark_reloads_a_pipeline_that_unpatch_cannot_restore(monkeypatch):
    def uninstall(pipe, state):
        raise RuntimeError("stand-in: original weights were not kept")

    _stand_in(monkeypatch, "one_way", 1, lambda pipe, config: config, uninstall)
    pipes = []

    def load():
        pipes.append(build_pipeline("tiny"))
        return pipes[-1]

    variants, _ = plan_variants(["one_way", "cache"])
    rows, notes = run_benchmark(load, variants, Settings(64, 64, steps=1, repeat=1, warmup=0),
                                device=torch.device("cpu"), progress=None)
    assert [row["status"] for row in rows] == ["ok", "ok", "ok"]
    assert "not kept" in rows[1]["unpatch_error"]
    assert len(pipes) == 2 and any("reloaded" in note for note in notes)
    assert not patching.is_patched(pipes[1])  # cache=3 ran on, and was removed from, the fresh copy


def test_plan_variants_lists_registered_features_without_a_setting(monkeypatch):
    monkeypatch.setitem(patching._FEATURES, "novel", patching.Feature("novel", 99, lambda v: v, None, None))
    variants, unbenchmarked = plan_variants()
    assert variants[0] == Variant("unpatched", {})
    assert unbenchmarked == ["novel"]
    assert {"attention=exact", "attention=int8"} <= {v.name for v in variants}


def test_lpips_is_used_when_installed(monkeypatch):
    """A stand-in ``lpips`` module: the benchmark maps images to [-1, 1] and averages the per-image distances."""
    seen = []

    class FakeLPIPS(torch.nn.Module):
        def __init__(self, net, verbose):
            super().__init__()
            assert net == "alex"

        def forward(self, a, b):
            seen.append((a.min().item(), a.max().item()))
            return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    metric = bench_pipeline._Lpips(torch.device("cpu"))
    assert metric.reason is None
    images = torch.zeros(2, 3, 8, 8)
    assert metric(images, images + 0.25) == pytest.approx(0.5)
    assert seen == [(-1.0, -1.0)]


def test_lpips_missing_is_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)
    metric = bench_pipeline._Lpips(torch.device("cpu"))
    assert metric(torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)) is None
    assert "lpips package is not installed" in metric.reason


def test_table_columns_and_footnotes():
    def row(name, **values):
        return {**bench_pipeline._new_row(Variant(name, {})), **values}

    timed = {"median_ms": 2000.0, "min_ms": 1900.0, "max_ms": 2100.0, "denoiser_ms": 1500.0, "speedup": 1.0,
             "peak_memory_mib": 512.0, "finite": True}
    rows = [
        row("unpatched", identical=True, **timed),
        row("a=1", psnr_db=31.234, lpips=0.0123, **timed),
        row("a=2", **{**timed, "finite": False}),
        row("b=1", status="fallback", reason="not timed", fallbacks=["op ran PyTorch 'ref' (why)"],
            backends={"op": {"ref": 3}}),
        row("c=1", status="n/a", reason="not timed"),
    ]
    headers, cells, footnotes = report.table(rows)
    assert headers[-4:] == ["PSNR dB", "LPIPS", "ops ran", "note"]
    by_name = {line[0]: dict(zip(headers, line)) for line in cells}
    assert by_name["unpatched"]["PSNR dB"] == "identical" and by_name["unpatched"]["s/image"] == "2.000"
    assert by_name["a=1"]["PSNR dB"] == "31.23" and by_name["a=1"]["LPIPS"] == "0.0123"
    assert by_name["a=2"]["PSNR dB"] == "non-finite output"
    assert by_name["b=1"]["note"] == "fallback [1] [2]" and by_name["b=1"]["ops ran"] == "op: ref"
    assert by_name["c=1"]["note"] == "n/a [1]"  # the same reason is one footnote
    assert footnotes == ["[1] not timed", "[2] op ran PyTorch 'ref' (why)"]
    assert "| a=1 | 2.000 | 1.900-2.100 | 1.00x |" in report.markdown(rows)


def test_psnr():
    a = torch.rand(1, 3, 8, 8)
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-6)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "nope"], "unknown diffboost preset 'nope'"),
        (["--model", "{tmp}/missing"], "no such directory"),
        (["--model", "{tmp}/empty"], "no model_index.json"),
        (["--size", "100"], "100 px is not a positive multiple of 8"),
        (["--size", "64x60"], "60 px is not a positive multiple of 8"),
        (["--size", "big"], "is not a size"),
        (["--steps", "0"], "0 must be >= 1"),
        (["--preset", "tiny", "--features", "bogus"], "unknown bogus; installed features: "),
        (["--preset", "tiny-flux", "--size", "72"], "FluxPipeline needs multiples of 16 px"),
        (["--preset", "tiny", "--model", "{tmp}/index"], "not allowed with argument"),
        (["--device", "tpu"], "use auto, cpu, cuda or cuda:N"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(argv, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "model_index.json").write_text("{}")
    with pytest.raises(SystemExit) as excinfo:
        main(["bench", *(arg.format(tmp=tmp_path) for arg in argv)])
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where no CUDA device exists")
def test_cuda_device_without_cuda_exits_2(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["bench", "--preset", "tiny", "--device", "cuda"])
    assert excinfo.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_plot_without_matplotlib_exits_2_before_running(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(SystemExit) as excinfo:
        main(["bench", *FAST, "--plot", str(tmp_path / "x.png")])
    assert excinfo.value.code == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_model_directory(tmp_path, capsys):
    build_pipeline("tiny").save_pretrained(tmp_path / "pipe")
    code = main(["bench", "--model", str(tmp_path / "pipe"), "--device", "cpu", "--steps", "1", "--repeat", "1",
                 "--features", "cache", "--no-combined"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"{tmp_path / 'pipe'}, 64x64 px, 1 steps" in out
    assert "cache=3" in out


def test_python_m_diffboost_bench_help():
    result = subprocess.run([sys.executable, "-m", "diffboost", "bench", "--help"], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "--preset" in result.stdout and "--model" in result.stdout and "kernels" in result.stdout


def test_bench_kernels_finds_and_runs_scripts(tmp_path, capsys):
    assert "attention" in list_scripts(find_benchmarks(start=REPO_ROOT))
    fake = tmp_path / "benchmarks"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "harness.py").write_text("")
    (fake / "bench_ok.py").write_text("import sys\nprint('ARGS', *sys.argv[1:])\n")
    (fake / "bench_broken.py").write_text("import sys\nsys.exit(3)\n")
    assert main(["bench", "kernels", "--benchmarks", str(fake), "--list"]) == 0
    assert "broken" in capsys.readouterr().out
    out_dir = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "diffboost", "bench", "kernels", "--benchmarks", str(fake), "--quick", "--out",
         str(out_dir)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1  # bench_broken failed; bench_ok still ran
    assert f"ARGS --quick --out {out_dir}" in result.stdout
    assert "failed: broken" in result.stderr
    with pytest.raises(SystemExit) as excinfo:
        main(["bench", "kernels", "--benchmarks", str(fake), "nope"])
    assert excinfo.value.code == 2


def test_bench_kernels_without_checkout_says_so(tmp_path, capsys):
    assert main(["bench", "kernels", "--benchmarks", str(tmp_path)]) == 1
    assert "source checkout" in capsys.readouterr().err


def test_readme_results_regenerates_the_marked_block(cli_run, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "bench-cpu.json").write_text(json.dumps(cli_run[2]))
    for recorded in (REPO_ROOT / "benchmarks" / "results").glob("attention-*.json"):
        (results / recorded.name).write_text(recorded.read_text())
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\n<!-- results:start -->\nstale\n<!-- results:end -->\n\nafter\n")
    argv = ["--results", str(results), "--readme", str(readme)]
    assert readme_results.main([*argv, "--check"]) == 1
    assert readme_results.main(argv) == 0
    text = readme.read_text()
    assert "stale" not in text and text.startswith("# title\n") and text.endswith("\nafter\n")
    assert "| variant | s/image |" in text and "| cache=3 |" in text and "diffboost bench --preset tiny-sd" in text
    assert readme_results.main([*argv, "--check"]) == 0
    readme.write_text("no markers")
    with pytest.raises(SystemExit) as excinfo:
        readme_results.main(argv)
    assert excinfo.value.code == 2


def test_gpu_session_steps_run_real_commands():
    """Every step listed in benchmarks/gpu_session.sh's header maps to a command whose test files exist and whose
    benchmark module accepts the flags given (checked on the module's own --help)."""
    script = REPO_ROOT / "benchmarks" / "gpu_session.sh"
    header = script.read_text().split("set -uo pipefail")[0]
    steps = [line.split()[1] for line in header.splitlines() if re.match(r"#   [a-z0-9_]+ \(\d+\)", line)]
    assert {"kernels", "tests", "attn", "w4a4", "bench"} <= set(steps)
    run = subprocess.run(["bash", str(script), *steps], capture_output=True, text=True, cwd=REPO_ROOT,
                         env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "OUT": "/nonexistent"}, check=True)
    commands = dict(line.split(": ", 1) for line in run.stdout.splitlines())
    assert sorted(commands) == sorted(set(steps))
    helps: dict[tuple[str, ...], subprocess.CompletedProcess] = {}
    for step, command in commands.items():
        for part in command.split("; "):
            words = [w for w in part.split() if not re.fullmatch(r"[A-Z_]+=\S*", w)]  # environment assignments
            if words[:3] == ["python3", "-m", "pytest"]:
                files = [w for w in words if w.startswith("tests/")]
                assert files and all((REPO_ROOT / f).is_file() for f in files), (step, files)
            elif words[:2] == ["python3", "-m"]:
                subcommand = [w for w in words[3:4] if not w.startswith("-")]  # `diffboost bench`
                key = (words[2], *subcommand)
                if key not in helps:
                    helps[key] = subprocess.run([sys.executable, "-m", *key, "--help"], capture_output=True, text=True,
                                                cwd=REPO_ROOT)
                helped = helps[key]
                assert helped.returncode == 0, (step, helped.stderr)
                flags = [w for w in words[3:] if w.startswith("--")]
                assert all(flag in helped.stdout for flag in flags), (step, flags)
    bad = subprocess.run(["bash", str(script), "no_such_step"], capture_output=True, text=True, cwd=REPO_ROOT,
                         env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1"})
    assert bad.returncode == 2 and "no_such_step" in bad.stderr
