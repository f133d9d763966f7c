"""errors.sigterm_stops_cleanly in-process: the first stop raises, later ones are held while
the clean-up runs, and the handlers found are put back after (a library call leaves the
process as it found it)."""

from __future__ import annotations

import os
import signal

import pytest

from deepwatch.errors import Interrupted, sigterm_stops_cleanly


@pytest.mark.usefixtures("python_sigint")
@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM])
def test_the_first_stop_raises_the_ones_after_it_are_held_then_handlers_are_restored(
        first: signal.Signals, capfd: pytest.CaptureFixture[str]) -> None:
    term_before = signal.getsignal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    cleaned = []
    with pytest.raises(Interrupted) as info, sigterm_stops_cleanly():
        try:
            os.kill(os.getpid(), first)
            raise AssertionError("the first stop did not raise")
        finally:  # the clean-up of what was kept: more stops of either kind do not cut it
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGINT):
                os.kill(os.getpid(), sig)
            cleaned.append(True)
    assert cleaned == [True]
    assert info.value.terminated is (first == signal.SIGTERM)
    err = capfd.readouterr().err
    assert err.count("already stopping") == 1, err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is term_before
    with pytest.raises(KeyboardInterrupt):  # the next run's Ctrl-C is a plain one again
        os.kill(os.getpid(), signal.SIGINT)


def test_a_run_with_no_stop_changes_nothing_and_an_ignored_sigint_stays_ignored() -> None:
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # (a background job's)
    try:
        with sigterm_stops_cleanly():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)  # ignored: nothing raised
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.usefixtures("python_sigint")
def test_a_block_entered_during_the_clean_up_keeps_holding_stops() -> None:
    """With SIGTERM ignored only SIGINT is taken; a block entered while the first stop is being
    handled (a clean-up that writes through another such block) must not start over and let
    the next Ctrl-C raise in the middle of it."""
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cleaned = []
    try:
        with pytest.raises(Interrupted), sigterm_stops_cleanly():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                raise AssertionError("the first stop did not raise")
            finally:
                with sigterm_stops_cleanly():
                    os.kill(os.getpid(), signal.SIGINT)  # held: nothing raised here
                    cleaned.append(True)
        assert cleaned == [True]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, before)
