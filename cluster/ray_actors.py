"""Which actors hold a Ray cluster's resources, grouped by the index they serve.

A long-lived riverbed actor is named ``<index>/<role>/<i>`` in the settings' Ray namespace, so the
index and role of every actor can be read from its name. Ray Serve's own actors (namespace
``serve``) are grouped as ``serve``; anything else by its namespace.

The actor table is read from the GCS (what the dashboard's state API serves too): riverbed's local
head runs without the dashboard's HTTP server, so ``ray.util.state.list_actors`` cannot answer
there, and its default address (port 8265) may belong to another Ray on the same machine.

Only ``ALIVE`` actors hold their resources; ``PENDING_CREATION``, ``RESTARTING`` and
``DEPENDENCIES_UNREADY`` ones are waiting for them (listed, so an actor that cannot be scheduled
shows up), and ``DEAD`` ones are left out.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

HOLDS = "ALIVE"
SERVE_NAMESPACE = "serve"


@dataclass(frozen=True)
class ActorRow:
    """One actor as `riverbed ps` shows it. ``cpus``/``gpus`` are Ray's logical units it requires
    (held while ``state`` is ALIVE); ``group`` is the index for riverbed actors, ``serve`` for Ray
    Serve's, else ``(<namespace>)``."""

    name: str
    namespace: str
    group: str
    role: str
    state: str
    node: str
    cpus: float
    gpus: float
    pid: int
    detached: bool
    class_name: str

    @property
    def holds(self) -> bool:
        return self.state == HOLDS

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Holding:
    """What the ALIVE actors of one group hold: CPUs, GPUs, and actors per role."""

    group: str
    cpus: float = 0.0
    gpus: float = 0.0
    roles: Counter[str] = field(default_factory=Counter)
    role_cpus: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "cpus": round(self.cpus, 4),
            "gpus": round(self.gpus, 4),
            "actors": dict(self.roles),
            "cpus_by_role": {r: round(c, 4) for r, c in self.role_cpus.items()},
        }


def classify(name: str, namespace: str, class_name: str, riverbed_namespace: str) -> tuple[str, str]:
    """``(group, role)`` of an actor. A riverbed actor (named ``<index>/<role>/<i>`` in
    ``riverbed_namespace``) → ``(index, role)``; a Ray Serve actor → ``("serve", what it is)``
    (the deployment name for a replica); anything else → ``("(<namespace>)", class name)``."""
    if namespace == riverbed_namespace:
        parts = name.rsplit("/", 2)
        if len(parts) == 3 and parts[0] and parts[1] and parts[2].isdigit():
            return parts[0], parts[1]
    if namespace == SERVE_NAMESPACE:
        # Replicas' class names are "ServeReplica:<app>:<deployment>"; the controller and proxies
        # are "ServeController" and "ProxyActor".
        return SERVE_NAMESPACE, class_name.rsplit(":", 1)[-1] or "serve"
    return f"({namespace or 'anonymous'})", class_name or "actor"


def _actor_table_data() -> Any:
    """Ray's GCS ``ActorTableData`` protobuf class (its stubs do not declare it)."""
    from ray.core.generated import gcs_pb2

    return gcs_pb2.ActorTableData  # type: ignore[attr-defined]


def row_from_gcs(data: Any, riverbed_namespace: str) -> ActorRow:
    """An :class:`ActorRow` from one GCS ``ActorTableData`` message."""
    resources = dict(data.required_resources)
    group, role = classify(data.name, data.ray_namespace, data.class_name, riverbed_namespace)
    return ActorRow(
        name=data.name or data.actor_id.hex()[:12],
        namespace=data.ray_namespace,
        group=group,
        role=role,
        state=_actor_table_data().ActorState.Name(data.state),
        node=data.address.ip_address or "-",
        cpus=float(resources.get("CPU", 0.0)),
        gpus=float(resources.get("GPU", 0.0)),
        pid=int(data.pid),
        detached=bool(data.is_detached),
        class_name=data.class_name,
    )


def actor_rows(riverbed_namespace: str) -> list[ActorRow]:
    """Every actor of the cluster this driver is connected to (``ray.init`` done), DEAD ones left
    out, sorted by group then name. Raises what Ray raises when the GCS cannot be read."""
    from ray._private.state import state as global_state

    accessor = global_state._connect_and_get_accessor()
    table_data = _actor_table_data()
    rows = [
        row_from_gcs(table_data.FromString(raw), riverbed_namespace)
        for raw in accessor.get_actor_table(None, None)
    ]
    return sorted((r for r in rows if r.state != "DEAD"), key=lambda r: (r.group, r.name))


def holdings(rows: Iterable[ActorRow]) -> list[Holding]:
    """What each group's ALIVE actors hold, the largest CPU holder first. Groups whose actors hold
    nothing (all waiting, or zero-resource actors) are listed with 0."""
    by_group: dict[str, Holding] = {}
    for row in rows:
        h = by_group.setdefault(row.group, Holding(row.group))
        h.roles[row.role] += 1
        if row.holds:
            h.cpus += row.cpus
            h.gpus += row.gpus
            h.role_cpus[row.role] = h.role_cpus.get(row.role, 0.0) + row.cpus
    return sorted(by_group.values(), key=lambda h: (-h.cpus, -h.gpus, h.group))


def _plural(role: str, n: int) -> str:
    return f"{n} {role}{'s' if n != 1 and not role.endswith('s') else ''}"


def describe_holding(h: Holding) -> str:
    """``index a: 2.1 CPUs (1 embedder 2, 2 shards 0.1)``; ``serve: ...`` for Ray Serve."""
    label = h.group if h.group.startswith("(") or h.group == SERVE_NAMESPACE else f"index {h.group}"
    parts = [f"{_plural(role, n)} {h.role_cpus.get(role, 0.0):g}" for role, n in sorted(h.roles.items())]
    gpus = f", {h.gpus:g} GPUs" if h.gpus else ""
    return f"{label}: {h.cpus:g} CPUs{gpus} ({', '.join(parts)})"


def describe_holders(rows: Sequence[ActorRow], limit: int = 6) -> str:
    """The groups holding CPUs or GPUs, largest first, at most ``limit`` (then "and N more"), or
    "no actor" when none holds any. For error messages."""
    held = [h for h in holdings(rows) if h.cpus > 0 or h.gpus > 0]
    if not held:
        return "no actor"
    text = "; ".join(describe_holding(h) for h in held[:limit])
    if len(held) > limit:
        text += f"; and {len(held) - limit} more"
    return text


def cpu_holders_now(riverbed_namespace: str) -> str | None:
    """:func:`describe_holders` for the connected cluster, or None when the actor table cannot be
    read (an error message must still be raised without it)."""
    try:
        return describe_holders(actor_rows(riverbed_namespace))
    except Exception as exc:  # only decorates another error: never replace it
        log.debug("could not list the actors holding the cluster's resources: %r", exc)
        return None


COLUMNS = ("NAME", "INDEX", "ROLE", "STATE", "NODE", "CPUS", "GPUS", "PID")


NAME_WIDTH = 48


def format_rows(rows: Sequence[ActorRow]) -> str:
    """A fixed-width table of ``rows`` (one line each, under a header); names longer than
    ``NAME_WIDTH`` (Serve's proxies carry a node id) are cut with "…"."""
    table = [COLUMNS] + [
        (_cut(r.name), r.group, r.role, r.state, r.node, f"{r.cpus:g}", f"{r.gpus:g}", str(r.pid or "-"))
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table
    )


def _cut(name: str) -> str:
    return name if len(name) <= NAME_WIDTH else name[: NAME_WIDTH - 1] + "…"
