"""A SIGTERM that lands while the worker's main thread holds its stop event's lock.

Python runs a signal handler on the main thread between two steps of the code it interrupted.
``deepwatch stream --follow`` waits for its log to grow in ``stop.wait(0.2)``; ``Event.wait``
holds the event's lock on its way in and out of the sleep, and the stop's handler called
``stop.set()``, which takes that lock: it waited for its own thread for ever, and so did the
handler of every later SIGTERM (reproduced with a plain ``threading.Event`` polled while
another process sent SIGTERMs: stuck after about 5,000 of them, in ``Event.set`` under
``_acquire_restore``; a worker that did not exit after a SIGTERM was once seen in a chaos run).
The hook here sends the SIGTERM at that exact point."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from conftest import ROOT

#: Condition.wait is what Event.wait calls with the event's lock held: the first time the
#: stop's own condition is waited on (the followed log is idle), SIGTERM is sent from inside it
_HOOK = textwrap.dedent("""
    import os, signal, sys, threading

    real_wait = threading.Condition.wait
    sent = []

    def wait(self, timeout=None):
        handler = signal.getsignal(signal.SIGTERM)
        stop = getattr(getattr(handler, "__self__", None), "stop", None)
        if not sent and stop is not None and self is getattr(stop, "_cond", None):
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, the lock held
            sys.stderr.write("K6 SIGTERM SENT\\n")
        return real_wait(self, timeout)

    threading.Condition.wait = wait
    """)


def _run(code: str, tmp: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    script = tmp / "run.py"
    script.write_text(code)
    try:
        return subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("the process did not end after its SIGTERM (deaf to it): "
                             f"{exc.stderr!r:.2000}") from None


def test_a_sigterm_while_the_follow_loop_holds_the_stop_lock_stops_the_worker(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    """The real command following an idle log with a position file: it exits 0 at once, its
    lines scored and their place kept (it hung in the handler for ever)."""
    log = tmp_path / "live.csv"
    log.write_bytes(b"\n".join(small_kdd_test.read_bytes().split(b"\n")[:20]) + b"\n")
    argv = ["stream", str(kdd_bundle), "--format", "kdd", str(log), "--follow",
            "--position-file", str(tmp_path / "pos.json"),
            "--verdicts", str(tmp_path / "verdicts.jsonl"), "--out", str(tmp_path / "a.jsonl")]
    started = time.monotonic()
    done = _run(_HOOK + textwrap.dedent(f"""
        from deepwatch.cli import main
        sys.exit(main({argv!r}))
        """), tmp_path)
    took = time.monotonic() - started
    assert "K6 SIGTERM SENT" in done.stderr, done.stderr  # (the hook fired)
    assert done.returncode == 0, done.stderr
    assert "stopping after the batch in hand" in done.stderr
    assert len((tmp_path / "verdicts.jsonl").read_text().splitlines()) == 20
    assert json.loads((tmp_path / "pos.json").read_text())["line"] == 21
    assert took < 20, f"{took:.1f}s"


def test_a_plain_event_given_is_set_by_the_handler_without_waiting_on_its_lock(
        tmp_path: Path) -> None:
    """``stop_on_signals`` given a plain ``threading.Event`` (a library caller's), SIGTERM
    coming while the main thread holds the event's lock: the handler returns, and the event
    is set once the lock is let go."""
    done = _run(textwrap.dedent("""
        import os, signal, sys, threading
        from deepwatch.serve.stream import stop_on_signals

        stop = threading.Event()
        with stop_on_signals(stop):
            with stop._cond:
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(3):  # (the handler runs here, between two steps)
                    pass
            print("set", stop.wait(5))
        """), tmp_path, timeout=20)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["set", "True"], done.stdout + done.stderr


def test_a_stop_event_set_as_its_wait_begins_ends_the_wait_within_a_slice() -> None:
    """A set that comes between a wait's look at the flag and its sleep (a handler that ran
    there, on the same thread) ends even a wait without a timeout within ``STOP_WAKE_S``."""
    import threading

    from deepwatch.serve import stream

    stop = stream.StopEvent()
    cond = stop._cond
    real_wait = cond.wait

    def set_first(timeout: float | None = None) -> bool:
        stop._flag = True  # type: ignore[attr-defined] # as the handler's set does, unseen
        return real_wait(timeout)

    cond.wait = set_first  # type: ignore[method-assign]
    started = time.monotonic()
    assert stop.wait() is True
    assert time.monotonic() - started < stream.STOP_WAKE_S + 1.0
    assert not stream.StopEvent().wait(0.05)  # a timeout still ends it, unset
    assert isinstance(stop, threading.Event)


def test_a_stop_with_a_chunk_in_hand_ends_after_the_batch_in_hand(tmp_path: Path) -> None:
    """``--follow --position-file`` with a backlog: a stop after the first batch ends the
    batches there; the place kept is after it, and the rest of what was read is left in the
    file for the next start. (Every batch of the 4 MiB chunk read was scored first: with
    ``--batch-size 1`` the real command, stopped on a 26k-line backlog, went on scoring for
    5 s, then exited 1 saying its --verdicts file had not taken the batch.)"""
    import threading

    from deepwatch.serve._stream_io import FileSource
    from deepwatch.sources.follow import read_position

    log = tmp_path / "live.csv"
    log.write_bytes(b"".join(b"line %d\n" % i for i in range(1, 51)))
    pos = tmp_path / "pos.json"
    stop = threading.Event()
    source = FileSource([str(log)], follow=True, batch_size=1, position_file=str(pos))
    try:
        batches = source.batches(stop)
        first = next(batches)
        stop.set()
        rest = list(batches)
        source.commit(first)
    finally:
        source.close()
    assert (first.count, rest) == (1, [])
    kept = read_position(str(pos))
    assert kept is not None and (kept.line, kept.offset) == (2, len(b"line 1\n"))
