"""Kafka source and sink of ``deepwatch stream`` (confluent-kafka).

At least once: the run loop commits a batch's offsets only after the sink's ``flush`` saw every
message it produced acknowledged. Offsets acknowledged but not yet committed are committed
synchronously when partitions are revoked and on close, so a clean hand-over never re-reads, and a
crash re-reads at most what was not acknowledged.

Memory stays bounded under backpressure: the consumer prefetches at most
``queued.max.messages.kbytes``, a micro-batch holds at most ``batch_size`` records, and the
producer's queue is bounded; when it is full, producing waits for the broker.

Logging: every client error (librdkafka's ``error_cb``) and librdkafka's own log lines (its
``logger``, served by poll, consume and flush instead of written to stderr by librdkafka's
threads) are JSON log lines; one repeated is logged once, then at most once every
``LOG_REPEAT_S`` with how many times it came meanwhile, and a client that works again after an
error says so once (``kafka_recovered``). A fatal error is always logged, and stops the worker.

Metrics: every client error is counted, whether it was logged or held back, by client and error
name (``ClientMetrics``), and each client says whether it is failing: from an error until it works
again. A failing client with nothing to do asks the brokers for metadata every ``PROBE_EVERY_S``,
so that it can say it works again though no message comes. While the brokers are asked about
topics at start, the client's callbacks are served every ``METADATA_SLICE_S``: its errors are
said and counted while it waits, and a stop (SIGTERM) is heard.

Settings: ``--kafka-config`` (a Kafka client properties file) and ``--kafka-option`` (which
overrides it) are read by ``kafka_settings``, which warns of a secret on the command line and of
a file holding one that other users may read. No value of a setting that holds a secret
(``is_secret``) is shown: not in an error about the settings, and not in what librdkafka says
(``_Redactor``), which quotes some (``sasl.oauthbearer.config``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, Protocol

import numpy as np
import polars as pl

from ..errors import UsageError
from ._jsonlog import Repeats
from ._stream_core import (
    ALERT,
    DEAD_LETTER,
    KINDS,
    VERDICT,
    Output,
    RawBatch,
    dead_letter_for,
    find_record,
    join_messages,
    record_dead_letter,
)
from ._stream_io import DeliveryError

log = logging.getLogger("deepwatch.stream")
#: librdkafka's own log lines, as JSON lines with the worker's other logs
rdlog = logging.getLogger("deepwatch.stream.librdkafka")
#: A kafka client error, or a librdkafka log line, that keeps coming is logged the first time,
#: then at most once per this many seconds, saying how many times it came meanwhile (a worker
#: whose brokers are unreachable gets a connection error from librdkafka about 20 times a
#: second).
LOG_REPEAT_S = 30.0
#: How often a failing client (an error, and no sign since that it works) that has nothing to do
#: asks the brokers for a topic's metadata: their answer is the sign that it works again
PROBE_EVERY_S = 5.0
#: The longest such a question waits for its answer (the loop waits with it: nothing flows then)
PROBE_TIMEOUT_S = 0.5
#: The brokers are asked about topics at start in questions of at most this long, the client's
#: errors served between them (librdkafka reports them only from a poll) and a stop heard
METADATA_SLICE_S = 0.5
#: The consumer waits for a micro-batch (``--batch-wait-ms``) in waits of at most this long, a
#: stop heard between them; so does the producer for its acknowledgements
STOP_SLICE_S = 0.2
#: Once a stop (SIGTERM, SIGINT) is heard, the producer waits at most this long, in all, for the
#: brokers to acknowledge what was written: enough for brokers that answer, while brokers that
#: do not (an outage) held the stop up to ``flush_timeout`` (60 s) in the loop and as long again
#: at close. What is not acknowledged then is not committed: its records are read again.
STOP_FLUSH_S = 5.0

CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    "queued.max.messages.kbytes": 65536,
    "fetch.max.bytes": 16 << 20,
    "session.timeout.ms": 10000,
    "heartbeat.interval.ms": 1000,
}
PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "linger.ms": 5,
    "batch.num.messages": 10000,
    "queue.buffering.max.messages": 200000,
    "queue.buffering.max.kbytes": 262144,
    "delivery.report.only.error": True,
    # Never create a topic by asking about it or writing to it: an output topic with a typo in
    # its name must be refused at start (KafkaSink._check_topics), not created and written to
    # where no one reads. ``--kafka-option allow.auto.create.topics=true`` lets brokers that
    # create topics on demand do so again.
    "allow.auto.create.topics": False,
}


#: What a librdkafka setting's name is made of (``sasl.password``, ``ssl.ca.location``)
_KEY = re.compile(r"[A-Za-z0-9._-]+")
#: Settings that hold a secret, besides those whose name says ``password``, ``secret`` or
#: ``passphrase`` (librdkafka redacts the same ones in its own configuration dump)
_SECRET_KEYS = frozenset({"ssl.key.pem", "ssl_key", "sasl.oauthbearer.config",
                          "sasl.oauthbearer.assertion.private.key.pem",
                          # a Java client's (librdkafka refuses it): it holds the password
                          "sasl.jaas.config"})


def is_secret(key: str) -> bool:
    """Whether a librdkafka setting holds a secret: its value is never logged or shown."""
    key = key.strip().lower()
    return key in _SECRET_KEYS or any(w in key for w in ("password", "secret", "passphrase"))


def parse_options(pairs: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` librdkafka settings given on the command line. An error shows no value:
    it may be a secret (a pair without ``=`` is shown only when it is a setting's name)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _KEY.fullmatch(key):
            shown = f", not {pair!r}" if _KEY.fullmatch(pair) else (
                " (what was given is not shown: it may hold a secret)")
            raise UsageError(f"--kafka-option wants KEY=VALUE{shown}")
        out[key] = value
    return out


def read_config(path: str) -> tuple[dict[str, str], dict[str, int], int]:
    """A Kafka client properties file (``--kafka-config``): its settings, the line each was
    set on, and the file's mode.

    One ``key=value`` a line, split at the first ``=``, the key and the value trimmed of
    whitespace; blank lines and lines whose first character (past whitespace) is ``#`` or
    ``!`` are skipped; a key set again takes its last value. Values are taken as written: no
    backslash escapes, no continuation lines, no ``key: value`` or ``key value``. An error
    names the file and the line, never what the line holds (it may be a secret)."""
    try:
        with open(path, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            data = fh.read()
    except OSError as exc:
        raise UsageError(f"--kafka-config {path}: cannot read it: "
                         f"{exc.strerror or exc}") from None
    values: dict[str, str] = {}
    lines: dict[str, int] = {}
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"--kafka-config {path} line {n}: not UTF-8 text") from None
        line = line.removeprefix("\ufeff").strip() if n == 1 else line.strip()
        if not line or line[0] in "#!":
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _KEY.fullmatch(key):
            raise UsageError(f"--kafka-config {path} line {n}: not KEY=VALUE (a key is "
                             "letters, digits, '.', '_' and '-', and '=' comes after it; the "
                             "line is not shown: it may hold a secret)")
        values[key] = value.strip()
        lines[key] = n
    return values, lines, stat.S_IMODE(mode)


def kafka_settings(config: str | None, options: dict[str, str]
                   ) -> tuple[dict[str, str], dict[str, str]]:
    """The librdkafka settings of ``--kafka-config`` (a file, read here) and ``--kafka-option``
    (``options``, which override the file's), and where each was given (for errors). Warns,
    naming settings and never their values, of secrets given on the command line (any local
    user can read them there: ``ps``, ``/proc/PID/cmdline``, and shell history keeps them) and
    of a file holding secrets that other users may read."""
    settings: dict[str, str] = {}
    origins: dict[str, str] = {}
    if config is not None:
        values, lines, mode = read_config(config)
        settings.update(values)
        origins.update({k: f"--kafka-config {config} line {n}" for k, n in lines.items()})
        secrets = sorted(k for k in values if is_secret(k))
        if secrets and mode & 0o077:
            log.warning(f"--kafka-config {config} holds {', '.join(secrets)} and other users "
                        f"may read it (mode {mode:04o}): chmod 600 {config}", extra={
                            "event": "kafka_config_readable", "file": config,
                            "mode": f"{mode:04o}", "keys": secrets})
    settings.update(options)
    origins.update(dict.fromkeys(options, "--kafka-option"))
    exposed = sorted(k for k in options if is_secret(k))
    if exposed:
        log.warning(f"--kafka-option {', '.join(exposed)}: a secret on the command line can be "
                    "read by every local user (ps, /proc/PID/cmdline) and stays in shell "
                    "history: put it in a --kafka-config file (chmod 600) instead", extra={
                        "event": "kafka_secret_on_command_line", "keys": exposed})
    return settings, origins


class _Redactor:
    """Takes the values of the secret settings out of a text librdkafka wrote (an error, a log
    line): librdkafka shows some of them, e.g. ``Unrecognized sasl.oauthbearer.config
    beginning at: ...``. Each value is replaced whole, and so is each word of it (of 4
    characters or more): a message may show only its end."""

    def __init__(self, conf: dict[str, Any]):
        words = set()
        for key, value in conf.items():
            if is_secret(key) and isinstance(value, str) and value:
                words.add(value)
                words.update(w for w in value.split() if len(w) >= 4)
        self.words = sorted(words, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for word in self.words:
            if word in text:
                text = text.replace(word, "[redacted]")
        return text


#: What Kafka accepts as a topic name (and at most 249 of them, not "." or "..").
_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")
#: librdkafka's default message.max.bytes: the largest message (value, key and headers) the
#: producer accepts.
DEFAULT_MAX_MESSAGE_BYTES = 1_000_000
#: What a broker answers, in the delivery report, when it refuses a message for its size: the
#: topic's max.message.bytes (or the broker's message.max.bytes) is lower than the producer's.
#: It refuses the whole batch the message was sent in, small messages with the large.
BROKER_SIZE_REFUSALS = ("MSG_SIZE_TOO_LARGE", "RECORD_LIST_TOO_LARGE")
#: How often a worker whose input topic does not exist asks the brokers about it again (and the
#: longest it waits for their answer then; the first answer is waited for ``check_timeout``).
TOPIC_WAIT_S = 2.0


def check_topic_name(flag: str, topic: str) -> None:
    """A UsageError unless ``topic`` is a legal Kafka topic name."""
    if not _TOPIC_NAME.fullmatch(topic) or topic in (".", ".."):
        raise UsageError(f"{flag} {topic!r} is not a Kafka topic name: at most 249 of the "
                         "characters a-z A-Z 0-9 . _ -")


def _true(value: Any) -> bool:
    """A librdkafka boolean setting, as given (``True`` or a string such as ``"true"``)."""
    return str(value).strip().lower() in ("true", "t", "1")


#: What librdkafka appends to a broker error and what varies from one to the next ("after 12ms in
#: state CONNECT", and how many identical errors it held back itself): not part of what makes
#: two errors the same one.
_VARIABLE = re.compile(r" \(after \d+ms in state \w+(?:, \d+ identical error\(s\) "
                       r"suppressed)?\)$")
#: The thread librdkafka names at the start of a log line ("[thrd:127.0.0.1:9092/bootstrap]: ")
_THREAD = re.compile(r"^\[thrd:[^\]]*\]: ")


class ClientMetrics(Protocol):
    """Where the clients' errors and state are counted (the worker's StreamMetrics)."""

    def on_client_error(self, client: str, code: str) -> None:
        """One client error; ``code`` is librdkafka's name for it (``_TRANSPORT``)."""

    def on_client_state(self, client: str, failing: bool) -> None:
        """The client is failing (an error came), or works (from its start, or again)."""


