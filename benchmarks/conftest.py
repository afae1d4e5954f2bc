"""pytest wiring for the CPU microbenchmarks in this directory: ``pytest benchmarks/ --benchmark-only``.

The regular test run (``pytest``, whose testpaths is ``tests/``) never collects them, and pyproject's addopts
pass ``--benchmark-disable`` so that nothing is timed there.
"""

from benchmarks import harness


def pytest_configure(config):
    # pytest-benchmark rejects --benchmark-only together with the --benchmark-disable from addopts; asking for
    # --benchmark-only is an explicit request to time, so it re-enables timing (its own configure runs last).
    if config.getoption("benchmark_only", default=False):
        config.option.benchmark_enable = True


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record the same machine description (GPU/CPU, torch/triton/diffboost versions) as the harness."""
    machine_info["diffboost_harness"] = harness.machine_info()
