"""Triton kernels of diffboost, importable as ``diffboost.kernels``.

This directory sits at the top of the repository and is mapped into the package by
``[tool.scikit-build.wheel.packages]`` in pyproject.toml: copied into wheels, and pointed at in
place by editable installs. Importing this package is cheap; kernel modules import triton.
"""