def _metadata(client: Any, topic: str, timeout: float, serve: Callable[[], None],
              stop: threading.Event | None = None) -> Any:
    """``client.list_topics(topic)``, waiting up to ``timeout`` for the brokers' answer, asked in
    questions of at most ``METADATA_SLICE_S`` with ``serve`` called between them (librdkafka hands
    a client's errors over only from a poll: without it, brokers that cannot be reached would be
    neither said nor counted while they are asked); given up once ``stop`` is set. Raises
    KafkaException as ``list_topics`` does when no answer came."""
    from confluent_kafka import KafkaException

    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            return client.list_topics(topic, timeout=max(0.001, min(METADATA_SLICE_S, left)))
        except KafkaException:
            serve()
            if left <= METADATA_SLICE_S or (stop is not None and stop.is_set()):
                raise


class _ClientLog:
    """Reports one client's errors (its ``error_cb``) and librdkafka's own log lines (its
    ``logger``) as JSON log lines, each repeated one at most once per ``LOG_REPEAT_S``, and
    says once when the client works again after an error (:meth:`ok`)."""

    def __init__(self, client: str, metrics: ClientMetrics | None = None,
                 redact: Callable[[str], str] | None = None):
        self.client = client
        #: takes the secret settings' values out of librdkafka's texts before they are logged
        self.redact = redact or (lambda text: text)
        self.repeats = Repeats(LOG_REPEAT_S, f"kafka {client}", {"client": client},
                               recovered_event="kafka_recovered")
        #: the first fatal error reported: the client cannot go on (raised by the caller)
        self.fatal: Any = None
        self.logger = _LibrdkafkaLogger(self)
        self.metrics = metrics
        #: an error came, and no sign since that the client works
        self.failing = False
        self._probed = 0.0
        if metrics is not None:
            metrics.on_client_state(client, False)

    def count(self, err: Any) -> None:
        """Counts one error of this client (logged or not)."""
        if self.metrics is not None:
            self.metrics.on_client_error(self.client, str(err.name()))

    def error(self, err: Any) -> None:
        """``error_cb``: called from poll, consume or flush with a KafkaError."""
        text = self.redact(err.str())
        self.count(err)
        if not self.failing:
            self.failing = True
            self._probed = time.monotonic()  # the first probe one interval after the error
            if self.metrics is not None:
                self.metrics.on_client_state(self.client, True)
        if err.fatal():  # never held back
            if self.fatal is None:
                self.fatal = err
            log.error(f"kafka {self.client} fatal error: {text}", extra={
                "event": "kafka_error", "client": self.client, "error": text,
                "code": err.name(), "fatal": True})
            return
        same = _VARIABLE.sub("", text)
        self.repeats.say(log, ("error", err.code(), same), logging.WARNING,
                         f"kafka {self.client} error: {same}",
                         {"event": "kafka_error", "error": text, "code": err.name()},
                         failing=True)

    def librdkafka(self, level: int, facility: str, name: str, text: str) -> None:
        """One librdkafka log line (its facility, e.g. ``CONFWARN``, and the client's name)."""
        if facility == "FAIL":
            # librdkafka logs each broker failure as FAIL and hands the same text to error_cb
            # (rd_kafka_broker_set_error does both): said once, by error()
            return
        text = _THREAD.sub("", self.redact(text), count=1)
        same = _VARIABLE.sub("", text)
        self.repeats.say(rdlog, ("log", facility, same), level, same,
                         {"event": "kafka_log", "facility": facility, "rdkafka": name,
                          "text": text})

    def ok(self) -> None:
        """The client works (a message came, a delivery was acknowledged, a request answered)."""
        if self.failing:
            self.failing = False
            if self.metrics is not None:
                self.metrics.on_client_state(self.client, False)
        self.repeats.ok(log)

    def probe_due(self) -> bool:
        """Whether the failing client should ask the brokers now (once per ``PROBE_EVERY_S``)."""
        if not self.failing:
            return False
        now = time.monotonic()
        if now - self._probed < PROBE_EVERY_S:
            return False
        self._probed = now
        return True

    def check(self, what: str) -> None:
        """A DeliveryError once a fatal error was reported: the client cannot go on."""
        if self.fatal is not None:
            raise DeliveryError(f"kafka {what} failed: {self.redact(self.fatal.str())}")

    def close(self) -> None:
        self.repeats.flush()


