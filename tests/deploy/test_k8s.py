"""Checks over the rendered kustomize overlays (k8s/overlays/dev and prod): schemas, hardening,
probes, graceful termination, disruption budgets, autoscaling, references, network policy
reachability and the environment the services are given."""

from __future__ import annotations

import base64
import copy
import ipaddress
import json
import re
import subprocess
from functools import cache
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest

from conftest import (
    ADMIN_ADDR_VAR,
    AGGREGATOR_GRPC_PORT,
    K8S_VERSION,
    OVERLAYS,
    REPO,
    SERVICES,
    binary_help,
    by_kind,
    cairn_binary_of,
    find,
    rabbitmq_password_ok,
    redis_password_ok,
    rendered,
    source_env_names,
)

WORKLOADS = ("Deployment", "StatefulSet")


def workloads(objects):
    return by_kind(objects, *WORKLOADS)


def pod_spec(workload) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(workload) -> list[dict]:
    spec = pod_spec(workload)
    return list(spec.get("initContainers") or []) + list(spec["containers"])


def cairn_deployments(objects) -> dict[str, dict]:
    """Binary -> its Deployment."""
    found = {}
    for d in by_kind(objects, "Deployment"):
        for c in pod_spec(d)["containers"]:
            if (b := cairn_binary_of(c)) is not None:
                found[b] = d
    return found


# --- schemas -----------------------------------------------------------------------------------


def _strict(node):
    """Rejects unknown fields wherever the schema lists the known ones (kubectl's strict mode)."""
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for v in node.values():
            _strict(v)
    elif isinstance(node, list):
        for v in node:
            _strict(v)
    return node


@cache
def keda_validators() -> dict[str, jsonschema.Validator]:
    """Strict JSON schemas of KEDA's CRDs, from the models cloudcoil generates from them."""
    from cloudcoil.models.keda import v1alpha1

    out = {}
    for kind in ("ScaledObject", "TriggerAuthentication"):
        model = getattr(v1alpha1, kind)
        schema = _strict(model.model_json_schema(by_alias=True, mode="validation"))
        out[kind] = jsonschema.Draft202012Validator(schema)
    return out


def schema_errors(obj: dict) -> list[str]:
    group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
    if group == "keda.sh":
        validator = keda_validators().get(obj["kind"])
        if validator is None:
            return [f"no vendored schema for KEDA kind {obj['kind']}"]
        return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'/'.join(map(str, e.path))}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"no Kubernetes {K8S_VERSION} schema for {obj['apiVersion']} {obj['kind']}: {e}"]
    return []


def test_every_object_validates_against_its_schema(overlay):
    problems = {}
    for obj in rendered(overlay):
        if errors := schema_errors(obj):
            problems[f"{obj['kind']}/{obj['metadata']['name']}"] = errors
    assert not problems, json.dumps(problems, indent=2)


def test_schema_validation_catches_mistakes():
    """The validators above reject what a typo produces (so the test above can fail)."""
    deployment = copy.deepcopy(cairn_deployments(rendered("dev"))["ingress"])
    pod_spec(deployment)["containers"][0]["readinessProbes"] = {}
    assert schema_errors(deployment)
    deployment = copy.deepcopy(cairn_deployments(rendered("dev"))["ingress"])
    pod_spec(deployment)["terminationGracePeriodSeconds"] = "30"
    assert schema_errors(deployment)
    scaled = copy.deepcopy(by_kind(rendered("prod"), "ScaledObject")[0])
    scaled["spec"]["minReplicas"] = 2
    assert schema_errors(scaled)
    del scaled["spec"]["minReplicas"]
    del scaled["spec"]["scaleTargetRef"]
    assert schema_errors(scaled)


# --- hardening ---------------------------------------------------------------------------------


