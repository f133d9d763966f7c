"""``serve --workers N``: N processes answer on one listening socket.

The parent binds the socket, checks the bundle, and hands both to uvicorn's supervisor, which
starts the workers (fresh interpreters), restarts any that die, and on SIGHUP replaces them one
by one, each replacement serving before its predecessor stops: a rolling reload that drops no
request. The workers share a state directory the parent made (and removes on exit):

- ``settings.json``: the bundle to serve, its generation, the key file, engine and limits (and
  the TLS files' paths, and the request-head deadline, which bounds TLS handshakes too); a
  worker reads it when it starts;
- ``prometheus/``: every worker's metric values (``/metrics`` adds them up, see ``_metrics``);
- ``stats/PID.json``: every worker's recent activity, rewritten each second, merged by
  ``/v1/stats`` for the dashboard; ``stats/retired.json``: the activity of the workers that are
  gone (replaced, stopped, dead), into which the parent folds their files (one file, however
  many reloads: ``/v1/stats`` reads every file on each poll);
- ``lock``: held (shared) by the parent and every worker for as long as they run. A server
  whose processes were all killed outright (SIGKILL to the group, as a stop timing out ends
  in) removes nothing: the next ``serve --workers`` removes the directories whose lock nobody
  holds, so they do not pile up in the temporary directory (``deepwatch._held_dirs``).

``POST /v1/reload`` on any worker loads the new bundle there first (a bundle that fails to load
is refused and nothing changes), records it in ``reload.json`` and asks the parent, by SIGHUP,
to replace the workers. SIGHUP sent by an operator re-reads the bundle the same way. Only the
parent writes ``settings.json``: a replacement takes ``reload.json`` (the newest request) when it
starts, and every SIGHUP queued while one runs is merged into a single replacement after it.
SIGINT/SIGTERM go ahead of queued reloads and cut a replacement short, so stopping is prompt.
With TLS the parent checks the certificate and key (and reads the password file) again before a
replacement, as at start: a pair that cannot work refuses the reload (one warning line) and the
workers serve on; the worker that gets ``POST /v1/reload`` makes the same check first. The pair
checked goes to the workers with uvicorn's config: one whose files do not load when it starts (a
renewal half-way) serves that pair instead (see ``worker_ssl_context``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from socket import socket
from typing import Any

from .._cpus import usable_cores
from .._held_dirs import LOCK, hold_lock, make_held_dir, remove_unheld_dirs
from ._service import Limits
from ._stats import fold_retired, is_folded

log = logging.getLogger("deepwatch.serve")

#: The state directory's path, in the workers' environment.
STATE_ENV = "DEEPWATCH_SERVE_STATE"
#: The state directories' names, in the temporary directory.
STATE_PREFIX = "deepwatch-serve-"
SETTINGS = "settings.json"
#: A worker's request for a reload: the bundle to serve next (the newest request wins).
RELOAD = "reload.json"
#: The gone workers' stats, folded into one file by the parent (see ``retire_gone_stats``).
RETIRED = "retired.json"
#: The signals that stop the server; they go ahead of any reload queued with them.
STOP_SIGNALS = frozenset(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGBREAK")
                         if hasattr(signal, name))
STATS_EVERY_SECONDS = 1.0
#: How long a worker told to stop (replaced on reload, or the server stopping) goes on reading
#: the connections it has already taken, with no new ones taken, before uvicorn closes those
#: that have not begun a request: time for a request already sent (or a TLS handshake already
#: begun) on a just-taken connection to arrive and be answered rather than cut off.
DRAIN_SECONDS = 1.0


#: ``_write_json``'s temporary files: ``.NAME.PID-RANDOM.tmp``, PID the writing process.
_TMP_NAME = re.compile(r"^\..+\.(\d+)-[0-9a-f]+\.tmp$")


def _tmp_path(path: Path) -> Path:
    """Where ``_write_json`` writes ``path`` before renaming it: hidden (no reader globs it),
    named for the writing process (the parent tells a gone worker's leftover from a live one's,
    see ``remove_gone_writers_temps``) and unique per write: a worker's stats thread and its
    last words at shutdown may write the same file at once, and with one name between them the
    first rename would take the other's file half-written and the second would fail."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = _tmp_path(path)
    try:
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except BaseException:  # a name used once is never overwritten: do not leave it behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_settings(state: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((state / SETTINGS).read_text())
    return data


