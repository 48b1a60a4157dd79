"""`riverbed bench edge`: what one request costs at Serve's edge, HTTP next to gRPC, with no work.

# APP: a probe deployment that does nothing but echo: ``POST /ping`` (JSON) and the gRPC method
#   ``riverbed.bench.Edge/Ping`` (protobuf), one replica, so that each figure is the edge and the
#   replica's request handling alone (the search itself is `riverbed bench query`'s)
# EDGE: the running head's data plane (``serve.edge``: Serve's Python proxy, or HAProxy straight to
#   the replica's own HTTP and gRPC ports); Serve is started here with a gRPC port, so it must hold
#   no application (the head of a home that serves nothing; ``riverbed down`` first otherwise), and
#   is shut down afterwards (the next ``riverbed serve`` starts it again, without gRPC)
# LOAD: 1 and 16 closed-loop clients per protocol for ``--seconds`` each, from this process: aiohttp
#   for HTTP, grpc.aio for gRPC; this process's CPU a request is reported (every thread's, Ray's
#   driver threads included: an upper bound of the client's)
# PAYLOAD: 1 KB each way, about a search request and a short answer
"""

# No ``from __future__ import annotations``: FastAPI reads the route's annotations at run time.

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request  # module level: FastAPI resolves the route's annotations here
from fastapi.responses import Response
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from ray import serve

from cluster.bench.query import level_summary
from cluster.bench.report import machine, write_bars, write_report
from schemas.errors import ConfigError
from schemas.settings import Settings

APP = "edge-bench"
SERVICE = "riverbed.bench.Edge"
PAYLOAD = b"x" * 1024
CLIENTS = (1, 16)


def _echo_class() -> Any:
    """``riverbed.bench.Echo {bytes payload = 1;}``, built from its descriptor (no generated
    module: the proxy and the replica import this one)."""
    proto = descriptor_pb2.FileDescriptorProto(name="riverbed_bench_edge.proto", package="riverbed.bench")
    proto.syntax = "proto3"
    message = proto.message_type.add(name="Echo")
    message.field.add(
        name="payload",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    service = proto.service.add(name="Edge")
    service.method.add(name="Ping", input_type=".riverbed.bench.Echo", output_type=".riverbed.bench.Echo")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("riverbed.bench.Echo"))


Echo = _echo_class()