def test_workloads_are_hardened(overlay):
    problems = []
    sas = {sa["metadata"]["name"]: sa for sa in by_kind(rendered(overlay), "ServiceAccount")}
    for w in workloads(rendered(overlay)):
        name = f"{w['kind']}/{w['metadata']['name']}"
        spec = pod_spec(w)
        sa = sas.get(spec.get("serviceAccountName", "default"), {})
        if spec.get("automountServiceAccountToken", sa.get("automountServiceAccountToken")) is not False:
            problems.append(f"{name}: service account token is mounted")
        if spec.get("enableServiceLinks") is not False:
            problems.append(f"{name}: enableServiceLinks is not false")
        psc = spec.get("securityContext") or {}
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: pod seccompProfile is not RuntimeDefault")
        for c in containers(w):
            cname = f"{name} container {c['name']}"
            sc = c.get("securityContext") or {}
            if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
                problems.append(f"{cname}: runAsNonRoot is not true")
            if sc.get("runAsUser", psc.get("runAsUser", 1)) == 0:
                problems.append(f"{cname}: runs as uid 0")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cname}: allowPrivilegeEscalation is not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{cname}: readOnlyRootFilesystem is not true")
            if "ALL" not in (sc.get("capabilities") or {}).get("drop", []):
                problems.append(f"{cname}: capabilities do not drop ALL")
            if (sc.get("capabilities") or {}).get("add"):
                problems.append(f"{cname}: adds capabilities")
            if sc.get("privileged"):
                problems.append(f"{cname}: privileged")
            res = c.get("resources") or {}
            for section, keys in (("requests", ("cpu", "memory")), ("limits", ("memory",))):
                for key in keys:
                    if key not in (res.get(section) or {}):
                        problems.append(f"{cname}: no resources.{section}.{key}")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe not in c:
                    problems.append(f"{cname}: no {probe}")
    assert not problems, "\n".join(problems)


def test_images_are_pinned(overlay):
    problems = []
    for w in workloads(rendered(overlay)):
        for c in containers(w):
            image = c["image"]
            name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
            if "@sha256:" in image:
                continue
            if not tag or tag == "latest":
                problems.append(f"{w['metadata']['name']}/{c['name']}: image {image!r} has no pinned tag")
    assert not problems, "\n".join(problems)


def test_every_service_binary_is_deployed(overlay):
    assert sorted(cairn_deployments(rendered(overlay))) == sorted(SERVICES)


