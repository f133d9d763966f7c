"""What a newcomer following the README reads from the command line itself."""

from __future__ import annotations

import pytest

from deepwatch.cli import main


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main([*argv, "--help"]) == 0
    text = capsys.readouterr().out
    return " ".join(text.replace("│", " ").split())


def test_demo_help_says_it_runs_on_simulated_traffic(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo simulates the web traffic it scores (README: "runs the whole pipeline offline
    on simulated web traffic"); its help said it ran "on data at hand", as if it read the
    user's data."""
    monkeypatch.setenv("COLUMNS", "200")
    for argv in (["demo"], []):
        text = _help(argv, capsys)
        assert "simulated web traffic" in text
        assert "data at hand" not in text