class _LibrdkafkaLogger(logging.Logger):
    """What confluent-kafka's ``logger`` setting is given: it calls ``log(level, "%s [%s] %s",
    facility, client name, text)`` for each librdkafka log line, from within poll, consume or
    flush (the lines wait in a queue until then), instead of librdkafka writing them to stderr."""

    def __init__(self, owner: _ClientLog):
        super().__init__(rdlog.name)
        self._owner = owner

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if not rdlog.isEnabledFor(level):
            return
        try:
            facility, name, text = (str(a) for a in args)
        except ValueError:  # not the three fields confluent-kafka passes: the line as it is
            facility, name, text = "", "", str(msg) % args if args else str(msg)
        try:
            self._owner.librdkafka(level, facility, name, text)
        except Exception:  # noqa: BLE001 (raised here, it would be raised from poll)
            text = self._owner.redact(text)
            rdlog.log(level, text, extra={"event": "kafka_log", "facility": facility})


def _client(ck: Any, kind: str, conf: dict[str, Any], redact: Callable[[str], str],
            origins: dict[str, str] | None = None) -> Any:
    """A Consumer or Producer; a setting librdkafka refuses is a usage error, in one line, that
    says where the setting was given (``origins``: a line of the ``--kafka-config`` file, or
    ``--kafka-option``), without the value of a secret."""
    try:
        return getattr(ck, kind)(conf)
    except (ck.KafkaException, ValueError, TypeError) as exc:
        err = exc.args[0] if exc.args else exc
        text = redact(err.str() if hasattr(err, "str") else str(err))
        raise UsageError(f"kafka {kind.lower()} settings refused: {text}"
                         + _given_at(text, origins or {})) from None


#: What librdkafka says of a setting it refuses without naming it, and the setting
_UNNAMED = {"Java JAAS configuration": "sasl.jaas.config",
            "Java TrustStores": "ssl.truststore.location"}


def _given_at(text: str, origins: dict[str, str]) -> str:
    """`` (--kafka-config FILE line N)`` when librdkafka's ``text`` refuses a setting given
    there (or ``--kafka-option``); else nothing."""
    for key, origin in origins.items():
        if re.search(rf"(?<![\w.]){re.escape(key)}(?![\w.])", text):
            return f" ({origin})"
    for said, key in _UNNAMED.items():
        if said in text and key in origins:
            return f" ({key}: {origins[key]})"
    return ""


def _kafka() -> Any:
    try:
        import confluent_kafka
    except ImportError:
        raise UsageError("stream with --brokers needs confluent-kafka: "
                         "pip install 'deepwatch[kafka]'") from None
    return confluent_kafka


