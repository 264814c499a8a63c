"""Fixtures shared by the stage tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_tiny_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """20 shards of 8 pairs (read-only)."""
    return make_tiny_corpus(tmp_path_factory.mktemp("corpus20"), n=160, shard_size=8)
