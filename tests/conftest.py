"""Test setup shared by the whole suite.

* Without a CUDA GPU, Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` must be set before any module
  that defines a ``@triton.jit`` kernel is imported, so it is set here, at conftest import time.
* Tests marked ``gpu`` are skipped — visibly, with a reason — when no CUDA GPU is present.
* Every test is seeded from its own node id: inputs are random and differ between tests, yet a failure reproduces.
* Fixtures build the tiny offline pipelines of :mod:`diffboost.models` that every feature is tested on.
"""

from __future__ import annotations

import os
import zlib

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (marker 'gpu'); none is visible")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed(request):
    seed = zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("DIFFBOOST_TEST_SEED", "0"))
    torch.manual_seed(seed)
    yield


@pytest.fixture(params=["cuda"] if HAS_CUDA else ["cpu"])
def device(request):
    """CUDA when present, else CPU with Triton under the interpreter."""
    return torch.device(request.param)


def _pipeline_fixture(preset: str):
    @pytest.fixture
    def fixture():
        from diffboost.models import build_pipeline

        return build_pipeline(preset)

    return fixture


tiny_sd = _pipeline_fixture("tiny-sd")
tiny_sdxl = _pipeline_fixture("tiny-sdxl")
tiny_flux = _pipeline_fixture("tiny-flux")
tiny_pixart = _pipeline_fixture("tiny-pixart")
tiny_sd_controlnet = _pipeline_fixture("tiny-sd-controlnet")
tiny_sd_inpaint = _pipeline_fixture("tiny-sd-inpaint")
tiny_sd_img2img = _pipeline_fixture("tiny-sd-img2img")
