"""What `riverbed serve` checks before it deploys: the app's CPUs, counted over every deployment."""

from __future__ import annotations

from cluster.serving import app_cpus, app_deployments
from schemas.settings import DeploymentConfig, ServeConfig


def test_every_deployment_of_the_app_is_counted_including_the_bulk_and_image_embedders() -> None:
    assert set(app_deployments(ServeConfig())) == {
        "ingress",
        "bulk_embedder",
        "retriever",
        "generator",
        "image_embedder",
    }


def test_the_app_holds_each_deployments_cpus_times_its_replicas_or_min_replicas() -> None:
    serve = ServeConfig(
        ingress=DeploymentConfig(num_cpus=0.5, num_replicas=2),
        bulk_embedder=DeploymentConfig(num_cpus=0.25, num_replicas="auto", min_replicas=3),
        retriever=DeploymentConfig(num_cpus=1.0),
        generator=DeploymentConfig(num_cpus=2.0, num_replicas="auto", min_replicas=0),
        image_embedder=DeploymentConfig(num_cpus=0.125, num_replicas=2),
    )
    assert app_cpus(serve) == 0.5 * 2 + 1.0 + 0.25 * 3 + 0.125 * 2
