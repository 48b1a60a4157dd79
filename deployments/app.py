"""The Serve application: ingress → retriever (embeds queries, searches; inside each ingress
replica with ``serve.search_in_ingress``, else a deployment of its own), bulk embedder, image
embedder, generator.

Replicas, autoscaling, ``max_ongoing_requests`` and resources of each deployment come from
``serve.<deployment>`` in the settings (:class:`schemas.settings.DeploymentConfig`).
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.bulk_embedder import BulkEmbedder
from deployments.generator import Generator
from deployments.image_embedder import ImageEmbedder
from deployments.in_process import InIngressRetriever
from deployments.ingress import Ingress
from deployments.retriever import Retriever
from schemas.errors import ConfigError
from schemas.settings import DeploymentConfig, Settings, serve_config_settings

APP_NAME = "riverbed"


def deployment_options(config: DeploymentConfig) -> dict[str, Any]:
    options: dict[str, Any] = {
        "max_ongoing_requests": config.max_ongoing_requests,
        "max_queued_requests": config.max_queued_requests,
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
    }
    if config.num_replicas == "auto":
        options["autoscaling_config"] = {
            "min_replicas": config.min_replicas,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
            "upscale_delay_s": config.upscale_delay_s,
            "downscale_delay_s": config.downscale_delay_s,
        }
    else:
        options["num_replicas"] = config.num_replicas
    return options


def build_app(settings: Settings, servers: str) -> Application:
    """The application for ``settings.index`` (``servers``: the Kafka bootstrap servers)."""
    serve_config = settings.serve
    # Torch threads (the Embedder reads them from num_cpus): serve.embedder_threads for bulk
    # requests, serve.query_threads for queries.
    embed_config = settings.embed.model_copy(update={"num_cpus": float(serve_config.embedder_threads)})
    # /v1/embeddings: its own replicas and queue, so bulk requests never wait in the queries' batches.
    bulk_embedder = (
        _serve(BulkEmbedder)
        .options(**deployment_options(serve_config.bulk_embedder))
        .bind(embed_config, serve_config.embeddings)
    )
    # Queries embed in the retriever (a text search is one call from the ingress, its embedding
    # and search batched there), on a GPU only where serve.retriever asks for one.
    query_embed = settings.embed.model_copy(update={"num_cpus": float(serve_config.query_threads)})
    if settings.embed.device == "cuda" and not serve_config.retriever.num_gpus:
        query_embed = query_embed.model_copy(update={"device": "cpu"})
    ingress_options = deployment_options(serve_config.ingress)
    if settings.index.alias is not None and not serve_config.search_in_ingress:
        raise ConfigError(
            "index.alias is followed by the ingress's own retriever: it needs serve.search_in_ingress true"
        )
    retriever: Any
    if serve_config.search_in_ingress:  # each ingress replica embeds and searches itself
        retriever = InIngressRetriever(settings, query_embed)
        actor = ingress_options["ray_actor_options"]
        actor["num_cpus"] += serve_config.retriever.num_cpus
        actor["num_gpus"] += serve_config.retriever.num_gpus
    else:
        retriever = (
            _serve(Retriever)
            .options(**deployment_options(serve_config.retriever))
            .bind(settings, query_embed)
        )
    generator = _serve(Generator).options(**deployment_options(serve_config.generator)).bind(settings)
    # Image queries: the image model loads on the first one, so a model not trained yet costs the
    # app nothing but 503s on the image routes.
    image_embedder = (
        _serve(ImageEmbedder).options(**deployment_options(serve_config.image_embedder)).bind(settings)
    )
    return (
        _serve(Ingress)
        .options(**ingress_options)
        .bind(settings, servers, bulk_embedder, retriever, generator, image_embedder)
    )


def app_builder(args: dict[str, Any] | None = None) -> Application:
    """Serve's application builder, for a Serve config that names
    ``import_path: deployments.app:app_builder`` (a KubeRay RayService's ``serveConfigV2``, or
    ``serve run``): ``args`` are Riverbed's settings (:func:`~schemas.settings.serve_config_settings`:
    a :class:`~schemas.errors.ConfigError` names each bad field, or the missing broker)."""
    settings = serve_config_settings(args)
    assert settings.kafka.bootstrap_servers is not None  # serve_config_settings refuses None
    return build_app(settings, settings.kafka.bootstrap_servers)


def _serve(deployment: object) -> Any:
    """``@serve.deployment`` turns a class into a ``Deployment``; mypy still sees the class."""
    return deployment
