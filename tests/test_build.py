"""The native extension diffboost._C: it builds, imports, and tells the truth about itself.

Covers build_info() against the toolchain of this machine, cuda_runtime_info() with and without a
GPU, each CPU SIMD level against a scalar computation, diffboost.kernels being importable from the
installed package, the _ext fallback when _C cannot be loaded, and the CMake options
(configure-only, from the source checkout).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import diffboost
from diffboost import _C, _ext

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CUDA_ARCHS = ["80", "86", "89", "90a"]


def _nvcc() -> str | None:
    """The CUDA compiler a build here would find, in CMakeLists.txt's order: CUDACXX, CUDA_HOME, PATH."""
    if os.environ.get("CUDACXX"):
        return shutil.which(os.environ["CUDACXX"])
    cuda_home = os.environ.get("CUDA_HOME")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _expected_cuda_archs() -> list[str]:
    archs = os.environ.get("DIFFBOOST_CUDA_ARCHS", "").strip(",; ")
    return re.split(r"[,; ]+", archs) if archs else DEFAULT_CUDA_ARCHS


def _has_nvidia_gpu() -> bool:
    return torch.cuda.is_available() or Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia").exists()


# ---------------------------------------------------------------------------
# build_info()
# ---------------------------------------------------------------------------


def test_extension_imports_and_is_what_ext_loads():
    assert _ext.get_ext() is _C
    assert _ext.ext_error() is None
    assert Path(_C.__file__).parent.name == "diffboost"
    assert _ext.build_info() == {"available": True, **_C.build_info()}


def test_build_info_version_and_build_type():
    info = _C.build_info()
    assert info["version"] == importlib.metadata.version("diffboost")
    assert info["build_type"] == "Release"
    assert info["compilers"]["cxx"]


def test_build_info_cuda_matches_toolchain():
    info = _C.build_info()
    if info["cuda"]:
        assert _nvcc() is not None, "build_info says CUDA kernels were built, but no nvcc is found here"
        assert info["cuda_disabled_by"] is None
        assert info["cuda_archs"] == _expected_cuda_archs()
        assert info["cuda_ptx_arch"] == str(max(int(a.rstrip("a")) for a in info["cuda_archs"]))
        assert re.fullmatch(r"\d+\.\d+", info["cuda_version"])
        # nvcc's version ("NVIDIA 13.0.88") is that of the toolkit whose runtime is linked in.
        assert info["compilers"]["cuda"].split()[1].startswith(info["cuda_version"] + ".")
    else:
        reason = info["cuda_disabled_by"]
        assert reason, "a CPU-only build must say why"
        if "DIFFBOOST_BUILD_CUDA" not in reason:
            assert _nvcc() is None, f"nvcc is available ({_nvcc()}) but CUDA was not built: {reason}"
        assert info["cuda_archs"] == []
        assert info["cuda_version"] is None
        assert info["cuda_ptx_arch"] is None
        assert info["compilers"]["cuda"] is None


@pytest.mark.skipif(not shutil.which("readelf"), reason="needs binutils' readelf")
def test_extension_links_neither_torch_nor_shared_cudart():
    dynamic = subprocess.run(["readelf", "-dW", _C.__file__], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\).*\[(.+)\]", dynamic)
    assert needed, dynamic
    assert not [lib for lib in needed if re.match(r"lib(torch|c10|cudart|cuda)", lib)], needed
    # The static CUDA runtime stays private to the module (--exclude-libs), so a libcudart.so loaded
    # globally by torch cannot interpose on it.
    symbols = subprocess.run(["readelf", "--dyn-syms", "-W", _C.__file__], capture_output=True, text=True, check=True)
    defined = [line.split()[-1] for line in symbols.stdout.splitlines() if " UND " not in line and "FUNC" in line]
    assert "PyInit__C" in defined
    assert not [name for name in defined if name.startswith(("cuda", "__cuda"))]


