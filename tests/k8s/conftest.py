"""k8s tier: the manifests against a real kube-apiserver (and etcd), and the RayService against
the real KubeRay operator, all on 127.0.0.1. The binaries are built from the Go module proxy and
Debian and cached outside the clone (``make k8s-tools``, about 10 minutes once); without them, or
without kubectl, the tier skips and says which is missing. One control plane per session (ready
in about 3 s, the CRDs Established in about 9 s); each test works in its own namespace."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.k8s.control_plane import REPO, ControlPlane, missing


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/k8s" in str(item.fspath):
            item.add_marker(pytest.mark.k8s)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """The API server with the vendored CRDs installed."""
    reason = missing("KUBE_APISERVER", "ETCD")
    if reason is not None:
        pytest.skip(f"k8s tier: {reason}")
    plane = ControlPlane(tmp_path_factory.mktemp("k8s"))
    try:
        plane.install_crds(REPO / "k8s" / "crds")
        yield plane
    finally:
        plane.close()


@pytest.fixture
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    control_plane.kubectl("create", "namespace", name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture(scope="session")
def operator_log(control_plane: ControlPlane) -> Path:
    """The KubeRay operator, started once, reconciling every namespace; its log."""
    reason = missing("KUBERAY_OPERATOR")
    if reason is not None:
        pytest.skip(f"k8s tier (operator): {reason}")
    from tests.k8s.control_plane import tool_paths

    return control_plane.start_operator(tool_paths()["KUBERAY_OPERATOR"])
