"""Shared pytest setup: importing fatrain first selects the Triton interpreter on CPU machines."""

import os
import sys

import pytest

import fatrain  # noqa: F401  (sets TRITON_INTERPRET before anything imports triton)
import torch

sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
