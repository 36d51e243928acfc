"""The commands that container health checks run exist in the built binaries and fail when the
service is down (test_native.py runs them against live services). Also checks that the
scripts only set variables the services read."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time

from conftest import ADMIN_ADDR_VAR, REPO, SERVICES, binary, binary_help, source_env_names


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_service_binary_has_a_healthcheck_subcommand():
    for binary_name in SERVICES:
        assert "healthcheck" in binary_help(binary_name).subcommands, f"{binary_name} --help lists no healthcheck"


def test_healthcheck_fails_fast_against_a_closed_port():
    for binary_name in SERVICES:
        port = closed_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
        env[ADMIN_ADDR_VAR[binary_name]] = f"127.0.0.1:{port}"
        started = time.monotonic()
        result = subprocess.run([binary(binary_name), "healthcheck"], env=env, capture_output=True, text=True, timeout=15)
        assert result.returncode != 0, f"{binary_name} healthcheck passed with nothing listening"
        assert time.monotonic() - started < 10, f"{binary_name} healthcheck took too long to fail"
        # The error names where it looked, so a failing container health check is explained.
        assert str(port) in result.stdout + result.stderr, result.stdout + result.stderr


def test_help_lists_only_declared_variables():
    """`--help` and the source scan agree, so both views of 'what a service reads' hold."""
    for binary_name in SERVICES:
        assert binary_help(binary_name).env <= source_env_names(), binary_name
        assert binary_help(binary_name).env, f"{binary_name} --help shows no CAIRN_* variables"


def test_scripts_set_only_variables_the_services_read():
    own = {"CAIRN_RUN_DIR", "CAIRN_NATIVE_READY_TIMEOUT", "CAIRN_STARTED_FILE"}
    text = (REPO / "scripts" / "native.sh").read_text()
    used = set(re.findall(r"\b(CAIRN_[A-Z0-9_]+)", text)) - own
    # CAIRN_*_ADDR / URL patterns in comments ("CAIRN_*") are not names.
    assert used <= source_env_names(), f"native.sh uses {sorted(used - source_env_names())}, which no service reads"
