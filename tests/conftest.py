"""Shared fixtures: the tiny deterministic DELG-signature model (tests/fake_delg.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def fake_model(tmp_path_factory):
    from fake_delg import build_fake_delg

    return build_fake_delg(tmp_path_factory.mktemp("model") / "fake_delg")
