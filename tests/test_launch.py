"""diffboost.kernels._launch: a config whose resources the GPU lacks gives way to the next one, and the one that
fitted is remembered (Triton raises OutOfResources when it loads a kernel that needs more shared memory than the
device has: the same tiles fit an H100 and not an RTX 4090)."""

from __future__ import annotations

import pytest
import triton

from diffboost.kernels._launch import launch_first_fitting


class FakeKernel:
    """Records each launch; configs whose BLOCK_N exceeds ``max_block_n`` do not fit."""

    __name__ = "fake_kernel"

    def __init__(self, max_block_n: int) -> None:
        self.max_block_n = max_block_n
        self.tried: list[int] = []
        self.ran: list[tuple] = []

    def __getitem__(self, grid):
        def launch(*args, BLOCK_N, num_warps, num_stages, **meta):
            self.tried.append(BLOCK_N)
            if BLOCK_N > self.max_block_n:
                raise triton.OutOfResources(BLOCK_N * 2048, self.max_block_n * 2048, "shared memory")
            self.ran.append((grid, args, meta, BLOCK_N))
        return launch


CONFIGS = [triton.Config({"BLOCK_N": n}, num_warps=4, num_stages=2) for n in (128, 64, 32)]


def test_falls_back_to_the_first_config_that_fits_and_remembers_it():
    kernel = FakeKernel(max_block_n=64)
    launch_first_fitting(kernel, "grid", (1, 2), {"D": 40}, CONFIGS, key="shape-a")
    assert kernel.tried == [128, 64] and kernel.ran == [("grid", (1, 2), {"D": 40}, 64)]
    launch_first_fitting(kernel, "grid", (3, 4), {"D": 40}, CONFIGS, key="shape-a")
    assert kernel.tried == [128, 64, 64], "the config that fitted is tried first next time"
    launch_first_fitting(kernel, "grid", (3, 4), {"D": 40}, CONFIGS, key="shape-b")
    assert kernel.tried[3:] == [128, 64], "a different shape class starts over"


def test_raises_when_nothing_fits():
    kernel = FakeKernel(max_block_n=16)
    with pytest.raises(triton.OutOfResources):
        launch_first_fitting(kernel, "grid", (), {}, CONFIGS, key="shape-c")
    assert kernel.tried == [128, 64, 32] and not kernel.ran
