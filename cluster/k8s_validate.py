"""Offline checks of Kubernetes manifests: custom resources against the vendored CRDs, built-in
kinds against Kubernetes' own schemas, names against the limits only the operators enforce, and a
RayService's Serve config against Ray Serve's own schema and Riverbed's settings.

# CRDS: each served version's ``openAPIV3Schema`` from ``k8s/crds/`` (see its README), keyed by
#   (apiVersion, kind)
# STRICT: the API server prunes fields a schema does not declare, so a misspelled field would pass
#   a plain jsonschema check and then vanish; :func:`strict_schema` refuses them instead, as
#   ``kubectl``'s strict field validation does. ``x-kubernetes-int-or-string`` becomes int|string,
#   ``nullable`` adds null, an embedded resource may carry apiVersion, kind and metadata, and
#   ``x-kubernetes-preserve-unknown-fields`` keeps what it says. CEL rules
#   (``x-kubernetes-validations``) are not checked here: only the API server runs them
# BUILT-IN: ConfigMap, PersistentVolumeClaim and the rest by kubernetes-validate's strict schemas
#   of ``KUBERNETES_VERSION`` (unknown fields refused)
# NAMES: DNS-1035 labels; RayService and RayJob names at most 47 characters, RayCluster 53 (the
#   KubeRay operator's limits: the API server accepts longer ones)
# SERVE: ``serveConfigV2`` is an opaque string to the CRD: parsed, checked with
#   ``ray.serve.schema.ServeDeploySchema``, and the ``args`` of an application built by
#   Riverbed's builders with :class:`schemas.settings.Settings` (Serve's schema takes any args)
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

CRD_DIR = Path(__file__).resolve().parents[1] / "k8s" / "crds"
NAME_LIMITS = {"RayService": 47, "RayJob": 47, "RayCluster": 53}
"""Longest names the KubeRay operator takes (it derives longer resource names from them)."""
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
APP_BUILDER = "deployments.app:app_builder"
"""The import path of Riverbed's query application builder (its args are Riverbed settings)."""
INGEST_BUILDER = "cluster.serve_app:ingest_builder"
"""The import path of Riverbed's ingest application builder (the same args)."""
BUILDERS = (APP_BUILDER, INGEST_BUILDER)
KUBERNETES_VERSION = "1.37"
"""The Kubernetes release whose schemas check the built-in kinds (the k8s tier's API server's)."""


def _loader() -> type[yaml.SafeLoader]:
    """libyaml's loader when PyYAML has it: the CRDs are megabytes (about 5x faster)."""
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_documents(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of one file, empty ones left out."""
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.load_all(f, Loader=_loader()) if doc]


@functools.cache
def crd_schemas(crd_dir: Path = CRD_DIR) -> dict[tuple[str, str], dict[str, Any]]:
    """(``group/version``, kind) → the strict schema of every served version of every CRD under
    ``crd_dir``."""
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(crd_dir.rglob("*.yaml")):
        for doc in load_documents(path):
            if doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                if version.get("served"):
                    api_version = f"{spec['group']}/{version['name']}"
                    schema = version["schema"]["openAPIV3Schema"]
                    schemas[(api_version, spec["names"]["kind"])] = strict_schema(schema, top=True)
    return schemas


def strict_schema(schema: Mapping[str, Any], *, top: bool = False) -> dict[str, Any]:
    """A structural schema as jsonschema should read it to judge what the API server keeps (see
    the module's STRICT)."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, Mapping):
            out[key] = strict_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [strict_schema(sub) for sub in value]
        elif key.startswith("x-kubernetes-") or key == "nullable":
            continue
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    properties = out.get("properties")
    if top or schema.get("x-kubernetes-embedded-resource"):
        properties = out.setdefault("properties", {})
        for name in ("apiVersion", "kind"):
            properties.setdefault(name, {"type": "string"})
        properties.setdefault("metadata", {"type": "object"})
    if (
        properties is not None
        and "additionalProperties" not in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _where(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path) or "(top)"


def custom_resource_problems(doc: Mapping[str, Any], crd_dir: Path = CRD_DIR) -> list[str]:
    """What is wrong with one custom resource: schema errors (each with its field path) and name
    problems. A kind no vendored CRD defines is itself a problem."""
    api_version, kind = str(doc.get("apiVersion")), str(doc.get("kind"))
    schema = crd_schemas(crd_dir).get((api_version, kind))
    if schema is None:
        return [f"{kind} {api_version}: no vendored CRD defines it (under {crd_dir})"]
    validator = Draft202012Validator(schema)
    problems = [
        f"{_where(error.absolute_path)}: {error.message}"
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]
    return problems + name_problems(doc)


def builtin_problems(doc: Mapping[str, Any]) -> list[str]:
    """What is wrong with a built-in kind (ConfigMap, PersistentVolumeClaim, ...) by Kubernetes' own
    schemas for ``KUBERNETES_VERSION``, strict (unknown fields refused): kubernetes-validate's
    first error, with its field path."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(dict(doc), KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{_where(exc.absolute_path)}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [str(exc.message)]
    return []


def manifest_problems(doc: Mapping[str, Any], crd_dir: Path = CRD_DIR) -> list[str]:
    """A custom resource's problems (:func:`custom_resource_problems`) when a vendored CRD defines
    its kind, else a built-in kind's (:func:`builtin_problems`)."""
    if (str(doc.get("apiVersion")), str(doc.get("kind"))) in crd_schemas(crd_dir):
        return custom_resource_problems(doc, crd_dir)
    return builtin_problems(doc)


def name_problems(doc: Mapping[str, Any]) -> list[str]:
    """DNS-1035 and the operator's length limits for the resource's name."""
    kind = str(doc.get("kind"))
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str):
        return ["metadata.name: missing"]
    problems = []
    if not DNS_1035.match(name):
        problems.append(f"metadata.name {name!r}: not a DNS-1035 label (lower case, digits, '-')")
    limit = NAME_LIMITS.get(kind)
    if limit is not None and len(name) > limit:
        problems.append(
            f"metadata.name {name!r}: {len(name)} characters; KubeRay takes at most {limit} for a {kind}"
        )
    return problems


def serve_config_problems(rayservice: Mapping[str, Any]) -> list[str]:
    """What is wrong with a RayService's ``serveConfigV2``: YAML, Serve's own schema, and the
    Riverbed settings of each application Riverbed's builder builds."""
    from pydantic import ValidationError

    text = (rayservice.get("spec") or {}).get("serveConfigV2")
    if not isinstance(text, str):
        return ["spec.serveConfigV2: missing (a YAML string)"]
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return [f"spec.serveConfigV2: not YAML: {exc}"]
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        return [f"spec.serveConfigV2: {_first_lines(exc)}"]
    problems = []
    for i, app in enumerate(config.get("applications", [])):
        if app.get("import_path") in BUILDERS:
            problems += [
                f"spec.serveConfigV2.applications[{i}].args: {p}" for p in settings_problems(app.get("args"))
            ]
    return problems


def settings_problems(args: Any) -> list[str]:
    """Riverbed's settings' errors for an app builder's ``args`` (empty: valid)."""
    from schemas.errors import ConfigError
    from schemas.settings import load_settings

    if args is not None and not isinstance(args, dict):
        return [f"must be a mapping of settings, got {type(args).__name__}"]
    try:
        load_settings(overrides=args or {})
    except ConfigError as exc:
        return [str(exc)]
    return []


def _first_lines(exc: Exception, n: int = 6) -> str:
    return " / ".join(str(exc).splitlines()[:n])
