"""Checks over the observability profile's configs: Prometheus scrapes every service where it
serves /metrics, the Grafana dashboard asks for metrics the code emits through the provisioned
datasource, and the OpenTelemetry collector's pipeline is wired."""

from __future__ import annotations

import json
import re

from conftest import REPO, SERVICES, compose, compose_binary_of, emitted_metrics, load_yaml, prometheus_series_names

DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "cairn.json"
PROMQL_WORDS = {
    "sum", "rate", "increase", "irate", "histogram_quantile", "by", "without", "max", "min", "avg",
    "count", "le", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
    "topk", "bottomk", "clamp_min", "clamp_max", "abs", "delta", "deriv", "time", "vector", "scalar",
}


def compose_service_for(binary_name: str) -> str:
    for name, service in compose()["services"].items():
        if compose_binary_of(service) == binary_name:
            return name
    raise AssertionError(f"no compose service runs {binary_name}")


def test_prometheus_scrapes_every_service():
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    targets = {
        t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]
    }
    for binary_name, (_, port) in SERVICES.items():
        target = f"{compose_service_for(binary_name)}:{port}"
        assert target in targets, f"Prometheus does not scrape {binary_name} at {target}"
    mounts = compose()["services"]["prometheus"]["volumes"]
    assert any(m.startswith("./deploy/prometheus/prometheus.yml:") for m in mounts)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    out = []
    for p in dashboard()["panels"]:
        out.append(p)
        out.extend(p.get("panels") or [])
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (identifiers that are not functions, keywords,
    label names or Grafana variables)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr))
    return {n for n in names if n not in PROMQL_WORDS and not re.fullmatch(r"[\d.e]+", n)}


def test_dashboard_asks_for_metrics_the_code_emits():
    known = prometheus_series_names() | {"up"}
    problems = []
    for p in panels():
        for t in p.get("targets") or []:
            for name in metric_names(t["expr"]):
                if name not in known:
                    problems.append(f"panel {p['title']!r}: {name} is emitted by no crate")
    assert not problems, "\n".join(problems)


def test_dashboard_covers_the_signals():
    """Request rate, latency histogram, group lag, pending, progress updates/s, trimmed."""
    exprs = {p["title"]: " ".join(t["expr"] for t in p.get("targets") or []) for p in panels()}
    wanted = {
        "request rate": "http_server_requests_total",
        "latency": "http_server_request_duration_seconds_bucket",
        "group lag": "cairn_stream_group_lag",
        "pending": "cairn_stream_group_pending",
        "progress updates": "cairn_progress_updates_applied_total",
        "finished requests": "cairn_requests_finished_total",
        "trimmed entries": "cairn_trimmer_trimmed_total",
    }
    for signal, metric in wanted.items():
        assert any(metric in e for e in exprs.values()), f"no panel shows {signal} ({metric})"
        assert metric.removesuffix("_bucket") in emitted_metrics(), f"{metric} is not emitted"
    assert any(p["type"] == "heatmap" for p in panels()), "no latency histogram (heatmap) panel"


def test_dashboard_uses_the_provisioned_datasource():
    provisioned = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    prometheus = next(d for d in provisioned["datasources"] if d["type"] == "prometheus")
    assert prometheus["url"].split("//")[1].split(":")[0] in compose()["services"]
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in panels():
        if p["type"] == "row":
            continue
        for ds in [p["datasource"]] + [t["datasource"] for t in p["targets"]]:
            assert ds["type"] == "prometheus"
            uid = ds["uid"]
            if m := re.fullmatch(r"\$\{(\w+)\}", uid):
                var = variables[m.group(1)]
                assert var["type"] == "datasource" and var["query"] == "prometheus"
                assert var["current"]["value"] == prometheus["uid"], "the variable's default is not the provisioned one"
            else:
                assert uid == prometheus["uid"]


def test_grafana_provisioning_matches_the_mounts():
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "cairn.yaml")
    path = provider["providers"][0]["options"]["path"]
    mounts = compose()["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


def test_otel_collector_pipeline_is_wired():
    config = load_yaml(DEPLOY / "otel" / "collector.yaml")
    for pipeline in config["service"]["pipelines"].values():
        for section in ("receivers", "processors", "exporters"):
            for name in pipeline.get(section, []):
                assert name in config[section], f"pipeline uses undefined {section[:-1]} {name}"
    for extension in config["service"].get("extensions", []):
        assert extension in config["extensions"]
    for exporter in config["exporters"].values():
        host = exporter["endpoint"].split(":")[0]
        assert host in compose()["services"], f"collector exports to unknown host {host}"
    mounts = compose()["services"]["otel-collector"]["volumes"]
    assert any(m.startswith("./deploy/otel/collector.yaml:") for m in mounts)
