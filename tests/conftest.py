"""Pytest configuration: CPU by default, gpu marker skipped without CUDA, no network."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none detected)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The SmolLM2-135M fixture (30 blocks, bf16, tied embeddings), built on first use."""
    from helpers import build_smollm2

    return build_smollm2()


@pytest.fixture(scope="session")
def smollm2_4blocks(smollm2: Path) -> Path:
    """Its first 4 blocks, for the fast tests."""
    from helpers import cut_depth, smollm2_dir

    return cut_depth(smollm2, smollm2_dir() / "hf-4blocks", 4)
