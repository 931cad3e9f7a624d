"""Shared fixtures: tiny random checkpoints made on the spot, and the real default model (cached)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import make_tiny_llama

# Offline assets (wheels, corpus) are fetched once into a cache shared by all test runs on the machine.
os.environ.setdefault("XFP_CACHE", str(Path.home() / ".cache" / "xfp"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "src")
