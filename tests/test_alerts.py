"""The ECS alert builder: fields, nesting of a format's ECS columns, risk and severity."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest

from deepwatch.alerts import (
    AlertContext,
    alert_lines,
    malicious,
    risk_scores,
    severities,
    write_alerts,
)

NOW = datetime(2026, 5, 1, 12, 30, 15, 250000, tzinfo=UTC)


def _scored() -> pa.Table:
    return pa.table({
        "client_ip": ["203.0.113.9", "198.51.100.7", "192.0.2.1"],
        "dst_port": pa.array([443, 80, 22], pa.int64()),
        "timestamp": pa.array([datetime(2015, 5, 17, 10, 5, 3, tzinfo=UTC)] * 3,
                              pa.timestamp("us", tz="UTC")),
        "score": [0.97, 0.2, 0.55],
        "verdict": ["malicious", "normal", "malicious"],
        "attack_type": ["smurf", "normal", "satan"],
        "category": ["dos", "normal", "probe"],
        "explanation": ['{"src_bytes": 0.61, "count": 0.2}', None, '{"flag": 0.9}'],
    })


def _ctx(**kw: object) -> AlertContext:
    base: dict[str, object] = {
        "rule_name": "deepwatch-mlp", "rule_version": "abc123", "format_name": "access",
        "ecs_fields": {"source.ip": "client_ip", "destination.port": "dst_port",
                       "@timestamp": "timestamp"}}
    base.update(kw)
    return AlertContext(**base)  # type: ignore[arg-type]


def test_alert_has_the_contract_fields() -> None:
    scored = malicious(_scored())
    docs = [json.loads(b) for b in alert_lines(scored, _ctx(), now=NOW)]
    assert len(docs) == 2
    a = docs[0]
    assert a["@timestamp"] == "2015-05-17T10:05:03.000Z"  # the record's own time
    assert a["event"]["kind"] == "alert"
    assert a["event"]["category"] == ["network", "intrusion_detection"]
    assert a["event"]["risk_score"] == 97.0 and a["event"]["severity"] == 4
    assert a["rule"] == {"name": "deepwatch-mlp", "version": "abc123"}
    assert a["observer"]["type"] == "ids"
    assert a["source"] == {"ip": "203.0.113.9"}
    assert a["destination"] == {"port": 443}
    dw = a["deepwatch"]
    assert (dw["score"], dw["verdict"], dw["attack_type"], dw["category"]) == (
        0.97, "malicious", "smurf", "dos")
    assert dw["explanation"]["src_bytes"] == 0.61  # JSON, not a string in a string
    assert docs[1]["deepwatch"]["explanation"] == {"flag": 0.9}
    assert dw["record"]["client_ip"] == "203.0.113.9" and "score" not in dw["record"]
    assert docs[1]["event"]["severity"] == 2 and docs[1]["deepwatch"]["attack_type"] == "satan"


def test_a_padded_field_cannot_push_an_alert_past_a_message_size_limit() -> None:
    """An attacker's 600 KB URL must not make the alert too big to deliver (Kafka's limit is
    1 MB): every text field is cut to MAX_FIELD_CHARS, and the alert names what was cut."""
    from deepwatch.alerts import MAX_FIELD_CHARS

    url = "/index.php?q=" + "A" * 600_000
    scored = malicious(_scored().append_column(
        "url", pa.array([url, "/", "/ok"])).append_column(
        "user_agent", pa.array(["w3af", "x", "U" * (MAX_FIELD_CHARS + 1)])))
    ctx = _ctx(ecs_fields={"url.original": "url", "user_agent.original": "user_agent"})
    raw = alert_lines(scored, ctx, now=NOW)
    assert all(len(b) < 60_000 for b in raw)
    a, b = (json.loads(x) for x in raw)
    assert a["url"]["original"] == url[:MAX_FIELD_CHARS]
    assert a["deepwatch"]["record"]["url"] == url[:MAX_FIELD_CHARS]
    assert a["deepwatch"]["truncated"] == ["url"]
    assert b["deepwatch"]["truncated"] == ["user_agent"] and b["url"]["original"] == "/ok"
    # nothing long: nothing cut, no key
    plain = json.loads(alert_lines(malicious(_scored()), _ctx(), now=NOW)[0])
    assert "truncated" not in plain["deepwatch"]


def test_without_a_time_column_the_alert_is_stamped_now() -> None:
    scored = malicious(_scored()).drop_columns(["timestamp"])
    doc = json.loads(alert_lines(scored, _ctx(), now=NOW)[0])
    assert doc["@timestamp"] == "2026-05-01T12:30:15.250Z"


def test_source_becomes_deepwatch_source_and_lengths_must_match() -> None:
    import polars as pl

    scored = malicious(_scored())
    src = pl.DataFrame({"topic": ["t", "t"], "partition": [0, 2], "offset": [5, 9]})
    docs = [json.loads(b) for b in alert_lines(scored, _ctx(), src, now=NOW)]
    assert [d["deepwatch"]["source"] for d in docs] == [
        {"topic": "t", "partition": 0, "offset": 5}, {"topic": "t", "partition": 2, "offset": 9}]
    with pytest.raises(ValueError, match="source rows"):
        alert_lines(scored, _ctx(), src.head(1), now=NOW)


def test_write_alerts_writes_json_lines() -> None:
    buf = io.BytesIO()
    n = write_alerts(buf, malicious(_scored()), _ctx(include_record=False), now=NOW)
    lines = buf.getvalue().splitlines()
    assert n == len(lines) == 2
    assert all("record" not in json.loads(x)["deepwatch"] for x in lines)
    assert write_alerts(buf, malicious(_scored()).slice(0, 0), _ctx(), now=NOW) == 0


def test_risk_and_severity_scales() -> None:
    probs = np.array([0.0, 0.39, 0.5, 0.75, 0.95, 1.0, np.nan])
    risk = risk_scores(probs, _ctx())
    assert risk.tolist() == [0.0, 39.0, 50.0, 75.0, 95.0, 100.0, 0.0]
    assert severities(risk).tolist() == [1, 1, 2, 3, 4, 4, 1]
    # an autoencoder's unbounded error: its calibrated threshold reads as 50, never above 100
    anomaly = _ctx(bounded_score=False, anomaly_threshold=2.0)
    assert risk_scores(np.array([0.0, 2.0, 6.0, 1e9]), anomaly).tolist() == [
        0.0, 50.0, 75.0, 100.0]


def test_plain_text_explanation_stays_a_string() -> None:
    scored = malicious(_scored()).drop_columns(["explanation"]).append_column(
        "explanation", pa.array(["src_bytes high", "flag odd"]))
    docs = [json.loads(b) for b in alert_lines(scored, _ctx(), now=NOW)]
    assert [d["deepwatch"]["explanation"] for d in docs] == ["src_bytes high", "flag odd"]
