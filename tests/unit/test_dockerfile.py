"""The Dockerfile (no container runtime runs here, so it is read, not built): what it installs is
the lock with its hashes, what it copies exists and is not ignored, every package is in it, it runs
as the pods' non-root user with the data home the manifests mount, and the versions it pins agree
with the manifests' (Ray, the image tag, the Python base)."""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from pathlib import Path

from cluster.k8s_render import DATA_DIR, RAY_VERSION, render
from schemas.settings import KubernetesConfig, Settings

REPO = Path(__file__).resolve().parents[2]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        pending = ""
    assert not pending, f"a continuation runs past the end: {pending!r}"
    return out


STEPS = instructions((REPO / "Dockerfile").read_text())


def args_of(name: str) -> list[str]:
    return [rest for word, rest in STEPS if word == name]


def test_the_base_is_python_3_11_pinned_to_a_patch_release():
    (default,) = [a.split("=", 1)[1] for a in args_of("ARG") if a.startswith("PYTHON_IMAGE=")]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", default), default
    assert args_of("FROM") == ["${PYTHON_IMAGE}"]


def test_the_lock_is_installed_with_its_hashes_and_riverbed_without_resolving_anything():
    runs = " && ".join(args_of("RUN"))
    assert 'pip install --require-hashes --no-deps -r "$LOCK"' in runs
    # lock.txt by default; the build argument takes the GPU lock (FAISS for CUDA 13), nothing else
    assert "LOCK=requirements/lock.txt" in args_of("ARG")
    assert (REPO / "requirements" / "lock-gpu.txt").is_file()
    assert "pip install --no-deps -r requirements/nodeps.txt" in runs
    assert "pip install --no-deps --no-build-isolation -e ." in runs


def test_every_copied_path_exists_is_not_ignored_and_every_package_is_copied():
    ignored = {
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }  # fmt: skip
    sources = [shlex.split(a)[0].rstrip("/") for a in args_of("COPY")]
    for source in sources:
        assert (REPO / source).exists(), source
        assert source.split("/")[0] not in ignored, f"{source} is in .dockerignore"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    assert set(packages) <= set(sources)


def test_it_runs_as_the_pods_user_with_the_data_home_they_mount(monkeypatch):
    for name in [n for n in os.environ if n.startswith("RIVERBED_")]:
        monkeypatch.delenv(name)
    assert args_of("USER")[-1] == "1000"
    pods = render(Settings())[-1]["spec"]["rayClusterConfig"]
    assert pods["headGroupSpec"]["template"]["spec"]["securityContext"]["runAsUser"] == 1000
    env = " ".join(args_of("ENV"))
    assert f"RIVERBED_HOME={DATA_DIR}" in env


def test_the_ray_it_installs_is_the_rayservices_and_the_tag_is_the_projects_version():
    lock = (REPO / "requirements" / "lock.txt").read_text()
    (ray,) = re.findall(r"^ray==([\w.]+)", lock, flags=re.M)
    assert ray == RAY_VERSION
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert KubernetesConfig().image == f"riverbed:{version}"
