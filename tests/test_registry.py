"""diffboost.ops.registry: automatic dispatch passes a backend over from a compute capability on, forcing still runs it.

No GPU is needed: the CUDA device queries the registry makes are replaced, and the backends are plain functions.
"""

from __future__ import annotations

import logging

import pytest
import torch

from diffboost.ops.registry import Backend, Op

CUDA = torch.device("cuda", 0)


def _op() -> Op:
    op = Op("registry_test_op")
    op.register(Backend(name="mma", impl=lambda: "mma", min_capability=(8, 0),
                        auto_below_capability=((9, 0), "wgmma is faster here")))
    op.register(Backend(name="wgmma", impl=lambda: "wgmma"))
    return op


@pytest.fixture
def capability(monkeypatch):
    """Pretend a CUDA device of the given capability is present."""
    def set_capability(cap):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    return set_capability


@pytest.mark.parametrize("cap,chosen", [((8, 0), "mma"), ((8, 9), "mma"), ((9, 0), "wgmma"), ((10, 0), "wgmma")])
def test_auto_passes_over_from_the_capability_on(capability, cap, chosen):
    capability(cap)
    op = _op()
    assert op.select(CUDA, torch.float16).name == chosen
    assert op.select(CUDA, torch.float16, backend="mma").name == "mma"  # forcing it still runs it


def test_passed_over_is_explained_and_logged_as_info(capability, caplog):
    capability((9, 0))
    op = _op()
    explained = dict(op.explain(CUDA))
    assert explained["wgmma"] == []
    assert explained["mma"] == ["passed over on compute capability 9.0 >= 9.0: wgmma is faster here"]
    with caplog.at_level(logging.INFO, logger="diffboost"):
        op.select(CUDA, torch.bfloat16)
    records = [r for r in caplog.records if "registry_test_op" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.INFO, "a faster backend chosen is not a warning"
    assert "wgmma is faster here" in records[0].getMessage()


def test_a_backend_that_cannot_run_is_still_a_warning(capability, caplog):
    capability((7, 5))  # below the first backend's min_capability: it cannot run, which the user should hear about
    op = _op()
    with caplog.at_level(logging.INFO, logger="diffboost"):
        assert op.select(CUDA, torch.float16).name == "wgmma"
    records = [r for r in caplog.records if "registry_test_op" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "needs compute capability >= 8.0" in records[0].getMessage()


def test_cpu_devices_are_never_passed_over():
    op = _op()
    assert op.select(torch.device("cpu"), torch.float32).name == "mma"
