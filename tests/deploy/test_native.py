"""The native path, run for real: `scripts/native.sh start` from a clean state, every service's
/readyz, the health check commands the containers use, a request and a progress update
through curl, the metrics the dashboard reads, then `stop` (and Ctrl-C in the foreground mode)
leaving nothing running.

Uses the machine's Redis and RabbitMQ (scripts/deps.sh starts them where missing) on their
standard ports, but its own ports for the services, its own Redis key prefix and its own
RabbitMQ exchange and queue names, all removed afterwards, so it runs beside other tests and a
`cairn dev` on the default ports.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import ADMIN_ADDR_VAR, REPO, SERVICES, binary

NATIVE = REPO / "scripts" / "native.sh"
START_TIMEOUT = 1200  # the first start builds the release binaries
RABBITMQ_API = os.environ.get("CAIRN_TEST_RABBITMQ_API", "http://127.0.0.1:15672/api")
RABBITMQ_AUTH = (os.environ.get("CAIRN_TEST_RABBITMQ_USER", "guest"), os.environ.get("CAIRN_TEST_RABBITMQ_PASS", "guest"))


def free_ports(n: int) -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def curl(*args: str, timeout: float = 30) -> tuple[int, str]:
    """curl, as a user would: returns (HTTP status, body)."""
    result = subprocess.run(
        ["curl", "-sS", "--max-time", str(int(timeout)), "-o", "-", "-w", "\n%{http_code}", *args],
        capture_output=True, text=True, timeout=timeout + 5,
    )
    assert result.returncode == 0, f"curl {' '.join(args)} failed: {result.stderr}"
    body, _, status = result.stdout.rpartition("\n")
    return int(status), body


class Native:
    """One run of scripts/native.sh with its own ports, prefix and names."""

    def __init__(self, run_dir: Path):
        self.tag = uuid.uuid4().hex[:8]
        self.run_dir = run_dir
        ports = free_ports(6)
        self.ports = {
            "ingress": ports[0],
            "progress-aggregator": ports[1],
            "request-processor": ports[2],
            "stream-trimmer": ports[3],
            "grpc": ports[4],
            # the ingress's public port (its admin port, with /metrics, is "ingress")
            "api": ports[5],
        }
        self.prefix = f"cairn-native-{self.tag}"
        self.names = f"native-{self.tag}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
        for binary_name in SERVICES:
            env[ADMIN_ADDR_VAR[binary_name]] = f"127.0.0.1:{self.ports[binary_name]}"
        env.update(
            CAIRN_AGGREGATOR_GRPC_ADDR=f"127.0.0.1:{self.ports['grpc']}",
            CAIRN_INGRESS_ADDR=f"127.0.0.1:{self.ports['api']}",
            CAIRN_RUN_DIR=str(run_dir),
            CAIRN_KEY_PREFIX=self.prefix,
            CAIRN_PROGRESS_EXCHANGE=self.names,
            CAIRN_PROGRESS_QUEUE=self.names,
            CAIRN_HANDLERS_FILE=str(REPO / "deploy" / "handlers.toml"),
            CAIRN_TRIM_INTERVAL="1s",
        )
        if "CARGO_TARGET_DIR" in os.environ:
            env["CARGO_TARGET_DIR"] = os.environ["CARGO_TARGET_DIR"]
        self.env = env

    def url(self, service: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}{path}"

    def script(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(NATIVE), *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def pids(self) -> dict[str, int]:
        return {
            name: int((self.run_dir / f"{name}.pid").read_text())
            for name in SERVICES
            if (self.run_dir / f"{name}.pid").exists()
        }

    def all_ports(self) -> list[int]:
        return list(self.ports.values())

    def cleanup(self):
        """Stops whatever still runs (by pid, only ours) and removes our Redis keys and
        RabbitMQ exchanges/queues."""
        self.script("stop", timeout=120)
        keys = subprocess.run(
            ["redis-cli", "--scan", "--pattern", f"{self.prefix}:*"], capture_output=True, text=True
        ).stdout.split()
        for i in range(0, len(keys), 500):
            subprocess.run(["redis-cli", "DEL", *keys[i:i + 500]], capture_output=True)
        for kind in ("queues", "exchanges"):
            for name in self._rabbit_names(kind):
                self._rabbit("DELETE", f"/{kind}/%2f/{urllib.parse.quote(name, safe='')}")

    def _rabbit_names(self, kind: str) -> list[str]:
        body = self._rabbit("GET", f"/{kind}/%2f")
        return [o["name"] for o in json.loads(body or "[]") if o["name"].startswith(self.names)]

    def _rabbit(self, method: str, path: str) -> str:
        request = urllib.request.Request(RABBITMQ_API + path, method=method)
        token = f"{RABBITMQ_AUTH[0]}:{RABBITMQ_AUTH[1]}".encode()
        import base64

        request.add_header("Authorization", "Basic " + base64.b64encode(token).decode())
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.read().decode()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return ""
            raise


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    run = Native(tmp_path_factory.mktemp("native-run"))
    # A clean state: nothing of ours runs, nothing listens on our ports, no keys with our prefix.
    assert not any(port_open(p) for p in run.all_ports())
    assert not run.pids()
    run.started = run.script("start", timeout=START_TIMEOUT)
    try:
        yield run
    finally:
        run.cleanup()


def test_start_brings_every_service_up(native):
    assert native.started.returncode == 0, native.started.stderr[-4000:]
    for binary_name in SERVICES:
        assert f"{binary_name} ready" in native.started.stderr
    assert f"http://127.0.0.1:{native.ports['api']}" in native.started.stderr, "start does not say where ingress is"
    assert set(native.pids()) == set(SERVICES)
    for name, pid in native.pids().items():
        assert process_alive(pid), f"{name} (pid {pid}) is not running"
        assert (native.run_dir / "logs" / f"{name}.log").exists()


def test_every_service_answers_readyz_healthz_and_metrics(native):
    for binary_name in SERVICES:
        for path in ("/readyz", "/healthz", "/metrics"):
            status, body = curl(native.url(binary_name, path))
            assert status == 200, f"{binary_name} {path}: {status} {body}"


def test_healthcheck_subcommand_passes_against_live_services(native):
    """The exact command the compose healthchecks run (`<binary> healthcheck`), against the
    running services."""
    for binary_name in SERVICES:
        result = subprocess.run(
            [binary(binary_name), "healthcheck"], env=native.env, capture_output=True, text=True, timeout=15
        )
        assert result.returncode == 0, f"{binary_name} healthcheck: {result.stdout}{result.stderr}"


def test_a_request_runs_to_completion(native):
    payload = {"native": native.tag, "n": 1}
    status, body = curl(
        "-X", "POST", native.url("api", "/v1/requests"),
        "-H", "Content-Type: application/json", "-H", "Prefer: wait=10",
        "-d", json.dumps({"handler": "echo", "payload": payload}),
        timeout=20,
    )
    assert status == 200, f"POST /v1/requests answered {status}: {body}"
    answer = json.loads(body)
    assert answer["state"] == "succeeded", answer
    assert answer["result"] == payload, answer


def test_progress_posted_with_curl_is_readable(native):
    status, body = curl("-d", json.dumps({"progress": 0.5, "status": "running", "msg": "native"}),
                        native.url("api", "/status/_native.test"))
    assert status == 200, body
    assert json.loads(body)["status"] == "published"
    status, body = curl(native.url("api", "/status/_native.test"))
    assert status == 200, body
    node = json.loads(body)
    assert node["progress"] == 0.5 and node["status"] == "running", node


def test_metrics_the_dashboard_reads_are_exported(native):
    expected = {
        "ingress": ["http_server_requests_total", "http_server_request_duration_seconds_bucket"],
        "progress-aggregator": ["cairn_progress_updates_applied_total"],
        "request-processor": ["cairn_requests_finished_total"],
        # The trimmer reports after its first pass (CAIRN_TRIM_INTERVAL=1s here).
        "stream-trimmer": ["cairn_stream_group_lag", "cairn_stream_group_pending", "cairn_trimmer_trimmed_total"],
    }
    deadline = time.monotonic() + 20
    missing = {}
    while time.monotonic() < deadline:
        missing = {}
        for service, names in expected.items():
            _, text = curl(native.url(service, "/metrics"))
            if absent := [n for n in names if f"\n{n}" not in "\n" + text]:
                missing[service] = absent
        if not missing:
            return
        time.sleep(1)
    pytest.fail(f"metrics not exported: {missing}")


def test_stop_leaves_nothing_running(native):
    pids = native.pids()
    assert len(pids) == len(SERVICES)
    result = native.script("stop")
    assert result.returncode == 0, result.stderr
    for name, pid in pids.items():
        assert not process_alive(pid), f"{name} (pid {pid}) still runs after stop"
    for port in native.all_ports():
        assert not port_open(port), f"port {port} still listens after stop"
    assert not native.pids(), "stop left pid files"
    status = native.script("status")
    assert status.stdout.count("stopped") == len(SERVICES), status.stdout


def test_foreground_mode_stops_everything_on_ctrl_c(tmp_path):
    run = Native(tmp_path)
    script = subprocess.Popen(
        [str(NATIVE)], env=run.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while len(run.pids()) < len(SERVICES) or not _ready(run):
            assert script.poll() is None, f"native.sh exited early: {script.stderr.read()[-4000:]}"
            assert time.monotonic() < deadline, "services did not become ready"
            time.sleep(0.5)
        pids = run.pids()
        script.send_signal(signal.SIGINT)
        _, stderr = script.communicate(timeout=60)
        assert script.returncode != 0 or "stopping" in stderr
        for name, pid in pids.items():
            assert not process_alive(pid), f"{name} (pid {pid}) survived Ctrl-C"
        for port in run.all_ports():
            assert not port_open(port), f"port {port} still listens after Ctrl-C"
    finally:
        if script.poll() is None:
            script.kill()
            script.wait()
        run.cleanup()


def _ready(run: Native) -> bool:
    for binary_name in SERVICES:
        try:
            with urllib.request.urlopen(run.url(binary_name, "/readyz"), timeout=2) as r:
                if r.status != 200:
                    return False
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
    return True
