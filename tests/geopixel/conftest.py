"""Shared fixtures for the network tests: where the golden reference fixtures live.

The repository is checked out with the shared material beside it (``<repo>/../shared``), locally
and in CI. The parity tests must not pass silently without it, so a missing directory is a
failure with a clear message, never a skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DIR = (REPO_ROOT / ".." / "shared").resolve()
GOLDEN_TINY_DIR = SHARED_DIR / "golden" / "reference-tiny"


def golden_tiny_dir() -> Path:
    """Return ``<repo>/../shared/golden/reference-tiny``; fail the test when it is absent."""
    if not (GOLDEN_TINY_DIR / "config.json").is_file():
        pytest.fail(
            f"golden fixtures not found at {GOLDEN_TINY_DIR}: check out the shared material as "
            f"{SHARED_DIR} (a sibling 'shared' folder of the repository root)",
            pytrace=False,
        )
    return GOLDEN_TINY_DIR


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The tiny reference golden directory (``../shared/golden/reference-tiny``)."""
    return golden_tiny_dir()