def _port_number(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return p["containerPort"]
    raise AssertionError(f"container {container['name']} has no port named {port!r}")


def test_cairn_probes_use_the_admin_endpoints(overlay):
    """Liveness asks /healthz only (a dependency outage must not restart pods), readiness asks
    /readyz, startup /healthz; all on the port the binary serves them on."""
    for binary_name, d in cairn_deployments(rendered(overlay)).items():
        c = next(c for c in pod_spec(d)["containers"] if cairn_binary_of(c) == binary_name)
        port = SERVICES[binary_name][1]
        expected = {"livenessProbe": "/healthz", "startupProbe": "/healthz", "readinessProbe": "/readyz"}
        for probe, path in expected.items():
            get = c[probe].get("httpGet")
            assert get, f"{binary_name}: {probe} is not an HTTP GET"
            assert get["path"] == path, f"{binary_name}: {probe} asks {get['path']}, expected {path}"
            assert _port_number(c, get["port"]) == port, f"{binary_name}: {probe} on the wrong port"


def _duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", text.strip())
    assert m, f"cannot read duration {text!r}"
    return float(m.group(1)) * units[m.group(2)]


def container_env(objects, container: dict) -> dict[str, str | None]:
    """A container's environment by name: literal values, or None for values from fields or
    secrets. envFrom first, then `env` (which wins, as in Kubernetes)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom") or []:
        if ref := source.get("configMapRef"):
            cm = find(objects, "ConfigMap", ref["name"])
            assert cm is not None, f"envFrom names missing ConfigMap {ref['name']}"
            env.update(cm.get("data") or {})
        if ref := source.get("secretRef"):
            secret = find(objects, "Secret", ref["name"])
            assert secret is not None, f"envFrom names missing Secret {ref['name']}"
            env.update({k: None for k in secret.get("data") or {}})
    for e in container.get("env") or []:
        env[e["name"]] = e.get("value")
    return env


def test_graceful_termination_outlasts_the_drain(overlay):
    """SIGTERM comes after the preStop sleep; the pod must then get CAIRN_SHUTDOWN_GRACE to
    drain before the kubelet kills it."""
    objects = rendered(overlay)
    for binary_name, d in cairn_deployments(objects).items():
        c = next(c for c in pod_spec(d)["containers"] if cairn_binary_of(c) == binary_name)
        pre_stop = (c.get("lifecycle") or {}).get("preStop") or {}
        assert "sleep" in pre_stop, f"{binary_name}: preStop is not the native sleep action (distroless has no shell)"
        sleep = pre_stop["sleep"]["seconds"]
        grace = _duration_seconds(container_env(objects, c).get("CAIRN_SHUTDOWN_GRACE") or "10s")
        period = pod_spec(d).get("terminationGracePeriodSeconds", 30)
        assert period > sleep + grace, (
            f"{binary_name}: terminationGracePeriodSeconds {period} <= preStop {sleep}s + CAIRN_SHUTDOWN_GRACE {grace}s"
        )


def selector_matches(selector: dict, labels: dict) -> bool:
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def test_every_deployment_has_a_disruption_budget(overlay):
    objects = rendered(overlay)
    pdbs = by_kind(objects, "PodDisruptionBudget")
    for d in by_kind(objects, "Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        matching = [p for p in pdbs if selector_matches(p["spec"]["selector"], labels)]
        assert len(matching) == 1, f"Deployment/{d['metadata']['name']}: {len(matching)} PodDisruptionBudgets select it"
        # maxUnavailable never blocks a node drain, whatever the replica count.
        assert "maxUnavailable" in matching[0]["spec"], f"{matching[0]['metadata']['name']}: use maxUnavailable"


def test_services_select_pods_and_name_real_ports(overlay):
    objects = rendered(overlay)
    for svc in by_kind(objects, "Service"):
        selected = [
            w for w in workloads(objects)
            if selector_matches({"matchLabels": svc["spec"]["selector"]}, w["spec"]["template"]["metadata"]["labels"])
        ]
        assert selected, f"Service/{svc['metadata']['name']} selects no pods"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for w in selected:
                for c in pod_spec(w)["containers"]:
                    if any(p.get("name") == target or p["containerPort"] == target for p in c.get("ports") or []):
                        break
                else:
                    raise AssertionError(f"Service/{svc['metadata']['name']} port {target} is no container port")


def test_workload_selectors_match_their_templates(overlay):
    for w in workloads(rendered(overlay)):
        assert selector_matches(w["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])


# --- autoscaling -------------------------------------------------------------------------------


def scalers_of(objects, deployment: str) -> list[str]:
    found = []
    for hpa in by_kind(objects, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        if ref["kind"] == "Deployment" and ref["name"] == deployment:
            found.append(f"HorizontalPodAutoscaler/{hpa['metadata']['name']}")
    for so in by_kind(objects, "ScaledObject"):
        ref = so["spec"]["scaleTargetRef"]
        if ref.get("kind", "Deployment") == "Deployment" and ref["name"] == deployment:
            found.append(f"ScaledObject/{so['metadata']['name']}")
    return found


def test_autoscaling(overlay):
    objects = rendered(overlay)
    deployments = cairn_deployments(objects)
    ingress_scalers = scalers_of(objects, deployments["ingress"]["metadata"]["name"])
    assert ingress_scalers and ingress_scalers[0].startswith("HorizontalPodAutoscaler/"), ingress_scalers
    # An HPA and a ScaledObject (which makes an HPA of its own) would fight over the replicas.
    for service in ("request-processor", "progress-aggregator"):
        scalers = scalers_of(objects, deployments[service]["metadata"]["name"])
        assert len(scalers) == 1, f"{service} needs exactly one scaler, has {scalers}"
    for name, d in deployments.items():
        if scalers_of(objects, d["metadata"]["name"]):
            # A replica count in the manifest would reset the autoscaler's choice on every apply.
            assert "replicas" not in d["spec"], f"{name}: autoscaled Deployment sets spec.replicas"


def scaled_object_of(objects, deployment: str) -> dict:
    (scaled,) = [so for so in by_kind(objects, "ScaledObject") if so["spec"]["scaleTargetRef"]["name"] == deployment]
    return scaled


def assert_trigger_auth_resolves(objects, trigger):
    auth = find(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth is not None, "the trigger's TriggerAuthentication is not rendered"
    for ref in auth["spec"]["secretTargetRef"]:
        secret = find(objects, "Secret", ref["name"])
        assert secret is not None and ref["key"] in (secret.get("data") or {}), f"missing Secret key {ref}"


def partition_streams(prefix: str, stream: str, partitions: int, cluster: bool) -> list[str]:
    """The request stream of each partition, as cairn_redis::keys::requests::stream_in names them."""
    if cluster:
        return [f"{prefix}:{stream}{{p{n}}}" for n in range(partitions)]
    return [f"{prefix}:{stream}" if n == 0 else f"{prefix}:{stream}:{n}" for n in range(partitions)]


def test_partition_stream_names_follow_the_rust_key_layout():
    """The names above are the ones keys.rs's own test pins (`stream_in`), so a change there fails here."""
    keys_rs = (REPO / "crates" / "cairn-redis" / "src" / "keys.rs").read_text()
    assert 'stream_in("c", "requests", "", 2), "c:requests:2"' in keys_rs
    assert 'stream_in("c", "requests", &tag, 2), "c:requests{p2}"' in keys_rs
    assert partition_streams("c", "requests", 3, False) == ["c:requests", "c:requests:1", "c:requests:2"]
    assert partition_streams("c", "requests", 3, True)[2] == "c:requests{p2}"


@pytest.mark.parametrize("overlay_name", ["prod", "prod-cluster"])
def test_prod_scales_processors_on_group_lag(overlay_name):
    """One lag trigger per request stream partition the processors read, on the stream names the
    services derive from their configuration (one Redis: redis-streams; a cluster:
    redis-cluster-streams)."""
    objects = rendered(overlay_name)
    scaled = scaled_object_of(objects, "request-processor")
    assert scaled["spec"].get("minReplicaCount", 0) >= 1, "scale-to-zero would leave pending requests unreclaimed"
    config = container_env(objects, pod_spec(cairn_deployments(objects)["request-processor"])["containers"][0])
    defaults = rust_defaults()
    setting = lambda name: config.get(name) or defaults[name]  # noqa: E731
    cluster = setting("CAIRN_REDIS_CLUSTER") == "true"
    partitions = int(setting("CAIRN_REQUEST_PARTITIONS"))
    expected = partition_streams(setting("CAIRN_KEY_PREFIX"), setting("CAIRN_REQUEST_STREAM"), partitions, cluster)
    kind = "redis-cluster-streams" if cluster else "redis-streams"
    triggers = scaled["spec"]["triggers"]
    assert all(t["type"] == kind for t in triggers), f"{overlay_name}: triggers must all be {kind}"
    assert sorted(t["metadata"]["stream"] for t in triggers) == sorted(expected), \
        "the triggers watch other streams than the processors read"
    known = {"stream", "consumerGroup", "lagCount", "activationLagCount", "pendingEntriesCount", "streamLength",
             "enableTLS", "unsafeSsl", "usernameFromEnv", "passwordFromEnv"}
    if cluster:
        known |= {"addresses", "hosts", "ports"}
    else:
        known |= {"address", "host", "port", "databaseIndex", "addressFromEnv", "hostFromEnv", "portFromEnv"}
    for trigger in triggers:
        meta = trigger["metadata"]
        assert meta["consumerGroup"] == setting("CAIRN_REQUEST_GROUP")
        assert "lagCount" in meta and "activationLagCount" in meta, "lag-based trigger needs lagCount and activationLagCount"
        assert set(meta) <= known, f"unknown {kind} parameters: {set(meta) - known}"
        assert_trigger_auth_resolves(objects, trigger)


def test_prod_scales_aggregators_on_shard_backlog():
    """One rabbitmq trigger per shard queue the aggregators consume, and no more replicas than
    shards (a replica beyond them would own none)."""
    objects = rendered("prod")
    scaled = scaled_object_of(objects, "progress-aggregator")
    config = container_env(objects, pod_spec(cairn_deployments(objects)["progress-aggregator"])["containers"][0])
    defaults = rust_defaults()
    queue = config.get("CAIRN_PROGRESS_QUEUE") or defaults["CAIRN_PROGRESS_QUEUE"]
    shards = int(config.get("CAIRN_PROGRESS_SHARDS") or defaults["CAIRN_PROGRESS_SHARDS"])
    queues = [t["metadata"]["queueName"] for t in scaled["spec"]["triggers"] if t["type"] == "rabbitmq"]
    assert sorted(queues) == sorted(f"{queue}.{shard}" for shard in range(shards)), queues
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"] <= shards
    for trigger in scaled["spec"]["triggers"]:
        if trigger["type"] == "rabbitmq":
            assert trigger["metadata"]["mode"] == "QueueLength" and int(trigger["metadata"]["value"]) > 0
            assert_trigger_auth_resolves(objects, trigger)


@cache
def rust_defaults() -> dict[str, str]:
    """Default values of the stream/group/prefix/queue/shards variables, read from the clap attributes."""
    out = {}
    for path in REPO.glob("crates/*/src/**/*.rs"):
        text = path.read_text()
        for var, default in re.findall(r'env\s*=\s*"(CAIRN_[A-Z_]+)",\s*default_value\s*=\s*"([^"]*)"', text):
            out.setdefault(var, default)
        for var, default in re.findall(r'env\s*=\s*"(CAIRN_[A-Z_]+)",\s*default_value_t\s*=\s*(\d+)\b', text):
            out.setdefault(var, default)
    for var in ("CAIRN_KEY_PREFIX", "CAIRN_REQUEST_STREAM", "CAIRN_REQUEST_GROUP", "CAIRN_PROGRESS_QUEUE",
                "CAIRN_PROGRESS_SHARDS", "CAIRN_REQUEST_PARTITIONS", "CAIRN_REDIS_CLUSTER"):
        assert var in out, f"no default for {var} found in crates/*/src"
    return out


# --- references --------------------------------------------------------------------------------


def test_references_resolve(overlay):
    objects = rendered(overlay)
    problems = []
    for w in workloads(objects):
        spec = pod_spec(w)
        name = f"{w['kind']}/{w['metadata']['name']}"
        sa = spec.get("serviceAccountName")
        if sa and find(objects, "ServiceAccount", sa) is None:
            problems.append(f"{name}: ServiceAccount {sa} is not rendered")
        for vol in spec.get("volumes") or []:
            if (cm := vol.get("configMap")) and find(objects, "ConfigMap", cm["name"]) is None:
                problems.append(f"{name}: ConfigMap {cm['name']} is not rendered")
            if (s := vol.get("secret")) and find(objects, "Secret", s["secretName"]) is None:
                problems.append(f"{name}: Secret {s['secretName']} is not rendered")
        for c in containers(w):
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    secret = find(objects, "Secret", ref["name"])
                    if secret is None or ref["key"] not in (secret.get("data") or {}):
                        problems.append(f"{name}: secret key {ref['name']}/{ref['key']} is not rendered")
            container_env(objects, c)  # asserts envFrom sources exist
            mounts = {m["name"] for m in c.get("volumeMounts") or []}
            declared = {v["name"] for v in spec.get("volumes") or []}
            declared |= {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates") or []}
            if missing := mounts - declared:
                problems.append(f"{name}: mounts undeclared volumes {missing}")
    assert not problems, "\n".join(problems)


def test_handlers_configmap_is_the_deploy_file():
    cm = next(c for c in by_kind(rendered("dev"), "ConfigMap") if c["metadata"]["name"].startswith("cairn-handlers"))
    assert cm["data"]["handlers.toml"] == (REPO / "deploy" / "handlers.toml").read_text(), (
        "k8s/base/handlers.toml differs from deploy/handlers.toml: keep the copies equal"
    )


# --- environment -------------------------------------------------------------------------------


def test_env_names_are_read_by_the_service(overlay):
    """Every variable given to a Cairn container is one its binary reads: declared in the crates
    (`env = "CAIRN_…"`) and listed by `<binary> --help`. A renamed variable fails here."""
    objects = rendered(overlay)
    declared = source_env_names()
    problems = []
    for binary_name, d in cairn_deployments(objects).items():
        for c in pod_spec(d)["containers"]:
            if cairn_binary_of(c) != binary_name:
                continue
            names = set(container_env(objects, c))
            if unknown := names - declared:
                problems.append(f"{binary_name}: {sorted(unknown)} are declared by no crate")
            if unread := names - binary_help(binary_name).env:
                problems.append(f"{binary_name}: {sorted(unread)} are not read by `{binary_name}` (--help)")
    assert not problems, "\n".join(problems)


def _secret_value(secret: dict, key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


def test_urls_point_at_rendered_services():
    """Dev: the connection URLs name the in-cluster Services on their ports, with the broker's
    dev credentials; ingress reaches the aggregator's gRPC Service; handlers' progress URL is
    the ingress Service."""
    objects = rendered("dev")
    secret = next(s for s in by_kind(objects, "Secret") if s["metadata"]["name"].startswith("cairn-secrets"))
    services = {s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]} for s in by_kind(objects, "Service")}
    deployments = cairn_deployments(objects)
    # Each service's URLs: its own user, whose password the dev stores' users files accept.
    for binary_name, deployment in deployments.items():
        env = {e["name"]: e for e in pod_spec(deployment)["containers"][0].get("env") or []}
        for var in ("CAIRN_REDIS_URL", "CAIRN_AMQP_URL"):
            if var not in env:
                continue
            url = urlsplit(_secret_value(secret, env[var]["valueFrom"]["secretKeyRef"]["key"]))
            assert url.port in services.get(url.hostname, set()), f"no Service {url.hostname}:{url.port}"
            assert url.username == binary_name, f"{binary_name}: {var} is not its own user"
            ok = redis_password_ok if var == "CAIRN_REDIS_URL" else rabbitmq_password_ok
            assert ok(url.username, url.password), f"{binary_name}: {var}'s password is not the users file's"
    ingress_env = container_env(objects, pod_spec(deployments["ingress"])["containers"][0])
    agg = urlsplit(ingress_env["CAIRN_AGGREGATOR_URL"])
    assert agg.port == AGGREGATOR_GRPC_PORT and AGGREGATOR_GRPC_PORT in services[agg.hostname]
    processor_env = container_env(objects, pod_spec(deployments["request-processor"])["containers"][0])
    public = urlsplit(processor_env["CAIRN_PUBLIC_URL"])
    assert public.port in services[public.hostname] and public.hostname == deployments["ingress"]["metadata"]["name"]


def test_admin_ports_are_the_binaries_defaults():
    """The ports probed and scraped are where each binary listens by default (--help)."""
    for binary_name, (_, port) in SERVICES.items():
        var = ADMIN_ADDR_VAR[binary_name]
        m = re.search(rf"\[env: {var}=?\]\s*\[default: [^\]]*:(\d+)\]", binary_help(binary_name).text)
        assert m, f"{binary_name} --help shows no default for {var}"
        assert int(m.group(1)) == port, f"{binary_name} listens on {m.group(1)} by default, deploy files use {port}"


# --- the dev overlay's data stores, prod's secrets -----------------------------------------------


def test_dev_runs_its_own_datastores():
    objects = rendered("dev")
    sets = {s["metadata"]["name"]: s for s in by_kind(objects, "StatefulSet")}
    assert set(sets) == {"redis", "rabbitmq"}
    for s in sets.values():
        assert s["spec"]["replicas"] == 1
        assert s["spec"].get("volumeClaimTemplates"), f"{s['metadata']['name']}: no PVC"
        headless = find(objects, "Service", s["spec"]["serviceName"])
        assert headless is not None, f"{s['metadata']['name']}: governing Service missing"
    redis_args = pod_spec(sets["redis"])["containers"][0]["args"]
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes", "dev Redis without AOF"
    plugins = next(c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"].startswith("rabbitmq-plugins"))
    enabled = plugins["data"]["enabled_plugins"]
    assert "rabbitmq_consistent_hash_exchange" in enabled and "rabbitmq_management" in enabled
    assert enabled == (REPO / "deploy" / "rabbitmq" / "enabled_plugins").read_text()
    mounts = pod_spec(sets["rabbitmq"])["containers"][0]["volumeMounts"]
    assert any(m["mountPath"] == "/etc/rabbitmq/enabled_plugins" for m in mounts)
    # The users: the same files as compose's, mounted where the stores load them.
    assert redis_args[redis_args.index("--aclfile") + 1] == "/etc/redis/users.acl"
    users = next(s for s in by_kind(objects, "Secret") if s["metadata"]["name"].startswith("redis-users"))
    assert _secret_value(users, "users.acl") == (REPO / "deploy" / "redis" / "users.acl").read_text()
    definitions = next(s for s in by_kind(objects, "Secret") if s["metadata"]["name"].startswith("rabbitmq-definitions"))
    assert _secret_value(definitions, "definitions.json") == (REPO / "deploy" / "rabbitmq" / "definitions.json").read_text()
    assert _secret_value(definitions, "rabbitmq-cairn.conf") == (REPO / "deploy" / "rabbitmq" / "cairn.conf").read_text()
    assert {m["mountPath"] for m in mounts} >= {"/etc/rabbitmq/definitions.json", "/etc/rabbitmq/conf.d/20-cairn.conf"}


def test_prod_uses_external_datastores_from_ignored_secrets():
    objects = rendered("prod")
    assert not by_kind(objects, "StatefulSet"), "prod must not run its own Redis/RabbitMQ"
    aggregators = scaled_object_of(objects, "progress-aggregator")
    assert aggregators["spec"]["minReplicaCount"] > 1, "one aggregator alone has no failover"
    for real in ("k8s/overlays/prod/secrets.env", "k8s/overlays/prod/keda-redis.env",
                 "k8s/overlays/prod/keda-rabbitmq.env", "k8s/overlays/prod-cluster/keda-redis-cluster.env"):
        assert (REPO / f"{real}.example").is_file(), f"{real}.example is missing"
        ignored = subprocess.run(["git", "check-ignore", "-q", real], cwd=REPO)
        assert ignored.returncode == 0, f"{real} is not git-ignored: real credentials could be committed"


# --- network policies --------------------------------------------------------------------------


def _ports_match(rule_ports, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        if "port" not in p:
            return True
        assert isinstance(p["port"], int), "use port numbers in NetworkPolicies (checked here)"
        if p["port"] <= port <= p.get("endPort", p["port"]):
            return True
    return False


def _peer_matches(peer: dict, policy_ns: str, target) -> bool:
    """`target` is (namespace, labels) of a pod, or an IP string outside the cluster."""
    if isinstance(target, str):
        block = peer.get("ipBlock")
        if not block:
            return False
        ip = ipaddress.ip_address(target)
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except") or []
        )
    ns, labels = target
    if "ipBlock" in peer:
        return False
    ns_selector = peer.get("namespaceSelector")
    if ns_selector is None:
        ns_ok = ns == policy_ns
    else:
        ns_ok = selector_matches(ns_selector, {"kubernetes.io/metadata.name": ns})
    return ns_ok and selector_matches(peer.get("podSelector") or {}, labels)


def _direction_allows(objects, kind: str, pod, peer, port: int, protocol: str) -> bool:
    """Whether the policies isolating `pod` ((namespace, labels)) in direction `kind` admit
    `peer` on port/protocol. A pod no policy selects for that direction is not isolated."""
    ns, labels = pod
    selecting = [
        p for p in by_kind(objects, "NetworkPolicy")
        if p["metadata"].get("namespace") == ns
        and kind in p["spec"].get("policyTypes", ["Ingress"])
        and selector_matches(p["spec"]["podSelector"], labels)
    ]
    if not selecting:
        return True
    rules_key, peers_key = ("egress", "to") if kind == "Egress" else ("ingress", "from")
    for p in selecting:
        for rule in p["spec"].get(rules_key) or []:
            peers = rule.get(peers_key)
            if _ports_match(rule.get("ports"), port, protocol) and (
                not peers or any(_peer_matches(x, ns, peer) for x in peers)
            ):
                return True
    return False


def allowed(objects, src, dst, port: int, protocol: str = "TCP") -> bool:
    """Whether the rendered NetworkPolicies let pod `src` ((namespace, labels)) open
    port/protocol on `dst`: (namespace, labels) of a pod, or an IP outside the cluster."""
    if not _direction_allows(objects, "Egress", src, dst, port, protocol):
        return False
    return isinstance(dst, str) or _direction_allows(objects, "Ingress", dst, src, port, protocol)


def pod_labels(objects, name: str) -> dict:
    for w in workloads(objects):
        if w["metadata"]["name"] == name:
            return w["spec"]["template"]["metadata"]["labels"]
    raise AssertionError(f"no workload {name}")


def test_network_policies_default_deny(overlay):
    objects = rendered(overlay)
    denies = [
        p for p in by_kind(objects, "NetworkPolicy")
        if p["spec"]["podSelector"] == {}
        and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress") and not p["spec"].get("egress")
    ]
    assert denies, "no default-deny NetworkPolicy for ingress and egress"
    dns = {"namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}}
    namespace = by_kind(objects, "Namespace")[0]["metadata"]["name"]
    for w in workloads(objects):
        labels = w["spec"]["template"]["metadata"]["labels"]
        for proto in ("UDP", "TCP"):
            assert allowed(objects, (namespace, labels), (dns["namespace"], dns["labels"]), 53, proto), (
                f"{w['metadata']['name']} cannot reach DNS over {proto}"
            )
        # Nothing may leave to an arbitrary address on the internet.
        assert not allowed(objects, (namespace, labels), "198.51.100.7", 443), f"{w['metadata']['name']} reaches the internet"


def _datastores(overlay, objects):
    """Where Redis and RabbitMQ are, as `allowed` destinations."""
    namespace = by_kind(objects, "Namespace")[0]["metadata"]["name"]
    if overlay == "dev":
        return (namespace, pod_labels(objects, "redis")), (namespace, pod_labels(objects, "rabbitmq"))
    cidrs = {}
    for p in by_kind(objects, "NetworkPolicy"):
        for rule in p["spec"].get("egress") or []:
            for peer in rule.get("to") or []:
                if "ipBlock" in peer:
                    cidrs[p["metadata"]["name"]] = str(next(ipaddress.ip_network(peer["ipBlock"]["cidr"]).hosts()))
    return cidrs["egress-redis"], cidrs["egress-rabbitmq"]


def test_network_policies_allow_what_each_service_needs(overlay):
    objects = rendered(overlay)
    namespace = by_kind(objects, "Namespace")[0]["metadata"]["name"]
    deployments = cairn_deployments(objects)
    labels = {b: d["spec"]["template"]["metadata"]["labels"] for b, d in deployments.items()}
    redis, rabbitmq = _datastores(overlay, objects)
    redis_port = 6379
    amqp_port = 5672

    def can(src, dst, port):
        src = (namespace, labels[src]) if isinstance(src, str) else src
        return allowed(objects, src, dst, port)

    monitoring = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
    stray = (namespace, {"app": "stray"})
    client = ("somewhere-else", {"app": "client"})

    need = {
        "ingress -> aggregator gRPC": can("ingress", (namespace, labels["progress-aggregator"]), AGGREGATOR_GRPC_PORT),
        "processor -> ingress (handlers' progress URL)": can("request-processor", (namespace, labels["ingress"]), 8080),
        "any client -> ingress API": can(client, (namespace, labels["ingress"]), 8080),
    }
    for service in SERVICES:
        need[f"{service} -> redis"] = can(service, redis, redis_port)
    for service in ("progress-aggregator", "request-processor"):
        need[f"{service} -> rabbitmq"] = can(service, rabbitmq, amqp_port)
    for service in SERVICES:
        need[f"monitoring -> {service} metrics"] = can(monitoring, (namespace, labels[service]), SERVICES[service][1])
    missing = [k for k, ok in need.items() if not ok]
    assert not missing, f"blocked by the NetworkPolicies: {missing}"

    must_not = {
        "ingress -> rabbitmq": can("ingress", rabbitmq, amqp_port),
        "stream-trimmer -> rabbitmq": can("stream-trimmer", rabbitmq, amqp_port),
        "stream-trimmer -> aggregator gRPC": can("stream-trimmer", (namespace, labels["progress-aggregator"]), AGGREGATOR_GRPC_PORT),
        "processor -> aggregator gRPC": can("request-processor", (namespace, labels["progress-aggregator"]), AGGREGATOR_GRPC_PORT),
        "stray pod -> aggregator gRPC": can(stray, (namespace, labels["progress-aggregator"]), AGGREGATOR_GRPC_PORT),
        "outside client -> aggregator gRPC": can(client, (namespace, labels["progress-aggregator"]), AGGREGATOR_GRPC_PORT),
        "outside client -> processor admin": can(client, (namespace, labels["request-processor"]), 9092),
    }
    if overlay == "dev":
        must_not["stray pod -> redis"] = can(stray, redis, redis_port)
        must_not["stray pod -> rabbitmq"] = can(stray, rabbitmq, amqp_port)
    opened = [k for k, ok in must_not.items() if ok]
    assert not opened, f"allowed but not needed: {opened}"


@pytest.mark.parametrize("name", OVERLAYS)
def test_namespace_is_set_on_everything(name):
    objects = rendered(name)
    (ns,) = by_kind(objects, "Namespace")
    for o in objects:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == ns["metadata"]["name"], f"{o['kind']}/{o['metadata']['name']}"