def _embedded_cuda_code(path: str) -> tuple[set[int], set[str]]:
    """SM numbers of the cubins and the PTX ``.target`` lines embedded in a module's fatbinary.

    Reads the binary directly (the toolkit here ships no cuobjdump): each cubin is an ELF image with
    e_machine EM_CUDA (190) whose e_flags carry the SM number: bits 8-15 in CUDA ELF ABI version 8
    (current toolkits), bits 0-7 in older ones. PTX is stored as text.
    """
    data = Path(path).read_bytes()
    sms = set()
    for match in re.finditer(rb"\x7fELF", data):
        offset = match.start()
        if offset == 0 or int.from_bytes(data[offset + 18 : offset + 20], "little") != 190:
            continue
        abi_version = data[offset + 8]
        e_flags = int.from_bytes(data[offset + 48 : offset + 52], "little")
        sms.add((e_flags >> 8) & 0xFF if abi_version >= 8 else e_flags & 0xFF)
    ptx = {m.decode() for m in re.findall(rb"\.target\s+(sm_\w+)", data)}
    return sms, ptx


def test_module_embeds_code_for_the_reported_archs():
    info = _C.build_info()
    sms, ptx = _embedded_cuda_code(_C.__file__)
    if not info["cuda"]:
        assert sms == set() and ptx == set()
        return
    assert sms == {int(arch.rstrip("a")) for arch in info["cuda_archs"]}
    assert ptx == {f"sm_{info['cuda_ptx_arch']}"}


# ---------------------------------------------------------------------------
# cuda_runtime_info()
# ---------------------------------------------------------------------------


def test_cuda_runtime_info_is_consistent():
    info = _C.build_info()
    rt = _C.cuda_runtime_info()
    assert set(rt) == {"ok", "message", "runtime_version", "driver_version", "devices"}
    assert isinstance(rt["ok"], bool) and rt["message"]
    if info["cuda"]:
        major, minor = (int(x) for x in info["cuda_version"].split("."))
        assert rt["runtime_version"] == major * 1000 + minor * 10
    else:
        assert rt["runtime_version"] is None and rt["driver_version"] is None
        assert rt["ok"] is False and "built without CUDA kernels" in rt["message"]
        assert info["cuda_disabled_by"] in rt["message"]
    assert rt["ok"] == any(d["supported"] for d in rt["devices"])
    assert _ext.cuda_runtime_info() == rt


@pytest.mark.skipif(_has_nvidia_gpu(), reason="this machine has an NVIDIA GPU")
def test_cuda_runtime_info_without_gpu_is_a_clear_no():
    rt = _C.cuda_runtime_info()
    assert rt["ok"] is False
    assert rt["devices"] == []
    if _C.build_info()["cuda"]:
        assert rt["driver_version"] == 0
        assert "No NVIDIA driver found" in rt["message"]
    assert _C.cuda_runtime_info() == rt  # a stable verdict, the runtime is left usable


@pytest.mark.gpu  # skipped without a GPU by conftest.py
def test_cuda_runtime_info_matches_torch():
    archs = _C.build_info()["cuda_archs"]
    rt = _C.cuda_runtime_info()
    assert rt["driver_version"] > 0
    assert len(rt["devices"]) == torch.cuda.device_count()
    for dev in rt["devices"]:
        props = torch.cuda.get_device_properties(dev["index"])
        assert dev["name"] == props.name
        assert dev["compute_capability"] == (props.major, props.minor)
        assert dev["sm_count"] == props.multi_processor_count
        assert dev["total_memory"] == props.total_memory
        cc = f"{props.major}{props.minor}"
        if cc in archs or f"{cc}a" in archs:
            # Exact SASS is what the driver loads: sm_90a on an H100, sm_86 on an A10.
            assert dev["supported"] and dev["code"] in (f"sm_{cc}", f"sm_{cc}a"), dev
    assert rt["ok"] == any(d["supported"] for d in rt["devices"]), rt["message"]


