"""CPU microbenchmarks (pytest-benchmark): torch SDPA vs diffboost's reference attention on CPU-sized shapes.

    pytest benchmarks/ --benchmark-only

Each model family contributes its first attention shape, shrunk as in ``bench_attention --quick``.
"""

import pytest
import torch
import torch.nn.functional as F

from benchmarks.bench_attention import FAMILIES, make_inputs

SHAPES = [family[0].tiny() for family in FAMILIES.values()]


@pytest.fixture(params=SHAPES, ids=lambda shape: shape.name)
def attention_inputs(request, benchmark):
    """(q, k, v) for one shape; the shape names the benchmark group so each table compares like with like."""
    benchmark.group = request.param.name
    return make_inputs(request.param, torch.bfloat16, "cpu")


def test_sdpa(benchmark, attention_inputs):
    benchmark(F.scaled_dot_product_attention, *attention_inputs)


@pytest.mark.parametrize("precision", ["exact", "int8"])
def test_diffboost_reference(benchmark, attention_inputs, precision):
    ops = pytest.importorskip("diffboost.ops")
    benchmark(ops.attention, *attention_inputs, precision=precision, backend="reference")
