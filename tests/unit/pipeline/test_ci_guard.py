"""In CI a missing corpus or model fails the run instead of skipping the tests that need it."""

from __future__ import annotations

from pathlib import Path

import conftest
import pytest


def test_ci_fails_the_session_when_the_corpus_is_missing(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(conftest, "IN_CI", True)
    monkeypatch.setattr(conftest, "AN4", tmp_path / "no-an4")
    with pytest.raises(pytest.exit.Exception, match="no-an4"):
        conftest.pytest_sessionstart(None)


def test_outside_ci_a_missing_corpus_only_skips(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(conftest, "IN_CI", False)
    monkeypatch.setattr(conftest, "AN4", tmp_path / "no-an4")
    conftest.pytest_sessionstart(None)  # no exit


def test_ci_with_everything_present_starts(monkeypatch) -> None:
    if not (conftest.AN4.is_dir() and conftest.FSDD.is_dir()):
        pytest.skip("corpora not present here")
    monkeypatch.setattr(conftest, "IN_CI", True)
    conftest.pytest_sessionstart(None)