def add_EdgeServicer_to_server(servicer: Any, server: Any) -> None:  # gRPC servicer functions are named so
    """The servicer function Serve's gRPC options name (``grpc_servicer_functions``). Requests
    reach the method as bytes (no deserializer: a message class built at run time does not pickle
    from the proxy to the replica), and the method parses them."""
    import grpc

    handler = grpc.unary_unary_rpc_method_handler(
        servicer.Ping, request_deserializer=None, response_serializer=Echo.SerializeToString
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Ping": handler}),))


_api = FastAPI()


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
@serve.ingress(_api)
class EdgeProbe:
    """The probe replica: echoes ``POST /ping``'s body and ``Ping``'s payload, nothing else.
    Decorated here, at module level, so that every process that imports it (the replica) builds the
    same class-based routes."""

    @_api.post("/ping")
    async def http_ping(self, request: Request) -> Response:
        return Response(await request.body(), media_type="application/json")

    async def Ping(self, request: bytes) -> Any:  # the gRPC method's name
        return Echo(payload=Echo.FromString(request).payload)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


_failures: list[str] = []


def _first_failure(why: str) -> None:
    """Says why a request failed, the first time it does so (each level)."""
    if not _failures:
        _failures.append(why)
        _say(f"  a request failed: {why}")


async def _level(call: Any, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` closed-loop callers of ``call`` (an async function returning whether the answer
    was right) for ``seconds``; a failed or wrong answer is an error."""
    latencies: list[float] = []
    errors = 0
    for _ in range(8):  # warm the connections and the replica
        await call()
    stop_at = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            ok = await call()
            latencies.append(time.perf_counter() - t0)
            errors += not ok

    _failures.clear()
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return level_summary(clients, latencies, errors, elapsed, cpu)


async def _http(url: str, clients: int, seconds: float) -> dict[str, Any]:
    import aiohttp

    body = b'{"payload": "' + PAYLOAD + b'"}'
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=30)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout, headers=headers) as session:

        async def call() -> bool:
            try:
                async with session.post("/ping", data=body) as r:
                    answer = await r.read()
                    if r.status == 200 and answer == body:
                        return True
                    _first_failure(f"HTTP {r.status}: {answer[:200]!r}")
                    return False
            except (TimeoutError, aiohttp.ClientError) as exc:
                _first_failure(f"{type(exc).__name__}: {exc}")
                return False

        return await _level(call, clients, seconds)


async def _grpc(target: str, clients: int, seconds: float) -> dict[str, Any]:
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        ping = channel.unary_unary(
            f"/{SERVICE}/Ping",
            request_serializer=Echo.SerializeToString,
            response_deserializer=Echo.FromString,
        )
        request, metadata = Echo(payload=PAYLOAD), (("application", APP),)

        async def call() -> bool:
            try:
                answer = await ping(request, metadata=metadata, timeout=30)
                if answer.payload == PAYLOAD:
                    return True
                _first_failure(f"gRPC: another payload ({len(answer.payload)} bytes)")
                return False
            except grpc.aio.AioRpcError as exc:
                _first_failure(f"gRPC {exc.code().name}: {exc.details()}")
                return False

        return await _level(call, clients, seconds)


def bench_edge(settings: Settings, seconds: float, grpc_port: int, out_dir: Path) -> dict[str, Any]:
    """Each protocol at each of :data:`CLIENTS` for ``seconds`` through the head's edge
    (``serve.edge``), gRPC on ``grpc_port``. Refuses a Serve that holds an application (its gRPC
    port cannot be added); Serve is shut down afterwards, also when a step fails."""
    if seconds <= 0:
        raise ConfigError(f"bench edge: --seconds must be positive, not {seconds:g}")
    if grpc_port == settings.serve.port:
        raise ConfigError(f"bench edge: --grpc-port {grpc_port} is serve.port, which HTTP takes")

    from cluster.ray_runtime import connect

    connect(settings)
    if _serve_running():
        apps = sorted(serve.status().applications)
        if apps:
            raise ConfigError(
                f"bench edge starts Serve with a gRPC port, which a running Serve cannot take: it serves "
                f"{', '.join(apps)}; stop it first (`riverbed down`, or another --home)"
            )
        serve.shutdown()
    host, port = settings.serve.host, settings.serve.port
    edge = settings.serve.data_plane()
    levels: dict[str, list[dict[str, Any]]] = {"http": [], "grpc": []}
    try:
        _start(host, port, grpc_port)
        probe: Any = EdgeProbe  # a Deployment (serve.deployment); mypy still sees the class
        serve.run(probe.bind(), name=APP, route_prefix="/")
        for protocol in ("http", "grpc"):
            for clients in CLIENTS:
                if protocol == "http":
                    level = asyncio.run(_http(f"http://{host}:{port}", clients, seconds))
                else:
                    level = asyncio.run(_grpc(f"{host}:{grpc_port}", clients, seconds))
                _say(
                    f"  {protocol:4s} {clients:2d} clients: p50 {level['p50_ms']:.2f} ms  p99 "
                    f"{level['p99_ms']:.2f} ms  {level['qps']:.0f} req/s  {level['errors']} errors  "
                    f"client {level['client_cpu_ms']:.2f} ms CPU a request"
                )
                levels[protocol].append(level)
    finally:
        serve.shutdown()
    result = {
        "edge": edge,
        "seconds": seconds,
        "payload_bytes": len(PAYLOAD),
        "levels": levels,
        "machine": machine(),
    }
    rows = [("edge (serve.edge)", edge), ("payload", f"{len(PAYLOAD)} bytes each way; a no-op replica")]
    for protocol, label in (("http", "HTTP (aiohttp)"), ("grpc", "gRPC (grpc.aio)")):
        for level in levels[protocol]:
            rows.append(
                (
                    f"{label}, {level['clients']} client{'' if level['clients'] == 1 else 's'}",
                    f"p50 {level['p50_ms']:.2f} / p99 {level['p99_ms']:.2f} ms, {level['qps']:.0f} req/s, "
                    f"{level['errors']} errors; client CPU {level['client_cpu_ms']:.2f} ms a request",
                )
            )
    write_report(out_dir, f"edge-{edge}", result, rows)
    write_bars(
        out_dir,
        f"edge-{edge}",
        f"a no-op request at the edge ({edge})",
        {
            "p50 ms, 1 client": {p: levels[p][0]["p50_ms"] for p in levels},
            "req/s, 16 clients": {p: levels[p][-1]["qps"] for p in levels},
        },
    )
    return result


def _start(host: str, port: int, grpc_port: int, attempts: int = 3) -> None:
    """``serve.start`` with the probe's gRPC servicer; again when its first proxy died starting
    (as :func:`cluster.serving.start_serve` does, for the same reason: a slow first proxy)."""
    from ray.exceptions import ActorDiedError

    for attempt in range(1, attempts + 1):
        try:
            serve.start(
                http_options={"host": host, "port": port},
                grpc_options={
                    "port": grpc_port,
                    "grpc_servicer_functions": [f"{__name__}.add_EdgeServicer_to_server"],
                },
            )
            return
        except (ActorDiedError, TimeoutError):
            if attempt == attempts:
                raise
            _say("Serve's proxy did not start; Serve starts another")


def _serve_running() -> bool:
    """Whether this cluster runs a Serve controller (looked up by name; nothing is started)."""
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False) is not None
