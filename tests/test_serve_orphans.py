"""The end of a ``serve --workers`` worker whose parent was killed outright: the workers remove
the shared state directory, and the last of them to end removes it last, so that a sibling's
stats written into it during another's removal do not leave it behind."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from deepwatch.serve._workers import WorkerGroup, _last_words, _WorkerEnd

GONE = -1  # a parent pid that is never this process's parent: the parent is gone


class _Stats:
    def __init__(self, requests: int) -> None:
        self.requests = requests

    def raw(self) -> dict[str, Any]:
        return {"requests": self.requests}


def _state(tmp_path: Path) -> Path:
    state = tmp_path / "deepwatch-serve-x"
    (state / "stats").mkdir(parents=True)
    (state / "prometheus").mkdir()
    (state / "lock").touch()
    return state


def test_the_last_orphaned_worker_to_end_removes_what_a_sibling_wrote_during_a_removal(
        tmp_path: Path) -> None:
    state = _state(tmp_path)
    group = WorkerGroup(state)
    first, last = _WorkerEnd(state, GONE), _WorkerEnd(state, GONE)
    _last_words(group, _Stats(1), 101, first)
    assert not state.exists()
    # the other worker's stats landed between the first removal's listing and its rmdir
    (state / "stats").mkdir(parents=True)
    (state / "stats" / "102.json").write_text(json.dumps(_Stats(2).raw()))
    _last_words(group, _Stats(2), 102, last)
    assert not state.exists()


def test_an_orphaned_workers_stats_thread_stops_writing(tmp_path: Path) -> None:
    state = _state(tmp_path)
    group = WorkerGroup(state)
    end = _WorkerEnd(state, os.getppid())
    assert end.publish(group, _Stats(3))  # the parent is there: published, and goes on
    assert json.loads((state / "stats" / f"{os.getpid()}.json").read_text()) == {"requests": 3}
    end = _WorkerEnd(state, GONE)  # the same worker, once its parent is gone
    assert not end.publish(group, _Stats(4))
    assert json.loads((state / "stats" / f"{os.getpid()}.json").read_text()) == {"requests": 3}
    assert end.orphaned()


def test_a_worker_stopped_by_its_parent_publishes_its_last_stats_and_keeps_the_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _state(tmp_path)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(state / "prometheus"))
    live = state / "prometheus" / f"gauge_livemin_{os.getpid()}.db"
    live.touch()  # a live gauge of this worker's, dropped from /metrics as it ends
    group = WorkerGroup(state)
    end = _WorkerEnd(state, os.getppid())
    _last_words(group, _Stats(5), os.getpid(), end)
    assert json.loads((state / "stats" / f"{os.getpid()}.json").read_text()) == {"requests": 5}
    assert (state / "lock").exists()
    assert not live.exists()
    assert not end.orphaned()


def test_a_worker_whose_parent_died_after_telling_it_to_stop_removes_the_state(
        tmp_path: Path) -> None:
    # SIGTERM from the parent, then the parent killed before it could remove the directory:
    # the orphan watcher has not looked yet (it looks once a second), the last words do
    state = _state(tmp_path)
    _last_words(WorkerGroup(state), _Stats(6), 103, _WorkerEnd(state, GONE))
    assert not state.exists()