@pytest.mark.gpu  # skipped without a GPU by conftest.py
def test_cuda_runtime_info_with_no_visible_device():
    # A fresh process: device visibility is fixed when the driver initializes.
    code = "import json, diffboost._C as C; print(json.dumps(C.cuda_runtime_info()))"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    rt = json.loads(out.stdout)
    assert rt["ok"] is False and rt["devices"] == []
    if _C.build_info()["cuda"]:
        assert "No CUDA device is visible" in rt["message"]


# ---------------------------------------------------------------------------
# CPU SIMD levels
# ---------------------------------------------------------------------------

SIMD_LEVELS = ["avx512_vnni", "avx2", "scalar"]
# /proc/cpuinfo flags that each level needs; the kernel lists them only when the OS enables the state.
SIMD_CPUINFO_FLAGS = {
    "avx512_vnni": {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"},
    "avx2": {"avx2", "fma"},
    "scalar": set(),
}
IS_X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def test_simd_levels_compiled_and_detected():
    info = _C.build_info()
    assert info["cpu_simd_compiled"] == (SIMD_LEVELS if IS_X86_64 else ["scalar"])
    assert info["cpu_simd_supported"][-1] == "scalar"
    assert set(info["cpu_simd_supported"]) <= set(info["cpu_simd_compiled"])
    assert info["cpu_simd_runtime"] == info["cpu_simd_supported"][0]


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux /proc/cpuinfo")
def test_simd_detection_agrees_with_kernel():
    flags_line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    flags = set(flags_line.split(":", 1)[1].split())
    supported = _C.build_info()["cpu_simd_supported"]
    for level in _C.build_info()["cpu_simd_compiled"]:
        assert (level in supported) == SIMD_CPUINFO_FLAGS[level].issubset(flags), level


def _int8(values) -> bytes:
    return np.asarray(values, dtype=np.int8).tobytes()


def _reference_dot(a: bytes, b: bytes) -> int:
    return int(np.dot(np.frombuffer(a, np.int8).astype(np.int64), np.frombuffer(b, np.int8).astype(np.int64)))


@pytest.mark.parametrize("level", SIMD_LEVELS)
def test_simd_selftest_matches_scalar_computation(level):
    info = _C.build_info()
    if level not in info["cpu_simd_compiled"]:
        pytest.skip(f"{level} is not compiled for this architecture")
    if level not in info["cpu_simd_supported"]:
        pytest.skip(f"this CPU does not support {level}")
    rng = np.random.default_rng(0)
    # Lengths around the 16- and 64-byte vector widths exercise the tails and masked loads.
    for n in (0, 1, 15, 16, 17, 63, 64, 65, 127, 1000, 4099):
        a = _int8(rng.integers(-128, 128, n))
        b = _int8(rng.integers(-128, 128, n))
        assert _C.simd_selftest(level, a, b) == _reference_dot(a, b), n
    # Extremes at the maximum length: -128 * -128 everywhere sums to 2^33, past int32.
    n_max = 1 << 19
    for a_val, b_val in ((-128, -128), (-128, 127), (127, -128)):
        a, b = _int8(np.full(n_max, a_val)), _int8(np.full(n_max, b_val))
        assert _C.simd_selftest(level, a, b) == a_val * b_val * n_max
    with pytest.raises(ValueError, match="at most"):
        _C.simd_selftest(level, bytes(n_max + 1), bytes(n_max + 1))


_THREADS_SCRIPT = r"""
import torch
from diffboost import _C  # the module itself, not through diffboost._ext: nothing attached yet

assert _C.openmp_runtime() is None
torch.manual_seed(0)
m, k, n, g = 300, 256, 520, 64
qx, qw = torch.randint(0, 256, (m, k // 2), dtype=torch.uint8), torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
ascales, wscales = torch.rand(k // g, m), torch.rand(k // g, n)

def gemm():
    out = torch.full((m, n), float("nan"))
    _C.w4a4_gemm_cpu("auto", qx.data_ptr(), ascales.data_ptr(), m, qw.data_ptr(), wscales.data_ptr(), n, k, g, 0, 0,
                     0, 0, out.data_ptr(), 0, n, 2)
    return out

own = gemm()  # on threads of its own
print(_C.use_openmp_runtime("/no/such/libgomp.so.1"))
assert _C.openmp_runtime() is None
from diffboost import _ext
print(_ext.cpu_threads())
team = gemm()
print("same:", torch.equal(own, team), "path:", _C.openmp_runtime())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OpenMP team is found in /proc/self/maps")
def test_cpu_kernels_run_on_torchs_openmp_team_with_the_same_results():
    """Loaded through diffboost, _C runs its threads on torch's OpenMP team (torch's CPU builds use OpenMP), and a
    GEMM over many tiles gives the same bits as on threads of its own; a library the process has not loaded is
    refused without a change."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's CPU thread pool is not OpenMP")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "/no/such/libgomp.so.1 is not loaded in this process"
    assert lines[1].startswith("torch's OpenMP team (") and "omp" in lines[1]
    assert lines[2].startswith("same: True path: ") and lines[2].endswith(lines[1][len("torch's OpenMP team ("):-1])
    assert _ext.cpu_threads().startswith("torch's OpenMP team")


