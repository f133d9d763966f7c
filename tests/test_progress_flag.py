"""``DEEPWATCH_PROGRESS`` turns progress off with any usual spelling of "no"."""

from __future__ import annotations

import pytest

from deepwatch import progress


@pytest.mark.parametrize("flag", ["0", "false", "no", "off", "OFF", "False", " No "])
def test_off_spellings(flag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPWATCH_PROGRESS", flag)
    assert progress.mode() == "off" and not progress.enabled()


@pytest.mark.parametrize("flag", ["1", "yes", "on", "true"])
def test_on_spellings(flag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPWATCH_PROGRESS", flag)
    assert progress.mode() == "bars"
