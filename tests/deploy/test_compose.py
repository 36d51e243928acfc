"""Checks over docker-compose.yml: the Compose Specification schema, health-gated start order,
what each service is given and where it points."""

from __future__ import annotations

import hashlib
import json
import re
from urllib.parse import urlsplit

import jsonschema

from conftest import (
    AGGREGATOR_GRPC_PORT,
    REPO,
    SCHEMAS,
    SERVICES,
    binary_help,
    compose,
    compose_binary_of,
    rabbitmq_password_ok,
    redis_password_ok,
    redis_users,
    source_env_names,
)

COMPOSE_SCHEMA_SHA256 = "0dc04bd346dcfee1b1419628fff79937bbf076925f298f272a2b490e2b112bac"
GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def services() -> dict[str, dict]:
    return compose()["services"]


def cairn_services() -> dict[str, dict]:
    """Binary -> its compose service."""
    return {b: s for s in services().values() if (b := compose_binary_of(s))}


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with every VAR unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_vendored_schema_is_unchanged():
    digest = hashlib.sha256((SCHEMAS / "compose_spec.json").read_bytes()).hexdigest()
    assert digest == COMPOSE_SCHEMA_SHA256, "tests/deploy/schemas/compose_spec.json changed: see SOURCES.md"


def test_compose_file_validates_against_the_compose_spec():
    schema = json.loads((SCHEMAS / "compose_spec.json").read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_schema_rejects_mistakes():
    """The schema check above can fail: a misspelt key and a bad condition are caught."""
    schema = json.loads((SCHEMAS / "compose_spec.json").read_text())
    validator = jsonschema.Draft201909Validator(schema)
    bad = json.loads(json.dumps(compose()))
    bad["services"]["ingress"]["healthchek"] = bad["services"]["ingress"].pop("healthcheck")
    assert list(validator.iter_errors(bad))
    bad = json.loads(json.dumps(compose()))
    bad["services"]["ingress"]["depends_on"]["redis"]["condition"] = "healthy"
    assert list(validator.iter_errors(bad))


def test_durations_are_valid():
    """The schema's `format: duration` is not enforced by the validator: check Go durations."""
    for name, service in services().items():
        for key in ("interval", "timeout", "start_period"):
            value = (service.get("healthcheck") or {}).get(key)
            if value is not None:
                assert GO_DURATION.match(value), f"{name}: healthcheck.{key} {value!r}"
        if "stop_grace_period" in service:
            assert GO_DURATION.match(service["stop_grace_period"]), name


def test_health_gated_dependencies_have_healthchecks():
    for name, service in services().items():
        deps = service.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for dep, spec in deps.items():
            assert dep in services(), f"{name} depends on unknown service {dep}"
            if spec["condition"] == "service_healthy":
                check = services()[dep].get("healthcheck")
                assert check and not check.get("disable"), f"{name} waits for {dep} to be healthy, which has no healthcheck"
            # A service that is always started must not wait for one that only a profile starts.
            if not service.get("profiles"):
                assert not services()[dep].get("profiles"), f"{name} depends on profile-only {dep}"


def test_start_order_has_no_cycle():
    graph = {n: set((s.get("depends_on") or {})) for n, s in services().items()}
    done: set[str] = set()
    while graph.keys() - done:
        ready = {n for n in graph.keys() - done if graph[n] <= done}
        assert ready, f"depends_on cycle among {sorted(graph.keys() - done)}"
        done |= ready


def test_every_cairn_service_runs_its_own_healthcheck():
    assert sorted(cairn_services()) == sorted(SERVICES), "every service binary runs in compose"
    for binary_name, service in cairn_services().items():
        assert service["healthcheck"]["test"] == ["CMD", binary_name, "healthcheck"], binary_name
        # The subcommand exists in the binary the service runs.
        assert "healthcheck" in binary_help(binary_name).subcommands, f"{binary_name} has no healthcheck subcommand"
        deps = service.get("depends_on") or {}
        assert deps and all(d["condition"] == "service_healthy" for d in deps.values()), binary_name
        assert service.get("read_only") is True and "ALL" in service.get("cap_drop", []), binary_name


def test_datastores():
    redis = services()["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes", "Redis without AOF"
    assert any(v.split(":")[1] == "/data" for v in redis["volumes"]), "Redis data not on a volume"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    rabbit = services()["rabbitmq"]
    assert rabbit["image"].endswith("-management"), "RabbitMQ without the management UI"
    assert rabbit["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
    plugins_mount = next(v for v in rabbit["volumes"] if v.split(":")[1] == "/etc/rabbitmq/enabled_plugins")
    plugins = (REPO / plugins_mount.split(":")[0]).read_text()
    assert re.fullmatch(r"\[[a-z_,]+\]\.\n", plugins), f"enabled_plugins is not an Erlang list: {plugins!r}"
    for plugin in ("rabbitmq_management", "rabbitmq_consistent_hash_exchange"):
        assert plugin in plugins
    assert any(v.split(":")[1] == "/var/lib/rabbitmq" for v in rabbit["volumes"])
    assert rabbit.get("hostname"), "RabbitMQ's data is keyed by node name: fix the hostname"
    for volume in (redis["volumes"][0], rabbit["volumes"][-1]):
        assert volume.split(":")[0] in compose()["volumes"], f"{volume} is not a named volume"


def test_published_ports():
    def published(service):
        return {str(p).split(":")[-2] if str(p).count(":") else str(p) for p in service.get("ports") or []}

    assert "8080" in published(cairn_services()["ingress"])
    assert str(AGGREGATOR_GRPC_PORT) in published(cairn_services()["progress-aggregator"])


def test_env_names_are_read_by_the_service():
    declared = source_env_names()
    problems = []
    for binary_name, service in cairn_services().items():
        names = set(environment(service))
        if unknown := names - declared:
            problems.append(f"{binary_name}: {sorted(unknown)} are declared by no crate")
        if unread := names - binary_help(binary_name).env:
            problems.append(f"{binary_name}: {sorted(unread)} are not read by `{binary_name}` (--help)")
    assert not problems, "\n".join(problems)


def test_urls_point_at_compose_services():
    listening = {"redis": {6379}, "rabbitmq": {5672}}
    for binary_name, service in cairn_services().items():
        name = next(n for n, s in services().items() if s is service)
        listening[name] = {SERVICES[binary_name][1]}
    listening["progress-aggregator"].add(AGGREGATOR_GRPC_PORT)
    listening["ingress"].add(8080)  # the public port; SERVICES names its admin port
    for binary_name, service in cairn_services().items():
        for var, value in environment(service).items():
            if not var.endswith("_URL"):
                continue
            url = urlsplit(interpolate(value))
            assert url.hostname in services(), f"{binary_name}: {var} names unknown host {url.hostname}"
            assert url.port in listening[url.hostname], f"{binary_name}: {var} port {url.port} is not served"
            # Each service as its own user, whose password the users' files accept.
            if url.scheme == "redis":
                assert url.username == binary_name, f"{binary_name}: {var} is not its own Redis user"
                assert redis_password_ok(url.username, url.password), f"{binary_name}: {var}'s password"
            if url.scheme == "amqp":
                assert url.username == binary_name, f"{binary_name}: {var} is not its own RabbitMQ user"
                assert rabbitmq_password_ok(url.username, url.password), f"{binary_name}: {var}'s password"


def test_datastores_load_the_users():
    """Redis loads deploy/redis/users.acl, RabbitMQ deploy/rabbitmq/definitions.json (through a
    conf.d file naming it); the default Redis user may only PING, for the health check."""
    redis = services()["redis"]
    command = redis["command"]
    acl = command[command.index("--aclfile") + 1]
    assert any(v.split(":")[:2] == ["./deploy/redis/users.acl", acl] for v in redis["volumes"])
    assert redis_users()["default"].split()[-2:] == ["-@all", "+ping"], "default may do more than PING"
    rabbit = services()["rabbitmq"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in rabbit["volumes"]}
    conf = next(REPO / src for dst, src in mounts.items() if dst.startswith("/etc/rabbitmq/conf.d/"))
    loaded = re.search(r"^load_definitions\s*=\s*(\S+)$", conf.read_text(), re.M).group(1)
    assert mounts[loaded] == "./deploy/rabbitmq/definitions.json"


def test_stop_grace_outlasts_the_drain():
    for binary_name, service in cairn_services().items():
        grace = environment(service).get("CAIRN_SHUTDOWN_GRACE", "10s")
        assert _seconds(service.get("stop_grace_period", "10s")) > _seconds(grace), binary_name


def _seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)", text)
    assert m, f"unexpected duration {text!r}"
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def test_bind_mounts_exist():
    for name, service in services().items():
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"


def test_observability_profile():
    profiled = {n for n, s in services().items() if "observability" in (s.get("profiles") or [])}
    assert {"otel-collector", "jaeger", "prometheus", "grafana"} <= profiled
    assert not profiled & set(cairn_services()), "the services must run without the profile"