def test_simd_selftest_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown SIMD level"):
        _C.simd_selftest("sse9", b"", b"")
    with pytest.raises(ValueError, match="differ in length"):
        _C.simd_selftest("scalar", b"\x01", b"")
    with pytest.raises(TypeError):
        _C.simd_selftest("scalar", "not bytes", "not bytes")
    info = _C.build_info()
    unsupported = [level for level in info["cpu_simd_compiled"] if level not in info["cpu_simd_supported"]]
    for level in unsupported:  # refused instead of dying with SIGILL
        with pytest.raises(RuntimeError, match="does not support"):
            _C.simd_selftest(level, b"\x01", b"\x01")


# ---------------------------------------------------------------------------
# diffboost.kernels
# ---------------------------------------------------------------------------


def test_kernels_package_importable():
    import diffboost.kernels

    assert diffboost.kernels.__doc__
    kernels_dir = Path(diffboost.kernels.__file__).parent
    assert kernels_dir.name == "kernels"
    # Editable installs run the repository's kernels/ in place; wheels carry a copy inside the package.
    assert kernels_dir in (REPO / "kernels", Path(diffboost.__file__).parent / "kernels")


# ---------------------------------------------------------------------------
# _ext fallback
# ---------------------------------------------------------------------------


@pytest.fixture
def fresh_ext(monkeypatch):
    """_ext as if nothing had been loaded yet in this process (restored afterwards)."""
    monkeypatch.setattr(_ext, "_attempted", False)
    monkeypatch.setattr(_ext, "_ext", None)
    monkeypatch.setattr(_ext, "_error", None)
    return _ext


