"""`riverbed bench edge`'s pieces without Serve: the probe's protobuf and servicer function over a
real gRPC server, and the closed-loop counting."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from cluster.bench.edge import (
    PAYLOAD,
    SERVICE,
    Echo,
    EdgeProbe,
    _level,
    add_EdgeServicer_to_server,
    bench_edge,
)
from schemas.errors import ConfigError
from schemas.settings import Settings


def test_the_servicer_function_serves_ping_with_the_request_as_bytes():
    seen: list[object] = []

    class Servicer:
        def Ping(self, request, context):  # the gRPC method's name
            seen.append(request)
            return Echo(payload=Echo.FromString(request).payload[::-1])

    server = grpc.server(ThreadPoolExecutor(2))
    add_EdgeServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            ping = channel.unary_unary(
                f"/{SERVICE}/Ping",
                request_serializer=Echo.SerializeToString,
                response_deserializer=Echo.FromString,
            )
            assert ping(Echo(payload=b"abc"), timeout=10).payload == b"cba"
    finally:
        server.stop(None)
    assert seen == [Echo(payload=b"abc").SerializeToString()], "the method parses the bytes itself"


def test_the_probe_replica_s_grpc_method_parses_the_bytes_and_echoes_them():
    ping = EdgeProbe.func_or_class.Ping  # the method as Serve's replica calls it, unbound
    answer = asyncio.run(ping(None, Echo(payload=PAYLOAD).SerializeToString()))
    assert answer.payload == PAYLOAD


def test_a_level_counts_every_answer_and_every_wrong_one():
    calls = 0

    async def call() -> bool:
        nonlocal calls
        calls += 1
        n = calls
        await asyncio.sleep(0)  # the other clients call meanwhile
        return n % 3 != 0  # every third call's answer is wrong

    level = asyncio.run(_level(call, clients=4, seconds=0.05))
    timed = calls - 8  # the warm-up's calls are not counted
    assert level["requests"] == timed > 0
    assert level["errors"] == sum(1 for n in range(9, calls + 1) if n % 3 == 0)
    assert level["clients"] == 4 and level["qps"] > 0 and level["p99_ms"] >= level["p50_ms"]


def test_bad_arguments_are_refused_before_anything_starts(tmp_path):
    settings = Settings.model_validate({"serve": {"port": 8123}})
    with pytest.raises(ConfigError, match="--seconds must be positive, not 0"):
        bench_edge(settings, 0, 9000, tmp_path)
    with pytest.raises(ConfigError, match=r"--grpc-port 8123 is serve\.port"):
        bench_edge(settings, 1, 8123, tmp_path)