class WorkerGroup:
    """What a worker knows of its siblings: the shared state directory and the parent."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.stats_dir = state / "stats"

    def publish_stats(self, raw: dict[str, Any]) -> None:
        _write_json(self.stats_dir / f"{os.getpid()}.json", raw)

    def all_stats(self) -> list[dict[str, Any]]:
        """Every worker's recent activity, this server's stopped workers' too (their counts
        stay in the totals): the workers' files, then ``retired.json``.

        In that order: the parent writes ``retired.json`` with a gone worker's activity before
        it removes the worker's file, so a worker read here is either in its own file, or in
        ``retired.json``, or in both, and then its own file is skipped (``folded`` names it,
        with its start stamp: a pid may be a later worker's)."""
        found = []
        for f in _worker_files(self.stats_dir):
            try:
                found.append((int(f.stem), json.loads(f.read_text())))
            except (OSError, ValueError):
                continue  # a worker's file being replaced or folded this instant
        try:
            retired: dict[str, Any] = json.loads((self.stats_dir / RETIRED).read_text())
        except (OSError, ValueError):  # no worker gone yet
            return [raw for _, raw in found]
        folded = retired.get("folded", {})
        return [*(raw for pid, raw in found if not is_folded(folded, pid, raw)), retired]

    def reload_all(self, bundle: Path) -> None:
        """Make ``bundle`` the one every worker serves, and have the parent replace them.

        The parent takes the request when a replacement starts; requests made while one runs
        are merged into the next, which serves the newest of them."""
        _write_json(self.state / RELOAD, {"bundle": str(bundle)})
        os.kill(os.getppid(), signal.SIGHUP)


def _worker_files(stats_dir: Path) -> list[Path]:
    return sorted(f for f in stats_dir.glob("*.json") if f.stem.isdigit())


def retire_gone_stats(stats_dir: Path, ours: set[int], now: float | None = None) -> list[int]:
    """Fold the stats files of the workers not in ``ours`` (gone: joined, they write no more)
    into ``retired.json``, then remove them; the pids folded. Only the parent calls this, from
    one thread: ``retired.json`` is written, whole, before the files it holds are removed (see
    :meth:`WorkerGroup.all_stats`). A worker starting is in ``ours`` before its first file.
    The temporary files of the gone workers are removed too (``remove_gone_writers_temps``)."""
    remove_gone_writers_temps(stats_dir, ours)
    gone: dict[int, dict[str, Any]] = {}
    for f in _worker_files(stats_dir):
        pid = int(f.stem)
        if pid in ours:
            continue
        try:
            gone[pid] = json.loads(f.read_text())
        except FileNotFoundError:
            continue
        except ValueError:  # cannot be read (nor by /v1/stats): nothing to keep
            f.unlink(missing_ok=True)
    if not gone:
        return []
    path = stats_dir / RETIRED
    try:
        retired: dict[str, Any] | None = json.loads(path.read_text())
    except FileNotFoundError:
        retired = None
    _write_json(path, fold_retired(retired, gone, now))
    for pid in gone:
        (stats_dir / f"{pid}.json").unlink(missing_ok=True)
    return sorted(gone)


def remove_gone_writers_temps(stats_dir: Path, ours: set[int]) -> list[Path]:
    """Remove the temporary files in ``stats_dir`` (or in the state directory: ``reload.json``'s)
    written by processes not in ``ours``; the removed ones. A worker killed outright (SIGKILL)
    between writing its stats and renaming them leaves its temporary file, which nobody else
    would remove: one more file for every such death, for as long as the server runs. A worker
    not in ``ours`` has been joined: it writes no more, and its temporary file is of no use to
    anyone. (The parent's own, of ``retired.json``, come and go in the thread that calls this:
    none is found half-way.)"""
    removed = []
    for tmp in stats_dir.glob(".*.tmp"):
        found = _TMP_NAME.match(tmp.name)
        if found is None or int(found[1]) in ours:
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def take_reload_request(state: Path) -> str | None:
    """The bundle the workers last asked to serve, the request removed; None if none waits."""
    taken = state / f".{RELOAD}.taken"
    try:
        os.replace(state / RELOAD, taken)  # a request written after this is the next one's
    except FileNotFoundError:
        return None
    return str(json.loads(taken.read_text())["bundle"])


def worker_app() -> Any:
    """The app of one worker (uvicorn calls this factory in each worker process).

    A worker that cannot build its app exits with uvicorn's start-up failure code, so the
    supervisor stops the server instead of restarting the worker over and over."""
    from ..errors import keep_ctrl_c_from_polars

    keep_ctrl_c_from_polars()  # uvicorn's handlers are set: polars' hook would chain to them
    try:
        return _worker_app()
    except Exception as exc:
        from uvicorn.config import STARTUP_FAILURE

        log.error("worker %d cannot start: %s", os.getpid(), exc)
        sys.exit(STARTUP_FAILURE)


def _parent_reload_counter() -> Any:
    """``deepwatch_model_reloads_total`` of the parent, which replaces the workers: each
    replacement (asked by SIGHUP or by ``POST /v1/reload``) counted once, ``ok`` when every
    worker serves the new model, ``failed`` when it was refused (the certificate) or undone.
    Its values go to the workers' metric files (``PROMETHEUS_MULTIPROC_DIR``, set now), so
    ``/metrics`` adds them to the workers' own (a ``POST`` whose bundle did not load there).
    prometheus_client chose where values go when it was first imported, before the directory
    was set: this counter is given the multi-process kind itself."""
    from prometheus_client import CollectorRegistry, Counter, values

    kept = values.ValueClass
    values.ValueClass = values.MultiProcessValue()
    try:  # (each label's value is made by labels(), at its first call: here)
        counter = Counter("deepwatch_model_reloads", "Model reloads, by result", ["result"],
                          registry=CollectorRegistry())
        for result in ("ok", "failed"):
            counter.labels(result)
    finally:
        values.ValueClass = kept
    return counter


#: The uvicorn ``Config`` attribute through which the parent hands its workers the certificate
#: and key it checked (their bytes, PEM): the config reaches each worker as it is started.
TLS_PAIR = "deepwatch_tls_pair"


#: In a worker: the certificate (PEM) it loaded from the parent's hands, for its expiry gauge.
_served_cert: bytes | None = None


def hand_tls_pair(config: Any, pair: Any) -> None:
    """Have the workers started from now on load ``pair`` (``app._TlsPair``, checked)."""
    setattr(config, TLS_PAIR, (pair.cert_pem, pair.key_pem))
    config.ssl_keyfile_password = pair.password  # (passed to OpenSSL only, never logged)


def worker_ssl_context(config: Any, default: Any) -> Any:
    """A worker's TLS context (uvicorn's ``ssl_context_factory``): the certificate files as they
    are when it starts (a worker restarted after a death takes a renewal), or, where they do not
    load, the pair the parent checked last (``TLS_PAIR``), which does. A renewal that renames the
    certificate and then its key into place, or that leaves a file half-written, had a worker
    started meanwhile (by a reload the parent had checked, or after a death) load a certificate
    without its key: past 2 s of retries it died with uvicorn's traceback, the reload was
    undone and counted as failed, and a worker that died then was restarted into the same
    traceback over and over. Without a pair handed over (uvicorn's ``Config`` made elsewhere),
    the files, tried again for a moment where they do not load."""
    import ssl

    from .app import _TlsPair, load_tls_context

    global _served_cert
    handed = getattr(config, TLS_PAIR, None)
    if handed is None:
        return load_tls_context(default)
    # (uvicorn loads TLS before the app: the worker's log format, as ``_worker_app`` sets it)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    paths = config.ssl_certfile, config.ssl_keyfile
    password = config.ssl_keyfile_password

    def load(cert_pem: bytes, key_pem: bytes) -> Any:
        if password is None and b"ENCRYPTED" in key_pem:  # (OpenSSL would ask the terminal)
            raise ValueError("the key is encrypted, and no password was given for it")
        with _TlsPair(cert_pem, key_pem, password).files() as (cert, key):
            config.ssl_certfile, config.ssl_keyfile = cert, key  # (read by ``default`` only)
            try:
                return default()
            finally:
                config.ssl_certfile, config.ssl_keyfile = paths

    try:
        files = Path(paths[0]).read_bytes(), Path(paths[1]).read_bytes()
        context = load(*files)
    except (OSError, ssl.SSLError, ValueError) as exc:
        log.warning("worker %d: the certificate files do not load now (%s): it serves the "
                    "certificate checked at the last reload (or at start) instead", os.getpid(),
                    getattr(exc, "reason", None) or exc)
        files = handed
        context = load(*handed)
    _served_cert = files[0]
    return context


def _drain_before_shutdown() -> None:
    """Make this worker's uvicorn stop taking connections ``DRAIN_SECONDS`` before it closes
    the idle ones.

    uvicorn's shutdown closes its listeners, then at once closes every connection that has no
    request under way. A connection it took a moment before (the client's request in flight, or
    in the socket's buffer unread) is among those: the client gets "server disconnected
    without sending a response", though the other workers would have answered it (2 of 5,613
    requests sent without pause over 21 reloads, in one measurement). Here the worker first
    stops taking connections (the listening socket stays open in the other workers, whose queue
    takes new ones), goes on serving for ``DRAIN_SECONDS``, and only then shuts down as uvicorn
    does; a request that has begun by then is answered."""
    import asyncio

    from uvicorn.server import Server

    shutdown = Server.shutdown
    if getattr(shutdown, "drains", False):
        return

    async def drain_then_shutdown(self: Server, sockets: Any = None) -> None:
        for server in self.servers:
            server.close()
        if not self.force_exit:
            await asyncio.sleep(DRAIN_SECONDS)
        await shutdown(self, sockets)

    drain_then_shutdown.drains = True  # type: ignore[attr-defined]
    Server.shutdown = drain_then_shutdown  # type: ignore[method-assign]


def _worker_app() -> Any:
    from . import app as app_module
    from .app import TlsReload, bound_tls_handshakes, create_app, read_api_key

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    _drain_before_shutdown()
    bound_tls_handshakes()  # (uvicorn starts this worker's listener after this factory)
    # a hang-up sent to the whole process group reaches the parent, which replaces us: that
    # is the reload; the default action here would kill this worker first
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    state = Path(os.environ[STATE_ENV])
    with contextlib.suppress(OSError):  # the directory is gone: the server is stopping
        hold_lock(state / LOCK)
    settings = read_settings(state)
    # the parent's request-head deadline (which TLS handshakes get too): one for the server
    app_module.HEAD_TIMEOUT_SECONDS = float(settings.get("head_timeout_seconds",
                                                         app_module.HEAD_TIMEOUT_SECONDS))
    key = read_api_key(settings["key_file"]) if settings["key_file"] else None
    group = WorkerGroup(state)
    tls = settings.get("tls")
    app = create_app(settings["bundle"], api_key=key, engine=settings["engine"],
                     limits=Limits(**settings["limits"]), group=group,
                     generation=int(settings["generation"]),
                     tls=TlsReload(tls["cert"], tls["key"], tls["password_file"],
                                   served=_served_cert) if tls else None)
    service = app.state.service
    end = _WorkerEnd(state, os.getppid())

    def publish() -> None:
        while end.publish(group, service.stats):
            time.sleep(STATS_EVERY_SECONDS)

    def orphaned() -> None:  # the parent was killed outright: stop, as it would have had us
        while not end.orphaned():
            time.sleep(1.0)
        log.warning("the serving parent process is gone: worker %d stops", os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)

    group.publish_stats(service.stats.raw())
    threading.Thread(target=publish, name="deepwatch-stats", daemon=True).start()
    threading.Thread(target=orphaned, name="deepwatch-orphan", daemon=True).start()
    app.router.lifespan_context = _on_shutdown(group, service.stats, end)
    return app


class _WorkerEnd:
    """Whether this worker's parent is gone, and the state directory's removal if it is.

    The parent removes the directory when it stops; killed outright, it cannot, and its workers
    do, each as the last thing it does. One removal is not enough: a sibling still writing its
    stats while another worker removes the directory can put a file back into it (between the
    removal's listing and its ``rmdir``), and ``rmtree`` then leaves the directory behind. Every
    worker removes it after its own last write instead (the stats thread writes under the lock
    and stops once the parent is gone), so the last worker to end removes it last."""

    def __init__(self, state: Path, parent: int) -> None:
        self.state = state
        self.parent = parent
        self._writing = threading.Lock()

    def orphaned(self) -> bool:
        """Whether the parent is gone (also where it was killed after it told us to stop)."""
        return os.getppid() != self.parent

    def publish(self, group: WorkerGroup, stats: Any) -> bool:
        """Publish this worker's stats unless the parent is gone (nobody would fold them, and
        the directory is being removed); whether to go on publishing."""
        with self._writing:
            if self.orphaned():
                return False
            try:
                group.publish_stats(stats.raw())
            except OSError:  # the state directory is gone: the server is stopping
                return False
            return True

    def remove_state(self) -> None:
        with self._writing:
            shutil.rmtree(self.state, ignore_errors=True)


def _on_shutdown(group: WorkerGroup, stats: Any, end: _WorkerEnd) -> Any:
    """The worker's lifespan: its last words as uvicorn shuts it down (after the drain). Not
    ``atexit``: uvicorn raises the stop signal again once it has shut down, and the signal's
    default action ends the process without running exit handlers."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        yield
        _last_words(group, stats, os.getpid(), end)

    return lifespan


def _last_words(group: WorkerGroup, stats: Any, pid: int, end: _WorkerEnd) -> None:
    """A stopping worker's final activity for the dashboard, and its live gauges dropped from
    ``/metrics`` (the model it served, its certificate's expiry). A worker that dies without
    them has its gauges dropped by the parent (``_forget_gone_workers``). A worker whose parent
    is gone removes the state directory instead (see ``_WorkerEnd``)."""
    from prometheus_client import multiprocess

    if end.orphaned():
        end.remove_state()
        return
    end.publish(group, stats)
    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid)


def run_workers(bundle: str | Path, sock: socket, workers: int, *, host: str, port: int,
                key_file: str | None, engine: str, limits: Limits,
                uvicorn_options: dict[str, Any],
                tls_files: dict[str, str | None] | None = None, tls_pair: Any = None) -> None:
    """Serve with ``workers`` processes until SIGINT/SIGTERM; SIGHUP reloads them all.

    ``uvicorn_options`` reach every worker in uvicorn's ``Config`` (TLS included: each worker
    loads the certificate and key the parent checked). ``tls_files``: the ``cert``, ``key`` and
    ``password_file`` behind them (absolute paths), checked again before every replacement;
    ``tls_pair``: their bytes as checked at start (``app._TlsPair``), which the first workers
    load (each replacement, the bytes its own check read: see ``worker_ssl_context``)."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess
    from uvicorn.supervisors.multiprocess import SIGNALS

    from ..errors import DeepwatchError
    from .app import HEAD_TIMEOUT_SECONDS, checked_tls

    for stale in remove_unheld_dirs(Path(tempfile.gettempdir()), STATE_PREFIX):
        log.info("removed %s, left by a server killed outright", stale)
    state, _ = make_held_dir(STATE_PREFIX)
    try:
        (state / "prometheus").mkdir()
        (state / "stats").mkdir()
        _write_json(state / SETTINGS, {
            "bundle": str(Path(bundle).resolve()), "generation": 1,
            "key_file": str(Path(key_file).resolve()) if key_file else None,
            "engine": engine, "limits": asdict(limits), "tls": tls_files,
            "head_timeout_seconds": HEAD_TIMEOUT_SECONDS})
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(state / "prometheus")
        reloads = _parent_reload_counter()
        # the workers share the cores: ONNX Runtime threads per worker, unless set already
        os.environ.setdefault("DEEPWATCH_THREADS",
                              str(max(1, usable_cores() // workers)))
        os.environ[STATE_ENV] = str(state)
        if tls_files is not None:  # a worker starting during a renewal tries again
            uvicorn_options = {**uvicorn_options, "ssl_context_factory": worker_ssl_context}
        config = uvicorn.Config("deepwatch.serve._workers:worker_app", factory=True,
                                host=host, port=port, workers=workers, **uvicorn_options)
        if tls_files is not None:
            if tls_pair is None:
                _, tls_pair = checked_tls(str(tls_files["cert"]), str(tls_files["key"]),
                                          tls_files["password_file"])
            hand_tls_pair(config, tls_pair)

        class Supervisor(Multiprocess):
            """uvicorn's supervisor, which queues every signal and handles them in order,
            changed so that a burst of reloads cannot hold the server: a stop goes ahead of
            what is queued, and the SIGHUPs queued together are one replacement."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self._stopping = threading.Lock()
                self._merged = 0
                self._fold_error = ""
                #: the pair the workers serve (handed to them), kept for a reload undone
                self._served_pair = self._checked_pair = tls_pair

            def run(self) -> None:
                threading.Thread(target=self._watch_for_stop, name="deepwatch-stop",
                                 daemon=True).start()
                super().run()

            def _watch_for_stop(self) -> None:
                """The main thread may be replacing workers (seconds, each waiting for one to
                start): a stop signal queued meanwhile ends that at once (uvicorn checks
                ``should_exit`` while it waits). Set here, not in the signal handler, which
                must not take the event's lock the main thread may hold."""
                while not self.should_exit.wait(0.1):
                    stop = next((s for s in tuple(self.signal_queue) if s in STOP_SIGNALS), None)
                    if stop is not None:
                        self._stop(stop)

            def _stop(self, sig: int) -> None:
                with self._stopping:  # logged once, whichever thread sees the signal first
                    if not self.should_exit.is_set():
                        getattr(self, f"handle_{SIGNALS[sig].lower()}")()

            def handle_signals(self) -> None:
                queued = list(self.signal_queue)
                del self.signal_queue[:len(queued)]  # those arriving meanwhile: next round
                stop = next((s for s in queued if s in STOP_SIGNALS), None)
                if stop is not None:  # nothing queued with a stop is worth doing first
                    self._stop(stop)
                    return
                hups = queued.count(signal.SIGHUP)
                for sig in queued:
                    if self.should_exit.is_set():
                        return
                    if sig == signal.SIGHUP:
                        if not hups:  # one replacement serves every reload asked before it
                            continue  # starts: it takes the newest bundle asked for
                        self._merged, hups = hups, 0
                    handler = getattr(self, f"handle_{SIGNALS[sig].lower()}", None)
                    if handler is not None:
                        handler()

            def keep_subprocess_alive(self) -> None:
                super().keep_subprocess_alive()
                self._forget_gone_workers()

            def _forget_gone_workers(self) -> None:
                """Drop from ``/metrics`` the live gauges (model served, certificate expiry)
                of workers that are no longer ours: replaced, stopped or dead (a worker
                killed outright cannot drop its own), and fold their stats into
                ``retired.json`` (their temporary files removed). Run in the thread that
                replaces workers, so a new worker is never taken for a gone one (uvicorn joins
                a worker before it drops it)."""
                from prometheus_client import multiprocess

                ours = {p.pid for p in self.processes if p.pid is not None}
                for db in (state / "prometheus").glob("gauge_live*_*.db"):
                    pid = db.stem.rsplit("_", 1)[-1]
                    if pid.isdigit() and int(pid) not in ours:
                        with contextlib.suppress(OSError):
                            multiprocess.mark_process_dead(int(pid), str(state / "prometheus"))
                # a worker killed writing a reload request leaves its temporary file in the
                # state directory (the parent's own, of settings.json, are never taken)
                remove_gone_writers_temps(state, ours | {os.getpid()})
                # their dashboard stats folded into one file, so they do not pile up
                try:
                    retire_gone_stats(state / "stats", ours)
                except (OSError, ValueError) as exc:
                    if str(exc) != self._fold_error:  # once, not every half second
                        log.warning("cannot fold the stats of workers that are gone: %s", exc)
                    self._fold_error = str(exc)
                else:
                    self._fold_error = ""

            def handle_hup(self) -> None:
                """Replace every worker; where some cannot start (uvicorn then stops
                replacing), go back to the settings before, so all serve one model."""
                if self.should_exit.is_set():
                    return
                before = read_settings(state)
                if not self._certificate_loads(int(before["generation"])):
                    reloads.labels("failed").inc()
                    return
                now = {**before, "generation": int(before["generation"]) + 1}
                asked = take_reload_request(state)
                if asked is not None:
                    now["bundle"] = asked
                _write_json(state / SETTINGS, now)
                merged, self._merged = self._merged, 0
                log.warning("SIGHUP: replacing the %d workers, serving %s (generation %d)%s",
                            len(self.processes), now["bundle"], now["generation"],
                            f" ({merged} SIGHUPs merged)" if merged > 1 else "")
                old = {p.pid for p in self.processes}
                super().handle_hup()
                self._forget_gone_workers()
                if self.should_exit.is_set():
                    return
                if not {p.pid for p in self.processes} & old:
                    self._served_pair = self._checked_pair
                    reloads.labels("ok").inc()
                    log.info("SIGHUP: every worker replaced, serving %s (generation %d)",
                             now["bundle"], now["generation"])
                    return
                reloads.labels("failed").inc()
                log.error("not every worker could be replaced: back to %s (generation %d)",
                          before["bundle"], before["generation"])
                _write_json(state / SETTINGS, before)
                if self._served_pair is not None:  # and the certificate they had
                    hand_tls_pair(self.config, self._served_pair)
                if {p.pid for p in self.processes} - old:  # some serve the new one: undo
                    super().restart_all()

            def _certificate_loads(self, generation: int) -> bool:
                """With TLS: the certificate and key (with the password file, read again) as
                at start, so that a pair the new workers could not load refuses the reload
                here, in one line, instead of failing in each of them. A bundle asked for by
                ``POST /v1/reload`` stays asked for (the next reload takes it)."""
                if tls_files is None:
                    return True
                try:
                    _, pair = checked_tls(str(tls_files["cert"]), str(tls_files["key"]),
                                          tls_files["password_file"])
                except DeepwatchError as exc:
                    self._merged = 0
                    log.warning("SIGHUP: reload refused because of the certificate, the %d "
                                "workers serve on (generation %d, the certificate they "
                                "have): %s", len(self.processes), generation, exc)
                    return False
                # the new workers load these bytes (and the password read now), whatever
                # becomes of the files while they start (a renewal half-way)
                self._checked_pair = pair
                hand_tls_pair(self.config, pair)
                return True

        supervisor = Supervisor(config, sockets=[sock])
        supervisor.run()
        if any(proc.exitcode == STARTUP_FAILURE for proc in supervisor.processes):
            raise DeepwatchError("a worker could not start (its error is logged above); "
                                 "the server stopped")
    finally:
        shutil.rmtree(state, ignore_errors=True)