def test_ext_fallback_warns_once_and_keeps_the_reason(fresh_ext, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffboost._C", None)  # makes `import diffboost._C` raise ImportError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fresh_ext.get_ext() is None
        assert fresh_ext.get_ext() is None
        reason = fresh_ext.ext_error()
        info = fresh_ext.build_info()
        rt = fresh_ext.cuda_runtime_info()
    ours = [w for w in caught if "diffboost._C" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert ours[0].category is RuntimeWarning
    assert re.match(r"(ModuleNotFound|Import)Error: .*diffboost\._C", reason), reason
    assert reason in str(ours[0].message)
    assert info == {"available": False, "error": reason, "cuda": False}
    assert rt["ok"] is False and reason in rt["message"] and rt["devices"] == []


def test_ext_fallback_on_oserror(fresh_ext, monkeypatch):
    def fail(name):
        raise OSError("libfoo.so: cannot open shared object file")

    monkeypatch.setattr(fresh_ext, "importlib", types.SimpleNamespace(import_module=fail))
    with pytest.warns(RuntimeWarning, match="libfoo.so"):
        assert fresh_ext.get_ext() is None
    assert fresh_ext.ext_error() == "OSError: libfoo.so: cannot open shared object file"


def test_ext_does_not_hide_other_errors(fresh_ext, monkeypatch):
    def fail(name):
        raise RuntimeError("bug while initializing the module")

    monkeypatch.setattr(fresh_ext, "importlib", types.SimpleNamespace(import_module=fail))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning either
        with pytest.raises(RuntimeError, match="bug while initializing"):
            fresh_ext.get_ext()


# ---------------------------------------------------------------------------
# CMake options (configure only, from the source checkout)
# ---------------------------------------------------------------------------


def _configure(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import pybind11

    cmd = [
        "cmake", "-S", str(REPO), "-B", str(tmp_path / "build"),
        f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", *args,
    ]  # fmt: skip
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFBOOST_")}
    full_env.update(env or {})
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True)


def _generated_header(tmp_path: Path) -> str:
    return (tmp_path / "build" / "generated" / "diffboost_build_config.h").read_text()


needs_source_and_cmake = pytest.mark.skipif(
    not (REPO / "CMakeLists.txt").exists() or not shutil.which("cmake"), reason="needs the source tree and cmake"
)


@needs_source_and_cmake
@pytest.mark.parametrize(
    ("args", "env", "reason"),
    [
        ((), {"DIFFBOOST_BUILD_CUDA": "0"}, "environment variable DIFFBOOST_BUILD_CUDA=0"),
        (("-DDIFFBOOST_BUILD_CUDA=OFF",), {}, "CMake option DIFFBOOST_BUILD_CUDA=OFF"),
        # The environment wins over the cache, so `DIFFBOOST_BUILD_CUDA=0 pip install` always works.
        (
            ("-DDIFFBOOST_BUILD_CUDA=ON",),
            {"DIFFBOOST_BUILD_CUDA": "off"},
            "environment variable DIFFBOOST_BUILD_CUDA=off",
        ),
    ],
    ids=["env", "option", "env-over-option"],
)
def test_cmake_cpu_only_build(tmp_path, args, env, reason):
    result = _configure(tmp_path, *args, env=env)
    assert result.returncode == 0, result.stderr
    assert f"CUDA kernels OFF: {reason}" in result.stdout
    header = _generated_header(tmp_path)
    assert f'#define DIFFBOOST_CUDA_DISABLED_BY "{reason}"' in header
    assert '#define DIFFBOOST_CUDA_ARCHS ""' in header


@needs_source_and_cmake
@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"DIFFBOOST_BUILD_CUDA": "flase"}, "is not a boolean"),
        ({"DIFFBOOST_CUDA_ARCHS": "80;sm_90"}, "'sm_90' is not an SM number"),
        ({"DIFFBOOST_CUDA_ARCHS": ";"}, "DIFFBOOST_CUDA_ARCHS is empty"),
    ],
    ids=["bad-bool", "bad-arch", "no-arch"],
)
def test_cmake_rejects_bad_settings(tmp_path, env, error):
    result = _configure(tmp_path, env=env)
    assert result.returncode != 0
    assert error in result.stderr


@needs_source_and_cmake
@pytest.mark.skipif(_nvcc() is None, reason="needs nvcc")
def test_cmake_cuda_arch_flags(tmp_path):
    result = _configure(tmp_path, env={"DIFFBOOST_CUDA_ARCHS": "86,90a"})
    assert result.returncode == 0, result.stderr
    assert "CUDA kernels ON" in result.stdout and "archs 86;90a, PTX 90" in result.stdout
    header = _generated_header(tmp_path)
    assert '#define DIFFBOOST_CUDA_ARCHS "86;90a"' in header
    assert '#define DIFFBOOST_CUDA_PTX_ARCH "90"' in header
    # SASS for each listed arch, PTX only for the portable form of the highest.
    build_files = [*tmp_path.glob("build/build.ninja"), *tmp_path.glob("build/**/flags.make")]
    flags = "\n".join(f.read_text() for f in build_files)
    for gencode in ("compute_86,code=[sm_86]", "compute_90a,code=[sm_90a]", "compute_90,code=[compute_90]"):
        assert f"arch={gencode}" in flags
    assert flags.count("code=[compute_") == 1