class KafkaSource:
    """A consumer-group member reading ``topic`` in size- and time-bounded micro-batches."""

    def __init__(self, brokers: str, topic: str, group: str, batch_size: int = 10000,
                 max_wait: float = 0.5, options: dict[str, Any] | None = None,
                 on_event: Callable[[str, int], None] | None = None,
                 on_topic_missing: Callable[[bool], None] | None = None,
                 check_timeout: float = 10.0, metrics: ClientMetrics | None = None,
                 origins: dict[str, str] | None = None):
        ck = _kafka()
        self._ck = ck
        check_topic_name("--input-topic", topic)
        redact = _Redactor(options or {})
        self._log = _ClientLog("consumer", metrics, redact)
        conf = {**CONSUMER_DEFAULTS, "bootstrap.servers": brokers, "group.id": group,
                "error_cb": self._log.error, "logger": self._log.logger,
                "on_commit": self._on_commit, **(options or {})}
        #: (topic, partition) -> offset the brokers said they stored (an asynchronous commit's
        #: answer, served by consume): not committed again on close or revoke
        self.confirmed: dict[tuple[str, int], int] = {}
        self.consumer = _client(ck, "Consumer", conf, redact, origins)
        self.topic = topic
        self.batch_size = batch_size
        self.max_wait = max_wait
        self.on_event = on_event or (lambda _name, _n: None)
        #: (topic, partition) -> next offset whose records were all acknowledged downstream
        self.acked: dict[tuple[str, int], int] = {}
        #: called before partitions are taken away: the run loop waits there for what it has
        #: written and commits it, so the next owner does not read it again
        self.before_revoke: Callable[[], None] = lambda: None
        #: called while the source waits for the input topic (the run loop serves the sink's
        #: callbacks there: its errors and logs are said while nothing is read)
        self.on_idle: Callable[[], None] = lambda: None
        self._revoke_error: Exception | None = None
        #: partitions revoked or lost while a micro-batch is waited for (``_consume``)
        self._gone: set[tuple[str, int]] = set()
        #: the batches handed out and not committed yet: a partition revoked or lost is taken
        #: out of their ``positions`` (``_forget``)
        self._handed: list[RawBatch] = []
        self.committed: dict[tuple[str, int], int] = {}
        #: told True when the input topic is found missing (once, until it is found), False
        #: when it is found after that
        self.on_topic_missing = on_topic_missing or (lambda _missing: None)
        #: whether the brokers said the input topic does not exist (and it was not found since)
        self.topic_missing = False
        self.check_timeout = check_timeout
        self._unknown = (ck.KafkaError.UNKNOWN_TOPIC_OR_PART, ck.KafkaError._UNKNOWN_TOPIC)
        self._closed = False

    def _topic_exists(self, timeout: float, stop: threading.Event) -> bool | None:
        """Whether the brokers have the input topic; None when they did not answer. They are
        asked without creating it: a consumer's metadata request does not allow it (unless
        ``allow.auto.create.topics=true`` was given, and then a broker that creates topics on
        demand creates it here, as subscribing would)."""
        try:
            meta = _metadata(self.consumer, self.topic, timeout, self._serve_unsubscribed, stop)
        except self._ck.KafkaException:
            return None
        # the brokers answered: said after the errors queued while they did not (not
        # subscribed yet, polling returns no message)
        self.consumer.poll(0)
        self._log.ok()
        found = meta.topics.get(self.topic)
        if found is None:
            return False
        return found.error is None or found.error.code() not in self._unknown

    def _set_topic_missing(self, missing: bool) -> None:
        """Says so, once, when the input topic is found missing, and when it is found again."""
        if missing == self.topic_missing:
            return
        self.topic_missing = missing
        self.on_topic_missing(missing)
        if missing:
            log.warning(f"input topic {self.topic!r} does not exist on the brokers: waiting for "
                        "it to be created (check --input-topic for a typo)",
                        extra={"event": "input_topic_missing", "topic": self.topic})
        else:
            log.info(f"input topic {self.topic!r} found", extra={
                "event": "input_topic_found", "topic": self.topic})

    def _wait_for_topic(self, stop: threading.Event) -> bool:
        """Waits until the brokers say the input topic exists (True) or ``stop`` is set (False).

        A topic that does not exist is not subscribed to: the consumer would learn it was
        created only at its next full metadata refresh (``topic.metadata.refresh.interval.ms``,
        five minutes), after one UNKNOWN_TOPIC_OR_PART consume error. The brokers
        are asked again every ``TOPIC_WAIT_S`` instead; brokers that do not answer are asked
        until they do (the consumer would wait for them too)."""
        timeout = self.check_timeout
        while not stop.is_set():
            exists = self._topic_exists(timeout, stop)
            if exists:
                self._set_topic_missing(False)
                return True
            if exists is False:
                self._set_topic_missing(True)
            timeout = TOPIC_WAIT_S
            deadline = time.monotonic() + TOPIC_WAIT_S
            while not stop.is_set() and time.monotonic() < deadline:
                self._serve_unsubscribed(0.2)
        return False

    def _serve_unsubscribed(self, timeout: float = 0.0) -> None:
        """Serves error_cb and logs as consume does (not subscribed yet: no message comes), and
        the sink's (``on_idle``)."""
        self.consumer.poll(timeout)
        self._log.check("consumer")
        self.on_idle()

    def _probe(self) -> None:
        """Asks the brokers about the input topic: an answer says the failing consumer works
        again though no message came (no poll here: subscribed, it could take a message)."""
        try:
            self.consumer.list_topics(self.topic, timeout=PROBE_TIMEOUT_S)
        except self._ck.KafkaException:
            return
        self._log.ok()

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        self._log.ok()
        log.info("partitions assigned", extra={
            "event": "assign", "partitions": sorted(p.partition for p in partitions)})
        self.on_event("assign", len(partitions))

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        revoked = {(p.topic, p.partition) for p in partitions}
        self._gone |= revoked
        try:
            self.before_revoke()
        except Exception as exc:  # raised from batches(): the loop must not commit past it
            self._revoke_error = exc
        self._commit_sync(revoked)
        self._forget(revoked)
        log.info("partitions revoked", extra={
            "event": "revoke", "partitions": sorted(p for _, p in revoked)})
        self.on_event("revoke", len(partitions))

    def batches(self, stop: threading.Event) -> Iterator[RawBatch]:
        if not self._wait_for_topic(stop):
            return
        self.consumer.subscribe([self.topic], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)
        while not stop.is_set():
            msgs = self._consume(stop)
            if self._revoke_error is not None:
                raise self._revoke_error
            self._log.check("consumer")
            good = [m for m in msgs if m.error() is None]
            if len(good) != len(msgs):
                self._report_errors(msgs)
            if good:
                self._log.ok()
            elif self._log.probe_due():
                self._probe()
            if good and self.topic_missing:  # reported unknown while subscribed, then back
                self._set_topic_missing(False)
            # an empty batch when nothing came: the loop then commits what it has done
            yield self._to_batch(good) if good else _EMPTY

    def _consume(self, stop: threading.Event) -> list[Any]:
        """Up to ``batch_size`` messages, waiting up to ``max_wait`` for them in slices of at
        most ``STOP_SLICE_S``: a stop ends the wait at once with what came (the batch is then
        scored, written and committed). One wait of ``max_wait`` held a stop that long: with
        ``--batch-wait-ms 60000`` SIGTERM took about a minute to end the worker."""
        msgs: list[Any] = []
        deadline = time.monotonic() + self.max_wait
        self._gone.clear()
        while True:
            left = deadline - time.monotonic()
            got = self.consumer.consume(self.batch_size - len(msgs),
                                        max(0.0, min(left, STOP_SLICE_S)))
            if self._gone:
                # partitions revoked or lost during this wait: what an earlier wait took of
                # them is not this worker's to score and commit any more (the next owner reads
                # it); the batch ends here
                return [m for m in msgs if (m.topic(), m.partition()) not in self._gone] + got
            msgs += got
            if (len(msgs) >= self.batch_size or left <= STOP_SLICE_S or stop.is_set()
                    or self._revoke_error is not None):
                return msgs

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        lost = {(p.topic, p.partition) for p in partitions}
        self._gone |= lost
        # another member owns them now: what this one read of them is not committed, not even
        # by a batch written before the loss and committed after it (its commit went through,
        # and set the group's offset back over the new owner's: reproduced on Tansu)
        self._forget(lost)
        log.warning("partitions lost", extra={
            "event": "lost", "partitions": sorted(p.partition for p in partitions)})

    def _forget(self, partitions: set[tuple[str, int]]) -> None:
        """Partitions this member no longer owns: their offsets are neither kept nor committed,
        and the batches handed out and not committed yet no longer hold them (the run loop
        commits such a batch after the revoke or loss, when its writes are acknowledged)."""
        for tp in partitions:
            self.acked.pop(tp, None)
            self.committed.pop(tp, None)
            self.confirmed.pop(tp, None)
        for batch in self._handed:
            for tp in partitions:
                batch.positions.pop(tp, None)

    def _report_errors(self, msgs: list[Any]) -> None:
        ck = self._ck
        for m in msgs:
            err = m.error()
            if err is None or err.code() == ck.KafkaError._PARTITION_EOF:
                continue
            self._log.count(err)
            if err.fatal():
                raise DeliveryError(f"kafka consumer failed: {self._log.redact(err.str())}")
            if err.code() in self._unknown:
                # the topic went away after the check: said once, not at every metadata
                # refresh, until records come again
                self._set_topic_missing(True)
                continue
            log.warning("consume error", extra={"event": "consume_error",
                                                "error": self._log.redact(err.str())})

    def _to_batch(self, msgs: list[Any]) -> RawBatch:
        n = len(msgs)
        topics = [m.topic() for m in msgs]
        partitions = np.fromiter((m.partition() for m in msgs), np.int32, n)
        offsets = np.fromiter((m.offset() for m in msgs), np.int64, n)
        origin = pl.DataFrame({"topic": topics, "partition": partitions, "offset": offsets})
        ends = origin.group_by("topic", "partition").agg(pl.col("offset").max())
        positions = {(t, int(p)): int(o) + 1 for t, p, o in ends.iter_rows()}
        keys = [m.key() for m in msgs]
        data, broken = join_messages([m.value() for m in msgs])
        batch = RawBatch(data, n, origin, keys, positions, broken=broken)
        self._handed.append(batch)
        return batch

    def commit(self, batch: RawBatch) -> None:
        ck = self._ck
        self._handed = [b for b in self._handed if b is not batch]
        for tp, offset in batch.positions.items():
            if offset > self.acked.get(tp, -1):
                self.acked[tp] = offset
        todo = [ck.TopicPartition(t, p, o) for (t, p), o in self.acked.items()
                if self.committed.get((t, p)) != o]
        if not todo:
            return
        try:
            self.consumer.commit(offsets=todo, asynchronous=True)
        except ck.KafkaException as exc:
            log.warning("commit failed", extra={"event": "commit_error", "error": str(exc)})
            return
        for tp in todo:
            self.committed[(tp.topic, tp.partition)] = tp.offset
        self.on_event("commit", len(todo))

    def _on_commit(self, err: Any, partitions: list[Any]) -> None:
        """``on_commit``: the brokers' answer to an asynchronous commit. An offset they stored
        is not committed again; one they did not is committed again with the next batch (it
        was committed again only at close or revoke, then)."""
        for p in partitions:
            tp = (p.topic, p.partition)
            if err is None and p.error is None and p.offset >= 0:
                if p.offset > self.confirmed.get(tp, -1):
                    self.confirmed[tp] = p.offset
            elif self.committed.get(tp) == p.offset:
                del self.committed[tp]
        if err is not None:  # (one that keeps failing is said once per LOG_REPEAT_S)
            text = self._log.redact(str(err))
            self._log.repeats.say(log, ("commit", text), logging.WARNING, "commit failed",
                                  {"event": "commit_error", "error": text})

    def _commit_sync(self, only: set[tuple[str, int]] | None = None) -> None:
        """Commits, and waits for, every acknowledged offset the brokers have not said they
        stored. One they confirmed is not asked again: a synchronous commit waits without a
        time limit, so a worker stopped while its brokers do not answer (a network partition)
        hung in it, though everything was committed already."""
        ck = self._ck
        todo = [ck.TopicPartition(t, p, o) for (t, p), o in self.acked.items()
                if (only is None or (t, p) in only) and self.confirmed.get((t, p)) != o]
        if not todo:
            return
        try:
            self.consumer.commit(offsets=todo, asynchronous=False)
            self.on_event("commit", len(todo))
        except ck.KafkaException as exc:
            log.warning("commit failed", extra={"event": "commit_error", "error": str(exc)})
            return
        for tp in todo:
            self.confirmed[(tp.topic, tp.partition)] = tp.offset

    def close(self) -> None:
        """Commits what was acknowledged, leaves the group and destroys the consumer;
        idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._commit_sync()
        finally:
            self.consumer.close()
            self._log.close()


_EMPTY = RawBatch(b"", 0, pl.DataFrame({"topic": [], "partition": [], "offset": []},
                                        schema={"topic": pl.String, "partition": pl.Int32,
                                                "offset": pl.Int64}), [], {})


class KafkaSink:
    """Produces each kind of message to its topic (``None``: that kind is not written).

    An alert or verdict too large for the producer (over ``message.max.bytes``), or refused by
    the broker for its size (over the topic's ``max.message.bytes``), becomes a dead letter of its
    record, saying so, instead of stopping the worker: a record that can never be written must
    not jam its partition. ``flush`` returns only once that dead letter is acknowledged, so the
    batch is committed after it. Any other error producing, and a dead letter refused in its
    turn, is a DeliveryError (one line; nothing of the batch is committed).
    """

    def __init__(self, brokers: str, topics: dict[str, str | None],
                 options: dict[str, Any] | None = None, flush_timeout: float = 60.0,
                 max_pending: int = 4, check_timeout: float = 10.0,
                 metrics: ClientMetrics | None = None, stop: threading.Event | None = None,
                 origins: dict[str, str] | None = None):
        ck = _kafka()
        self._ck = ck
        self.topics = {k: t for k, t in topics.items() if t and k in KINDS}
        flags = {"alert": "--output-topic", "verdict": "--verdict-topic",
                 DEAD_LETTER: "--dead-letter-topic"}
        for kind, topic in self.topics.items():
            check_topic_name(flags.get(kind, kind), topic)
        self.errors: list[str] = []
        #: (topic, key, value) of the messages the broker refused for their size (one of
        #: ``_size_codes`` in the delivery report) since the last flush
        self.refused: list[tuple[str, bytes | None, bytes]] = []
        self._size_codes = {getattr(ck.KafkaError, name) for name in BROKER_SIZE_REFUSALS
                            if hasattr(ck.KafkaError, name)}
        #: what was written since the last flush: the batches a refused message may come from
        self._written: list[tuple[RawBatch, str, datetime | None]] = []
        #: messages of each kind the broker refused, written as dead letters instead
        #: (:meth:`take_replaced`)
        self.replaced: dict[str, int] = {}
        # the delivery callback set once, not passed with every message (1.3 -> 0.8 us a call)
        redact = _Redactor(options or {})
        self._log = _ClientLog("producer", metrics, redact)
        conf = {**PRODUCER_DEFAULTS, "bootstrap.servers": brokers, "error_cb": self._log.error,
                "logger": self._log.logger, "on_delivery": self._on_delivery, **(options or {})}
        try:
            self.max_message_bytes = int(conf.get("message.max.bytes",
                                                  DEFAULT_MAX_MESSAGE_BYTES))
        except ValueError:
            self.max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
        self.flush_timeout = flush_timeout
        self.waits = 0
        #: messages too large to produce, written as dead letters of their records instead
        self.oversized = 0
        #: batches the run loop may write before it waits for their acknowledgement
        self.max_pending = max_pending
        #: whether messages were produced since the last sign that the brokers take them
        self._sent = False
        self._closed = False
        #: set by a stop (SIGTERM): acknowledgements are then waited for ``STOP_FLUSH_S`` at most
        self._stop = stop
        #: when a wait for acknowledgements first saw the stop
        self._stop_seen: float | None = None
        #: messages of each kind written since the last flush (said when a stop leaves them
        #: unacknowledged)
        self._since: dict[str, int] = {}
        self.producer = _client(ck, "Producer", conf, redact, origins)
        if check_timeout > 0:
            try:
                self._check_topics(flags, check_timeout,
                                   _true(conf.get("allow.auto.create.topics", False)), stop)
            except BaseException:  # refused: the producer must not outlive the refusal
                self._destroy()
                raise

    def _check_topics(self, flags: dict[str, str], timeout: float, auto_create: bool,
                      stop: threading.Event | None = None) -> None:
        """Refuses, before anything is consumed, an output topic the brokers say does not exist:
        one UsageError naming every such topic and its flag. The brokers are asked about each
        topic without creating it (a metadata request with allow_auto_topic_creation false, the
        producer's ``allow.auto.create.topics``), unless ``auto_create``: then a broker that
        creates topics on demand creates it here, and only one that does not is refused. A
        broker that cannot be reached is not refused here: the worker waits for it as it
        always does (and one that was not reached when ``stop`` was set)."""
        ck = self._ck
        unknown = (ck.KafkaError.UNKNOWN_TOPIC_OR_PART, ck.KafkaError._UNKNOWN_TOPIC)
        refused = (ck.KafkaError.TOPIC_AUTHORIZATION_FAILED, ck.KafkaError.TOPIC_EXCEPTION)
        named: dict[str, str] = {}  # topic -> its flags (one topic may take several kinds)
        for kind, topic in self.topics.items():
            named[topic] = "/".join(filter(None, [named.get(topic), flags.get(kind, kind)]))
        missing: list[str] = []
        for topic, flag in named.items():
            try:
                meta = _metadata(self.producer, topic, timeout, lambda: self.producer.poll(0),
                                 stop)
            except ck.KafkaException as exc:
                if stop is not None and stop.is_set():
                    return
                log.warning("could not check the output topics", extra={
                    "event": "topic_check_skipped",
                    "error": self._log.redact(str(exc.args[0].str()))})
                return
            self.producer.poll(0)  # the errors queued while waiting come before ok()
            self._log.ok()
            found = meta.topics.get(topic)
            err = found.error if found is not None else None
            if found is None or (err is not None and err.code() in unknown):
                missing.append(f"{flag} {topic!r}")
            elif err is not None and err.code() in refused:
                raise UsageError(f"{flag} {topic!r} cannot be written: {err.str()}")
        if missing:
            names = (missing[0] if len(missing) == 1
                     else ", ".join(missing[:-1]) + " and " + missing[-1])
            verb = "does" if len(missing) == 1 else "do"
            if auto_create:
                raise UsageError(f"{names} {verb} not exist on the brokers, and they do not "
                                 "create topics on demand")
            raise UsageError(f"{names} {verb} not exist on the brokers: create "
                             f"{'it' if len(missing) == 1 else 'them'} first (or let brokers "
                             "that create topics on demand do so: --kafka-option "
                             "allow.auto.create.topics=true)")

    @property
    def kinds(self) -> set[str]:
        """The kinds of message written (those with a topic)."""
        return set(self.topics)

    def drained(self) -> bool:
        """Whether every message written so far is acknowledged (and none failed)."""
        self.producer.poll(0)
        done = len(self.producer) == 0 and not self.errors
        if done and self._sent:
            self._sent = False
            self._log.ok()
        return done

    def serve(self) -> None:
        """Serves the producer's callbacks (delivery reports, errors, librdkafka's log lines)
        while nothing is written: the run loop calls it when the source is idle. A failing
        producer asks the brokers about a topic now and then: their answer says it works."""
        self.producer.poll(0)
        if self.topics and self._log.probe_due():
            try:
                self.producer.list_topics(next(iter(self.topics.values())),
                                          timeout=PROBE_TIMEOUT_S)
            except self._ck.KafkaException:
                return
            self.producer.poll(0)  # the errors queued while waiting come before ok()
            self._log.ok()

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is None:  # only failures are reported (delivery.report.only.error)
            return
        if err.code() in self._size_codes:
            self.refused.append((msg.topic(), msg.key(), msg.value()))
        else:
            self.errors.append(f"{msg.topic()}: {err.str()}")

    def _produce(self, topic: str, value: bytes, key: bytes | None) -> Any:
        """Produces one message, waiting while the queue is full; the KafkaError when the
        message is refused for its size; raises DeliveryError on any other error."""
        ck = self._ck
        self._sent = True
        while True:
            try:
                self.producer.produce(topic, value, key)
                return None
            except BufferError:  # queue full: let the broker catch up (backpressure)
                self.waits += 1
                self.producer.poll(0.05)
                if self._stop_ends_wait() <= 0:
                    raise DeliveryError(self._stopped(len(self.producer))) from None
            except ck.KafkaException as exc:
                err = exc.args[0]
                if err.code() == ck.KafkaError.MSG_SIZE_TOO_LARGE:
                    return err
                raise DeliveryError(f"cannot produce to {topic!r}: {err.str()}") from None

    def write(self, out: Output) -> None:
        self._log.check("producer")
        if out.source is not None:
            self._written.append((out.source, out.format_name, out.now))
        letters: list[tuple[bytes | None, bytes]] = []
        for kind, msgs in out.messages.items():
            topic = self.topics.get(kind)
            if topic is None or not len(msgs):
                continue
            self._sent = True
            self._since[kind] = self._since.get(kind, 0) + len(msgs)
            keys = msgs.keys if msgs.keys is not None else [None] * len(msgs)
            produce = self.producer.produce
            failed: list[int] = []
            for i, (value, key) in enumerate(zip(msgs.values, keys, strict=True)):
                try:
                    produce(topic, value, key)
                except (BufferError, self._ck.KafkaException):
                    if self._produce(topic, value, key) is not None:
                        failed.append(i)
            if failed:
                letters += self._too_large(out, kind, failed)
                self._since[kind] -= len(failed)
        if letters:
            topic = self.topics.get(DEAD_LETTER)
            if topic is None:
                raise DeliveryError(f"{len(letters)} messages were too large to produce and "
                                    "there is no dead-letter topic for them")
            self._since[DEAD_LETTER] = self._since.get(DEAD_LETTER, 0) + len(letters)
            for key, value in letters:
                if self._produce(topic, value, key) is not None:
                    raise DeliveryError(f"a dead letter of {len(value) + len(key or b''):,} "
                                        f"bytes is too large to produce to {topic!r} (over "
                                        f"message.max.bytes, {self.max_message_bytes:,})")
            out.add_dead_letters(letters)
        self.producer.poll(0)

    def _too_large(self, out: Output, kind: str, failed: list[int]
                   ) -> list[tuple[bytes | None, bytes]]:
        """Dead letters for the messages of ``kind`` at ``failed``, which the producer refused
        for their size; they are taken out of ``out`` (it then counts what was written)."""
        msgs = out.messages[kind]
        letters = []
        for i in failed:
            size = len(msgs.values[i]) + len((msgs.keys[i] or b"") if msgs.keys else b"")
            why = (f"its {kind.replace('_', ' ')} message was {size:,} bytes, over the producer's "
                   f"message.max.bytes ({self.max_message_bytes:,}): it could not be written")
            try:
                letters.append(dead_letter_for(out, kind, i, why))
            except ValueError:
                raise DeliveryError(f"a {kind} message of {size:,} bytes is too large to "
                                    "produce") from None
            log.warning("message too large, written as a dead letter", extra={
                "event": "oversized", "kind": kind, "bytes": size,
                "limit": self.max_message_bytes})
        self.oversized += len(failed)
        out.drop(kind, failed)
        return letters

    def flush(self) -> None:
        try:
            self._wait()
            if self.refused:
                self._replace_refused()
        finally:
            self._written.clear()
            self._since.clear()

    def _stop_ends_wait(self) -> float:
        """How long a wait for acknowledgements may still go on once a stop was heard (the
        first call that sees it starts the ``STOP_FLUSH_S``); infinity before a stop."""
        if self._stop is None or not self._stop.is_set():
            return float("inf")
        now = time.monotonic()
        if self._stop_seen is None:
            self._stop_seen = now
        return self._stop_seen + STOP_FLUSH_S - now

    def _flush(self, timeout: float) -> int:
        """``producer.flush(timeout)`` in waits of at most ``STOP_SLICE_S``, a stop heard
        between them: it ends the wait ``STOP_FLUSH_S`` after it came. What is left."""
        deadline = time.monotonic() + timeout
        while True:
            end = min(deadline - time.monotonic(), self._stop_ends_wait())
            left = int(self.producer.flush(max(0.0, min(STOP_SLICE_S, end))))
            if not left or end <= STOP_SLICE_S:
                return left

    def _stopped(self, left: int) -> str:
        """What a stop left unacknowledged (``left`` messages), said when the worker exits."""
        records = sum(raw.count for raw, _, _ in self._written)
        kinds = [f"{self._since.get(k, 0):,} {k.replace('_', ' ')}s" for k in KINDS
                 if k in self.topics]
        written = ", ".join(kinds[:-1]) + " and " + kinds[-1] if len(kinds) > 1 else kinds[0]
        return (f"stopped while the brokers had not acknowledged {left:,} messages "
                f"{STOP_FLUSH_S:.0f}s after the stop (of the {written} written since the last "
                f"commit): none of their {records:,} records was committed, so they are read "
                "again at the next start (an alert delivered already is then written again)")

    def _wait(self) -> None:
        """Waits for every message produced to be acknowledged; a DeliveryError when one was
        not, other than for its size (those are in ``refused``), and when a stop ended the
        wait (``STOP_FLUSH_S``)."""
        left = self._flush(self.flush_timeout)
        self._log.check("producer")
        if left:
            if self._stop_seen is not None:
                raise DeliveryError(self._stopped(left))
            raise DeliveryError(f"{left} messages not acknowledged within "
                                f"{self.flush_timeout:.0f}s")
        if self._sent and not self.errors:
            self._sent = False
            self._log.ok()
        if self.errors:
            first, n = self.errors[0], len(self.errors)
            self.errors.clear()
            self.refused.clear()
            raise DeliveryError(f"{n} messages could not be delivered, the first: {first}")

    def _replace_refused(self) -> None:
        """Sends each message the broker refused for its size again, alone: the broker refuses
        a whole batch over its limit, so most may have been refused only for the company they
        were in. One refused alone too is replaced by a dead letter of its record, itself sent
        alone and waited for."""
        refused, self.refused = self.refused, []
        accepted = 0
        for topic, key, value in refused:
            if self._alone(topic, key, value) is None:
                accepted += 1
                continue
            kind, letter = self._refused_letter(topic, key, value)
            dead_topic = self.topics[DEAD_LETTER]
            why = self._alone(dead_topic, key, letter)
            if why is not None:
                raise DeliveryError(f"the broker refused the {kind} of a record for its size, "
                                    f"and its dead letter ({len(letter):,} bytes) could not be "
                                    f"written either: {why} on {dead_topic!r}")
            self.replaced[kind] = self.replaced.get(kind, 0) + 1
        if accepted:
            log.warning("the broker refused a batch for its size; its messages were sent again "
                        "one by one", extra={
                            "event": "batch_refused", "messages": accepted,
                            "hint": "set --kafka-option message.max.bytes to the topic's "
                                    "max.message.bytes so that batches fit"})

    def _alone(self, topic: str, key: bytes | None, value: bytes) -> str | None:
        """Produces one message by itself (nothing else is waiting) and waits for it: None
        when it is acknowledged, why not when it is too large."""
        if self._produce(topic, value, key) is not None:
            return f"over the producer's message.max.bytes ({self.max_message_bytes:,})"
        self._wait()
        if self.refused:
            self.refused.clear()
            return "refused by the broker for its size"
        return None

    def _refused_letter(self, topic: str, key: bytes | None, value: bytes) -> tuple[str, bytes]:
        """The kind of a message the broker refused, alone, for its size, and the dead letter
        of its record: found by the ``deepwatch.source`` the message carries, among the
        batches written since the last flush."""
        size = len(value) + len(key or b"")
        try:
            doc = json.loads(value)
            source = doc["deepwatch"]["source"]
            kind = self._kind_of(topic, doc)
        except (ValueError, KeyError, TypeError):
            raise DeliveryError(f"a message of {size:,} bytes to {topic!r} was refused by the "
                                "broker for its size") from None
        if kind == DEAD_LETTER:
            raise DeliveryError(f"a dead letter of {size:,} bytes was refused by the broker for "
                                f"its size: {topic!r} takes smaller messages than the producer's "
                                f"message.max.bytes ({self.max_message_bytes:,})")
        found = find_record([raw for raw, _, _ in self._written], source)
        if found is None or DEAD_LETTER not in self.topics:
            raise DeliveryError(f"the broker refused the {kind} of a record ({size:,} bytes) "
                                f"for its size on {topic!r}, and it cannot be written as a dead "
                                "letter")
        raw, row = found
        fmt, now = next((f, n) for r, f, n in self._written if r is raw)
        why = (f"its {kind.replace('_', ' ')} message was {size:,} bytes, over the broker's "
               f"size limit for {topic!r} (its max.message.bytes, lower than the producer's "
               f"message.max.bytes, {self.max_message_bytes:,}): the broker refused it")
        log.warning("message refused by the broker for its size, written as a dead letter",
                    extra={"event": "oversized", "kind": kind, "bytes": size, "topic": topic,
                           "limit": "broker"})
        self.oversized += 1
        return kind, record_dead_letter(raw, row, why, fmt, now)

    def _kind_of(self, topic: str, doc: dict[str, Any]) -> str:
        kinds = [k for k, t in self.topics.items() if t == topic]
        if len(kinds) == 1:
            return kinds[0]
        # one topic for several kinds: a dead letter says why, an alert is an ECS event
        return DEAD_LETTER if "reason" in doc else ALERT if "event" in doc else VERDICT

    def take_replaced(self) -> dict[str, int]:
        """How many messages of each kind were refused by the broker and written as dead
        letters since the last call (the run loop counts what was written)."""
        replaced, self.replaced = self.replaced, {}
        return replaced

    def close(self) -> None:
        """Waits up to ``flush_timeout`` (after a stop: what is left of ``STOP_FLUSH_S``) for
        what was produced to be acknowledged, then destroys the producer. What is still not
        acknowledged then is dropped: it was not committed, so it is read again."""
        if self._closed:
            return
        try:
            self._flush(self.flush_timeout)
        finally:
            self._destroy()

    def _destroy(self) -> None:
        """Destroys the producer now (its threads stop, and with them its connection attempts
        and logs); idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            # Producer.close() waits for every message still queued, without a time limit
            self.producer.purge()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.producer.close()
            for w in caught:
                log.warning(f"closing the kafka producer: {w.message}",
                            extra={"event": "close_error", "error": str(w.message)})
        finally:
            self._log.close()
