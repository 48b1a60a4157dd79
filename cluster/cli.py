"""The `riverbed` command line.

Data goes to stdout (``--json`` for machines), logs and progress to stderr. Exit codes: 0 success,
1 failure, 2 bad usage (including an invalid configuration).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from schemas.errors import ConfigError, RiverbedError
from schemas.settings import Settings, load_settings
from schemas.topology import SEARCH_MODES

log = logging.getLogger("riverbed")

Command = Callable[[argparse.Namespace, Settings], int]


def emit(args: argparse.Namespace, data: Any, text: str | None = None) -> None:
    """Writes a command's result to stdout: JSON with --json, else ``text`` (or pretty JSON)."""
    if getattr(args, "json", False) or text is None:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``--set a.b=c`` flags -> nested overrides; values are YAML scalars (numbers, booleans...)."""
    import yaml

    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        node = overrides
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw else raw
        except yaml.YAMLError as exc:  # the value may be a secret: name the setting, never the value
            mark = getattr(exc, "problem_mark", None)
            where = f" at column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"--set {key.strip()}: the value is not a YAML scalar or list{where}") from None
    return overrides


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = _parse_set(args.set or [])
    if args.bootstrap_servers:
        overrides.setdefault("kafka", {})["bootstrap_servers"] = args.bootstrap_servers
    if args.index:
        overrides.setdefault("index", {})["name"] = args.index
    if args.home:
        overrides["home"] = args.home
    return overrides


# COMMANDS
def cmd_config_show(args: argparse.Namespace, settings: Settings) -> int:
    data = settings.model_dump(mode="json")
    if args.json:
        emit(args, data)
    else:
        import yaml

        print(yaml.safe_dump(data, sort_keys=False).rstrip())
    return 0


def cmd_kafka(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.kafka_admin import ensure_topics, local_kafka, topic_specs

    kafka = local_kafka(settings)
    if args.action == "start":
        if settings.kafka.bootstrap_servers:
            raise ConfigError(
                f"kafka.bootstrap_servers is set ({settings.kafka.bootstrap_servers}): riverbed uses that "
                "broker and does not run its own"
            )
        state = kafka.start()
        ensure_topics(
            state.bootstrap_servers,
            topic_specs(settings.kafka.topics),
            max_message_bytes=settings.kafka.max_record_bytes,
        )
        emit(
            args,
            kafka.status(),
            f"Kafka {settings.kafka.embedded.version} running on {state.bootstrap_servers}",
        )
    elif args.action == "stop":
        stopped = kafka.stop()
        emit(args, {"stopped": stopped}, "stopped" if stopped else "not running")
    else:
        status = kafka.status()
        text = (
            f"running on {status['bootstrap_servers']} (pid {status['pid']})"
            if status["running"]
            else "not running"
        )
        emit(args, status, text)
    return 0


def cmd_produce(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from cluster.kafka_admin import bootstrap_servers, ensure_topics, topic_specs
    from cluster.producer import EnvelopeProducer, read_records
    from schemas.errors import PoisonMessageError

    path = Path(args.path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory")
    servers = bootstrap_servers(settings)
    ensure_topics(
        servers,
        topic_specs(settings.kafka.topics),
        max_message_bytes=settings.kafka.max_record_bytes,
    )
    topics = settings.kafka.topics
    producer = EnvelopeProducer(servers, settings.kafka.max_record_bytes)
    sent: dict[str, int] = {}
    skipped = 0
    try:
        desc = f"produce → {args.topic or f'{topics.documents}, {topics.images}'}"
        with tqdm(desc=desc, unit="rec", file=sys.stderr, disable=args.quiet) as bar:
            for record in read_records(path):
                if record.envelope is None:
                    skipped += 1
                    log.warning("skipped %s: %s", record.location, record.error)
                else:
                    # each kind to its own topic, unless --topic names one for all
                    topic = args.topic or (
                        topics.images if record.envelope.kind == "image" else topics.documents
                    )
                    try:
                        producer.send(topic, record.envelope)
                        sent[topic] = sent.get(topic, 0) + 1
                    except PoisonMessageError as exc:
                        skipped += 1
                        log.warning("skipped %s: %s", record.location, exc)
                bar.update(1)
                if producer.pending >= 1000:
                    producer.flush()
            producer.flush()
    finally:
        producer.close()
    where = ", ".join(f"{n} → {t}" for t, n in sent.items()) or "nothing"
    emit(
        args,
        {"sent": sum(sent.values()), "topics": sent, "skipped": skipped},
        f"sent {where}; skipped {skipped}",
    )
    return 1 if (skipped and args.strict) else 0


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.kafka_admin import bootstrap_servers, ensure_topics, topic_specs
    from cluster.ray_runtime import connect

    servers = bootstrap_servers(settings)
    ensure_topics(
        servers,
        topic_specs(settings.kafka.topics),
        max_message_bytes=settings.kafka.max_record_bytes,
    )
    address = connect(settings)
    emit(args, {"kafka": servers, "ray": address}, f"Kafka: {servers}\nRay:   {address}")
    return 0


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.kafka_admin import local_kafka
    from cluster.ray_runtime import stop_local_head

    ray_stopped = stop_local_head(settings)
    kafka_stopped = local_kafka(settings).stop() if not settings.kafka.bootstrap_servers else False
    emit(
        args,
        {"ray_stopped": ray_stopped, "kafka_stopped": kafka_stopped},
        f"Ray head: {'stopped' if ray_stopped else 'not running'}; "
        f"Kafka: {'stopped' if kafka_stopped else 'not running'}",
    )
    return 0


def cmd_ps(args: argparse.Namespace, settings: Settings) -> int:
    """Lists the cluster's live actors (riverbed's grouped by index) and what each index holds.
    Never starts a head: with none running it says so and exits 0."""
    from cluster.ray_actors import actor_rows, describe_holding, format_rows, holdings
    from cluster.ray_runtime import connect, local_head_address

    loaded = sys.modules.get("ray")
    connected = loaded is not None and loaded.is_initialized()  # a driver that chose its cluster (tests)
    if not connected and not settings.ray.address and local_head_address(settings) is None:
        emit(args, {"ray": None, "actors": [], "holdings": []}, f"no local Ray head runs for {settings.home}")
        return 0
    address = connect(settings, start=False)
    import ray

    rows = actor_rows(settings.ray.namespace)
    held = holdings(rows)
    total, free = ray.cluster_resources(), ray.available_resources()
    data = {
        "ray": address,
        "cpus": total.get("CPU", 0.0),
        "free_cpus": free.get("CPU", 0.0),
        "gpus": total.get("GPU", 0.0),
        "free_gpus": free.get("GPU", 0.0),
        "actors": [r.as_dict() for r in rows],
        "holdings": [h.as_dict() for h in held],
    }
    lines = [format_rows(rows), ""] if rows else ["no live actors", ""]
    lines += [f"  {describe_holding(h)}" for h in held]
    gpus = f", {data['free_gpus']:g} of {data['gpus']:g} GPUs free" if data["gpus"] else ""
    lines.append(f"Ray {address}: {data['free_cpus']:g} of {data['cpus']:g} logical CPUs free{gpus}")
    emit(args, data, "\n".join(lines))
    return 0


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    import signal

    from cluster.pipeline import Pipeline, Progress

    if getattr(args, "alone", False):
        from cluster.kafka_admin import refuse_if_consumed

        refuse_if_consumed(settings)
    pipeline = Pipeline(settings)
    pipeline.start()
    last = {"t": 0.0, "docs": 0, "chunks": 0}

    def show(p: Progress) -> None:
        if args.quiet:
            return
        dt = max(p.elapsed_s - last["t"], 1e-6)
        docs, chunks = p.total("documents", "document"), p.total("chunks", "document")
        images = f"  images {p.total('images')}" if pipeline.images else ""
        graph = f"  graph mentions {p.total('mentions')}" if pipeline.graph_shards else ""
        print(
            f"\r[{p.elapsed_s:6.1f}s] docs {docs} ({(docs - last['docs']) / dt:.0f}/s)  chunks {chunks} "
            f"({(chunks - last['chunks']) / dt:.0f}/s)  unchanged {p.total('unchanged', 'document')}  "
            f"deletes {p.total('deletes', 'document')}{images}{graph}  lag {p.lag}  "
            f"dead letters {p.dead_letters()}   ",
            end="",
            file=sys.stderr,
            flush=True,
        )
        last.update(t=p.elapsed_s, docs=docs, chunks=chunks)

    stopping = {"flag": False}

    def on_signal(signum: int, frame: object) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if args.until_idle:
            pipeline.wait_idle(on_progress=show)
        else:
            while not stopping["flag"]:
                pipeline.check_alive()
                show(pipeline.progress())
                time.sleep(1.0)
    finally:
        results = pipeline.stop()
        if args.release:
            from cluster.pipeline import release_shards

            for side in (settings, settings.image_side(), settings.graph_side()):
                release_shards(side)
        if not args.quiet:
            print(file=sys.stderr)
    totals: dict[str, Any] = {}
    for r in results:
        for key, value in r.items():
            if isinstance(value, int):
                totals[key] = totals.get(key, 0) + value
    emit(args, totals, "ingested: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))
    return 0


def cmd_index_reindex(args: argparse.Namespace, settings: Settings) -> int:
    """Replays the documents topic into a new index embedded with ``--model`` (until it has caught
    up, or on with ``--follow``), while the served index goes on serving."""
    from cluster.index_admin import check_reindex_target
    from cluster.ray_runtime import connect

    connect(settings)
    target = check_reindex_target(settings, args.target, args.model)
    if not args.quiet:
        print(
            f"reindexing topic {settings.kafka.topics.documents} into {args.target} with {args.model}",
            file=sys.stderr,
        )
    ingest_args = argparse.Namespace(**{**vars(args), "until_idle": not args.follow, "release": False})
    return cmd_ingest(ingest_args, target)


def cmd_index_alias(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.index_admin import move_alias
    from cluster.ray_runtime import connect

    connect(settings)
    moved = move_alias(settings, args.alias, args.target)
    before = f" (was {moved['previous']})" if moved["previous"] else ""
    emit(args, moved, f"alias {moved['alias']} -> {moved['index']}{before}; model {moved['model']}")
    return 0


def cmd_index_release(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.index_admin import release_index
    from cluster.ray_runtime import connect

    connect(settings)
    released = release_index(settings, args.target)
    emit(
        args,
        released,
        f"index {released['index']}: stopped {len(released['stopped'])} shard actors; its data stays on disk",
    )
    return 0


def cmd_index_list(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.index_admin import list_indexes
    from cluster.ray_runtime import connect

    connect(settings)
    rows = list_indexes(settings, broker=not args.no_broker)
    lines = []
    for r in rows:
        serves = f"  aliases: {', '.join(r['aliases'])}" if r["aliases"] else ""
        mark = " (index.name)" if r["configured"] else ""
        lines.append(
            f"{r['index']}{mark}: {r['model']} (dim {r['dim']}), {r['documents']} documents, "
            f"{r['chunks']} chunks, lag {r['lag']}{serves}"
        )
    emit(args, rows, "\n".join(lines) or f"no index under {settings.home / 'data'}")
    return 0


def cmd_stats(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.stats import index_stats

    data = index_stats(settings, broker=not args.no_broker)
    text = (
        f"index {data['index']}: {data['documents']} documents, {data['chunks']} chunks "
        f"{data['chunks_per_shard']}; {data['images']} images {data['images_per_shard']}; "
        f"dead letters {data['dead_letters']['total']} "
        f"{data['dead_letters']['by_reason']}; lag {data.get('lag', '?')}"
    )
    if "graph" in data:
        g = data["graph"]
        text += f"\ngraph: {g['documents']} documents, {g['mentions']} mentions; lag {g.get('lag', '?')}"
    emit(args, data, text)
    return 0


def cmd_k8s(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.k8s_render import backfill, kustomize_tree, render, to_yaml

    if args.k8s_command == "backfill":
        overrides = _overrides(args)
        overrides.get("index", {}).pop("name", None)
        served = load_settings(args.config, overrides).index.name
        if settings.index.name == served:
            raise ConfigError(
                f"k8s backfill builds a new index beside the served one: give --index NAME other than "
                f"{served!r}, the index the config serves"
            )
    if args.k8s_command in ("render", "backfill"):
        build = render if args.k8s_command == "render" else backfill
        docs = build(settings, args.overlay, args.namespace)
        if args.json:
            emit(args, docs)
        else:
            print(to_yaml(docs), end="")
        return 0
    root = Path(args.dir)
    files = kustomize_tree(settings, args.namespace)
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    emit(args, sorted(files), f"wrote {len(files)} files under {root}")
    return 0


def cmd_graph(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.graph_files import draw_neighbourhood, export_graph, graph_stats

    if args.graph_command == "reset":
        from cluster.pipeline import reset_graph

        if not args.yes:
            raise ConfigError(
                f"`graph reset` removes the knowledge graph of index {settings.index.name!r} "
                f"({settings.graph_side().data_dir}) and its consumer group: pass --yes to do it"
            )
        data = reset_graph(settings)
        stores = "removed" if data["removed"] else "absent"
        emit(
            args,
            data,
            f"reset the graph of index {data['index']}: consumer group {data['group']}, "
            f"{data['actors_stopped']} shard actors stopped, stores {stores}; "
            "the next ingest with graph.enabled builds it from the topic",
        )
        return 0
    if args.graph_command == "draw":
        out = Path(args.out or f"{settings.index.name}-graph.png")
        data = draw_neighbourhood(settings, args.entity, args.hops, args.limit, out)
        emit(args, data, f"drew {data['entity']} and {data['nodes'] - 1} entities near it to {out}")
        return 0
    if args.graph_command == "stats":
        data = graph_stats(settings)
        top = ", ".join(f"{e['name']} ({e['degree']})" for e in data["top_entities"])
        text = (
            f"graph of index {data['index']}: {data['entities']} entities, {data['edges']} edges "
            f"({data['edges_per_chunk']} per chunk), {data['mentions']} mentions in {data['chunks']} chunks "
            f"of {data['documents']} documents; relations {data['relations_by_label']}; most connected: {top}"
        )
        emit(args, data, text)
        return 0
    out = Path(args.out or f"{settings.index.name}-graph.{args.format}")
    data = {**export_graph(settings, args.format, out), "path": str(out), "format": args.format}
    emit(args, data, f"wrote {data['nodes']} entities and {data['edges']} edges to {out} ({args.format})")
    return 0


def cmd_index_copy(args: argparse.Namespace, settings: Settings) -> int:
    """Copies index ``--from`` into ``--to``; ``--set`` settings apply to the target only (e.g.
    ``index.backend=milvus``), the rest (``--config``, ``--home``, the broker) to both."""
    from cluster.index_copy import copy_index
    from cluster.ray_runtime import connect

    def named(name: str, with_set: bool) -> Settings:
        overrides = _overrides(argparse.Namespace(**{**vars(args), "set": args.set if with_set else []}))
        return load_settings(
            args.config, {**overrides, "index": {**overrides.get("index", {}), "name": name}}
        )

    source, target = named(args.source, with_set=False), named(args.target, with_set=True)
    connect(target)
    report = copy_index(
        source, target, on_progress=None if args.quiet else lambda m: print(m, file=sys.stderr)
    )
    data = report.as_dict()
    text = (
        f"copied index {data['from']} to {data['to']} ({data['backend']}): {data['chunks']} chunks "
        f"{data['chunks_per_shard']}, {data['documents']} documents, offsets {data['committed_offsets']} "
        f"in {data['seconds']} s"
    )
    emit(args, data, text)
    return 0


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    out = Path(args.out)
    result: dict[str, Any]
    if args.which == "query":
        from cluster.bench.query import bench_query

        result = bench_query(
            settings, Path(args.dataset), args.repeat or 5, args.queries, args.k, args.mode, out
        )
        lines = [f"query over {result['chunks']} chunks (edge: {result['edge']}):"]
        for mode, figures in result["modes"].items():
            one = figures["http"][0]
            sixteen = next(lv for lv in figures["http"] if lv["clients"] == 16)
            lines.append(
                f"  {mode}: HTTP p50 {one['p50_ms']:.1f} ms at 1 client (in-process "
                f"{figures['in_process']['p50_ms']:.1f} ms, "
                f"overhead {figures['overhead_p50_ms_1_client']:.1f} ms); "
                f"16 clients {sixteen['qps']:.0f} q/s vs in-process batched "
                f"{figures['in_process']['batched_qps']:.0f} q/s "
                f"({figures['throughput_ratio_16_vs_in_process_batched']:.2f}x)"
            )
        text = "\n".join([*lines, f"report in {out}/query.md"])
    elif args.which == "ingest":
        from cluster.bench.ingest import bench_ingest
        from cluster.bench.report import parse_backends

        backends = parse_backends(args.backend or settings.index.backend)
        result = bench_ingest(settings, Path(args.corpus), args.repeat or 1, out, backends)
        runs = ", ".join(
            f"{name} {run['pipeline_chunks_per_s']} chunks/s (ratio {run['ratio']})"
            for name, run in result["backends"].items()
        )
        text = (
            f"ingest: raw encode {result['raw_chunks_per_s']} chunks/s; pipeline {runs} "
            f"({result['chunks']} chunks; report in {out}/ingest.md)"
        )
    elif args.which == "images":
        from cluster.bench.images import bench_images

        result = bench_images(
            settings,
            args.images,
            args.split or "test",
            args.limit,
            out,
            3 if args.repeat is None else args.repeat,
        )
        training = result["training_s_per_epoch"]
        text = (
            f"images: raw forward {result['raw_images_per_s']} images/s; pipeline "
            f"{result['pipeline_images_per_s']} images/s (ratio {result['ratio']}, the median of "
            f"{', '.join(str(r['ratio']) for r in result['runs'])}); "
            + (f"training {training} s per epoch; " if training is not None else "")
            + f"{result['images']} images; report in {out}/images.md"
        )
    elif args.which == "graph":
        from cluster.bench.graph import bench_graph

        result = bench_graph(settings, Path(args.corpus), args.queries, args.seed, out)
        hops = result["queries_2_hops"]
        text = (
            f"graph: raw nlp.pipe {result['raw_chunks_per_s']} chunks/s; pipeline "
            f"{result['pipeline_chunks_per_s']} chunks/s (ratio {result['ratio']}); 2-hop queries p50 "
            f"{hops['p50_ms']} ms, p99 {hops['p99_ms']} ms; report in {out}/graph.md"
        )
    elif args.which == "rerank":
        from cluster.bench.rerank import bench_rerank

        result = bench_rerank(settings, out, args.queries)
        text = (
            f"rerank ({result['model']}): {result['candidates']} passages a query, "
            f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, {result['pairs_per_s']} pairs/s "
            f"(report in {out}/rerank.md)"
        )
    elif args.which == "batching":
        from cluster.bench.batching import bench_batching

        result = bench_batching(settings, Path(args.dataset), args.texts, out)
        text = result["summary"]
    elif args.which == "freshness":
        from cluster.bench.freshness import bench_freshness

        result = bench_freshness(settings, args.rate, 60.0 if args.seconds is None else args.seconds, out)
        text = result["summary"]
    elif args.which == "load":
        from cluster.bench.load import bench_load

        seconds = 30.0 if args.seconds is None else args.seconds
        result = bench_load(
            settings, Path(args.dataset), seconds, args.requests, args.mode or "vector", args.k, out
        )
        text = result["summary"]
    elif args.which == "fuzz":
        from cluster.bench.fuzz import bench_fuzz

        result = bench_fuzz(settings, Path(args.dataset), args.examples, args.seed, out)
        text = result["summary"]
    elif args.which == "edge":
        from cluster.bench.edge import bench_edge

        result = bench_edge(settings, 10.0 if args.seconds is None else args.seconds, args.grpc_port, out)
        text = "edge ({}): {}; report in {}/edge-{}.md".format(
            result["edge"],
            "; ".join(
                f"{p} {lv['clients']} clients p50 {lv['p50_ms']:.2f} ms {lv['qps']:.0f} req/s"
                for p, levels in result["levels"].items()
                for lv in levels
            ),
            out,
            result["edge"],
        )
    elif args.which == "ann":
        from cluster.bench.ann import bench_ann
        from cluster.bench.report import parse_backends

        result = bench_ann(
            settings,
            Path(args.dataset),
            args.repeat or 1,
            args.queries,
            args.k,
            out,
            backends=parse_backends(args.backend or settings.index.backend),
            synthetic=args.synthetic,
        )
        text = result["summary"]
    else:
        from cluster.bench.peer import bench_peer

        result = bench_peer(settings, Path(args.dataset), args.queries, args.k, out)
        text = result["summary"]
    emit(args, result, text)
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import signal

    from cluster.serving import start_serving

    serving = start_serving(settings, ingest=settings.serve.ingest and not args.no_ingest)
    stopping = {"flag": False}

    def on_signal(signum: int, frame: object) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    emit(args, {"url": serving.url, "ingest": serving.pipeline is not None}, f"serving on {serving.url}")
    if not args.quiet:
        print(f"  docs: {serving.url}/docs   stop: Ctrl-C", file=sys.stderr)
    watching = serving.pipeline is not None
    try:
        while not stopping["flag"]:
            if watching and serving.pipeline is not None:
                try:
                    serving.pipeline.check_alive()
                except Exception as exc:  # ingest failing must not take search down with it
                    watching = False
                    log.error("ingest stopped: %s; the app keeps answering from the index as it is", exc)
            time.sleep(1.0)
    finally:
        serving.stop()
    return 0


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    if args.what == "compare":
        return _eval_compare(args)
    if args.reports:
        raise ConfigError(f"eval {args.what} takes no report files (eval compare does)")
    if not args.dataset:
        raise ConfigError(f"eval {args.what} needs --dataset DIR")
    if args.what == "images":
        return _eval_images(args, settings)
    args.split = args.split or "heldout"
    if args.split not in ("tune", "heldout", "all"):
        raise ConfigError(f"--split {args.split!r}: {args.what} takes tune, heldout or all")
    if args.what == "rag":
        return _eval_rag(args, settings)
    from cluster.eval.retrieval import MODES, eval_retrieval

    report = eval_retrieval(
        settings,
        Path(args.dataset),
        corpus=Path(args.corpus) if args.corpus else None,
        split=args.split,
        sample=args.sample,
        seed=args.seed,
        modes=(*MODES, *(["graph"] if settings.graph.enabled else []))
        if args.mode == "all"
        else (args.mode,),
        index=getattr(args, "index", None),  # the global --index: evaluate that index as it is
        out_dir=Path(args.out),
    )
    lines = [
        f"{report['queries']} queries ({report['split']}) on {report['dataset']}, index {report['index']}:"
    ]
    for mode, r in report["modes"].items():
        lines.append(
            f"  {mode:8s} recall@1 {r['recall@1']:.3f}  @5 {r['recall@5']:.3f}  @10 {r['recall@10']:.3f}  "
            f"@20 {r['recall@20']:.3f}  MRR@10 {r['mrr@10']:.3f}  nDCG@10 {r['ndcg@10']:.3f}  "
            f"all@2 {r['all@2']:.3f}  @5 {r['all@5']:.3f}  @10 {r['all@10']:.3f}"
        )
    emit(args, report, "\n".join(lines))
    return 0


def _eval_compare(args: argparse.Namespace) -> int:
    from cluster.eval.compare import compare_retrieval

    report = compare_retrieval([Path(p) for p in args.reports], Path(args.out))
    width = max(len(label) for label in report["methods"])
    lines = [f"{'method':{width}s}  R@10   MRR@10"]
    lines += [
        f"{label:{width}s}  {scores.get('recall@10', 0):.3f}  {scores.get('mrr@10', 0):.3f}"
        for label, scores in report["methods"].items()
    ]
    lines.append(f"wrote {report['markdown']} and {report['plot']}")
    emit(args, report, "\n".join(lines))
    return 0


def _eval_images(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.eval.images_served import SCORES, eval_images

    report = eval_images(settings, args.dataset, args.split or "test", args.sample, Path(args.out))
    served, direct = report["served"], report["model_direct"]
    lines = [
        f"{report['images']} images, {report['captions']} captions ({report['dataset']} {report['split']}), "
        f"{report['model']}; through the pipeline and HTTP (model direct):"
    ]
    for name in SCORES:
        lines.append(f"  {name:22s} {served[name]:.3f}  ({direct[name]:.3f})")
    lines.append(f"  chance accuracy        {served['chance_accuracy']:.3f}")
    emit(args, report, "\n".join(lines))
    return 0


def _eval_rag(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.eval.rag import eval_rag

    report = eval_rag(
        settings,
        Path(args.dataset),
        corpus=Path(args.corpus) if args.corpus else None,
        split=args.split,
        sample=200 if args.sample is None else args.sample,
        seed=args.seed,
        mode=None if args.mode == "all" else args.mode,
        index=getattr(args, "index", None),
        out_dir=Path(args.out),
    )
    abst = report["abstention"]
    emit(
        args,
        report,
        f"{report['questions']} questions ({report['unanswerable']} unanswerable, {report['split']}) on "
        f"{report['dataset']} with {report['generator']}, {report['mode']} k {report['k']}:\n"
        f"  EM {report['exact_match']:.3f}  F1 {report['f1']:.3f}  ROUGE-L {report['rouge_l']:.3f}  "
        f"holds a reference {report['answer_contains']:.3f}  "
        f"answered {report['answered_rate']:.2f}  context recall {report['context_recall']:.3f}\n"
        f"  citation accuracy {report['citation_accuracy']:.3f}  abstention precision "
        f"{abst['precision']:.3f} recall {abst['recall']:.3f}  perplexity {report['perplexity']:.2f}",
    )
    return 0


def cmd_explain(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.explain import explain, format_explanation

    answer = explain(
        settings, args.query, args.k, args.mode, json.loads(args.filter) if args.filter else None
    )
    emit(args, answer, format_explanation(answer))
    return 0


def cmd_finetune(args: argparse.Namespace, settings: Settings) -> int:
    """Trains Riverbed's LiT image-text model (or finds it in the cache); with ``--evaluate``,
    scores it zero-shot on the dataset's test split."""
    from cluster.finetune_image_text import finetune_image_text

    def show(event: dict[str, Any]) -> None:
        if args.quiet:
            return
        if event["kind"] == "step":
            line = (
                f"[{event['elapsed_s']:6.1f}s] epoch {event['epoch']}/{event['epochs']}  "
                f"step {event['step']}/{event['steps']}  loss {event['loss']:.3f}"
            )
        else:
            val = event.get("val_caption_accuracy")
            line = (
                f"[{event['elapsed_s']:6.1f}s] epoch {event['epoch']}/{event['epochs']} done in "
                f"{event['epoch_s']:.1f} s: loss {event['loss']:.3f}"
                + (f", validation accuracy {val:.3f}" if val is not None else "")
                + (
                    f", text->image P@10 {event['val_text_to_image_p_at_10']:.3f}"
                    if "val_text_to_image_p_at_10" in event
                    else ""
                )
            )
        print(line, file=sys.stderr, flush=True)

    result = finetune_image_text(
        settings,
        args.dataset,
        out=Path(args.out) if args.out else None,
        limit=args.limit,
        on_progress=show,
    )
    data: dict[str, Any] = {
        "path": str(result.path),
        "cached": result.cached,
        "text_model": result.record.text_model,
        "dim": result.record.dim,
        "dataset": result.record.dataset,
        "train_seconds": result.record.train_seconds,
        "history": result.record.history,
    }
    if args.out:
        data["out"] = args.out
    lines = [f"{'found' if result.cached else 'trained'} {result.path}"]
    if args.evaluate:
        from actors.image_model import ImageTextModel
        from cluster.eval.images import evaluate_image_text
        from cluster.image_datasets import load_image_dataset

        model = ImageTextModel(
            settings.images.model_copy(update={"model": str(result.path)}),
            text_model=settings.embed.model,
            cache_dir=settings.cache_dir,
        )
        scores = evaluate_image_text(model, load_image_dataset(args.dataset, args.evaluate))
        data["evaluation"] = scores
        lines.append(
            f"zero-shot on {scores['split']} ({scores['images']} images, {scores['captions']} captions): "
            f"caption accuracy {scores['caption_accuracy']:.3f} (chance {scores['chance_accuracy']:.3f}), "
            f"text->image P@10 {scores['text_to_image_p@10']:.3f} R@10 {scores['text_to_image_r@10']:.3f}, "
            f"image->image P@10 {scores['image_to_image_p@10']:.3f}"
        )
    emit(args, data, "\n".join(lines))
    return 0


def _show_progress(args: argparse.Namespace) -> Any:
    """A progress callback printing training steps and epochs to stderr (none with --quiet)."""

    def show(event: dict[str, Any]) -> None:
        if args.quiet:
            return
        if event["kind"] == "step":
            line = (
                f"[{event['elapsed_s']:6.1f}s] epoch {event['epoch']}/{event['epochs']}  "
                f"step {event['step']}/{event['steps']}  loss {event['loss']:.3f}"
            )
        else:
            line = (
                f"[{event['elapsed_s']:6.1f}s] epoch {event['epoch']}/{event['epochs']} done in "
                f"{event['epoch_s']:.1f} s: loss {event['loss']:.3f}"
            )
        print(line, file=sys.stderr, flush=True)

    return show


def cmd_finetune_text(args: argparse.Namespace, settings: Settings) -> int:
    """Trains the reranker or the extractive reader (or finds it in the cache)."""
    from cluster.finetune_text import (
        SQUAD_V1,
        SQUAD_V2,
        finetune_embedder,
        finetune_reader,
        finetune_reranker,
    )

    out = Path(args.out) if args.out else None
    dataset = Path(args.dataset) if args.dataset else SQUAD_V1
    if args.finetune_command == "embedder":
        result = finetune_embedder(
            settings,
            dataset,
            index=getattr(args, "index", None),
            out=out,
            on_progress=_show_progress(args),
        )
    elif args.finetune_command == "reranker":
        result = finetune_reranker(
            settings,
            dataset,
            index=getattr(args, "index", None),  # the global --index: one that holds the corpus already
            out=out,
            on_progress=_show_progress(args),
        )
    else:
        unanswerable = Path(args.unanswerable) if args.unanswerable else SQUAD_V2
        result = finetune_reader(settings, dataset, unanswerable, out=out, on_progress=_show_progress(args))
    data = {"path": str(result.path), "cached": result.cached, **result.record}
    line = f"{'found' if result.cached else 'trained'} {result.path}"
    if "threshold" in result.record:
        r = result.record
        line += (
            f"\nabstention threshold {r['threshold']:.3f} "
            f"(calibration: SQuAD v2 F1 {r['calibration_f1']:.3f}, "
            f"abstention precision {r['calibration_abstention_precision']:.3f} / recall "
            f"{r['calibration_abstention_recall']:.3f})"
        )
    emit(args, data, line)
    return 0


def _chosen(args: argparse.Namespace, section: str, field: str) -> bool:
    """Whether the user set ``section.field``: with ``--set``, in the environment, or in the
    config file (``--config`` or ``$RIVERBED_CONFIG``), whatever the value."""
    if field in _overrides(args).get(section, {}):
        return True
    if f"RIVERBED_{section}__{field}".upper() in {k.upper() for k in os.environ}:
        return True
    config = args.config or os.environ.get("RIVERBED_CONFIG")
    if not config:
        return False
    import yaml

    data = yaml.safe_load(Path(config).expanduser().read_text()) or {}  # load_settings checked it
    return isinstance(data, dict) and isinstance(data.get(section), dict) and field in data[section]


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.demo import demo_settings, run_demo

    return run_demo(
        demo_settings(settings, graph_chosen=_chosen(args, "graph", "enabled")),
        sample=Path(args.data),
        json_output=args.json,
        keep_serving=args.serve,
    )


# PARSER
def build_parser() -> argparse.ArgumentParser:
    # Global flags are accepted before or after the command. SUPPRESS keeps a subparser from
    # resetting a flag given before the command to its default; main() fills in defaults.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--config", metavar="FILE", help="YAML settings file (also RIVERBED_CONFIG)")
    common.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override a setting")
    common.add_argument("--bootstrap-servers", help="use this Kafka instead of the embedded broker")
    common.add_argument("--index", help="index name (scopes data and consumer group)")
    common.add_argument("--home", help="state and data directory (default ~/.riverbed)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    parser = argparse.ArgumentParser(prog="riverbed", description=__doc__, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = sub.add_parser("config", help="show the effective settings", parents=[common])
    config.add_argument("action", choices=["show"])
    config.set_defaults(func=cmd_config_show)

    kafka = sub.add_parser("kafka", help="the embedded Kafka broker", parents=[common])
    kafka.add_argument("action", choices=["start", "stop", "status"])
    kafka.set_defaults(func=cmd_kafka)

    produce = sub.add_parser(
        "produce", help="send documents and images from files to their topics", parents=[common]
    )
    produce.add_argument(
        "path",
        help=".jsonl file of envelopes or documents, .txt/.md file, image file (.png .jpg .jpeg .webp .gif, "
        "caption from NAME.txt beside it), or a directory of them",
    )
    produce.add_argument(
        "--topic",
        help="one topic for every record (default: documents to kafka.topics.documents, images to "
        "kafka.topics.images)",
    )
    produce.add_argument("--strict", action="store_true", help="exit 1 if any record was skipped")
    produce.set_defaults(func=cmd_produce)

    up = sub.add_parser("up", help="start (or find) Kafka and the Ray head", parents=[common])
    up.set_defaults(func=cmd_up)
    down = sub.add_parser(
        "down",
        help="stop this home's local Ray head (no other Ray) and the embedded Kafka",
        parents=[common],
    )
    down.set_defaults(func=cmd_down)
    ps = sub.add_parser(
        "ps",
        help="the cluster's live actors by index: role, state, node, CPUs/GPUs held, pid; free CPUs",
        parents=[common],
    )
    ps.set_defaults(func=cmd_ps)

    ingest = sub.add_parser(
        "ingest", help="run the ingest pipeline (Kafka → chunk → embed → shards)", parents=[common]
    )
    ingest.add_argument("--until-idle", action="store_true", help="exit once lag is 0 and all is committed")
    ingest.add_argument(
        "--release",
        action="store_true",
        help="at the end, stop the index's shard actors too (a batch job on a cluster nothing serves "
        "from; by default they stay up for `serve`)",
    )
    ingest.add_argument(
        "--alone",
        action="store_true",
        help="refuse to start while another ingest of this index runs anywhere (its consumer groups have "
        "members): a backfill job must not join a served index's group",
    )
    ingest.set_defaults(func=cmd_ingest)

    stats = sub.add_parser(
        "stats", help="documents, chunks per shard, dead letters, offsets", parents=[common]
    )
    stats.add_argument("--no-broker", action="store_true", help="read only the shard stores")
    stats.set_defaults(func=cmd_stats)

    graph = sub.add_parser(
        "graph",
        help="the index's knowledge graph: figures, the whole graph as a file, or a neighbourhood drawn",
        parents=[common],
    )
    graph_sub = graph.add_subparsers(dest="graph_command", required=True, metavar="ACTION")
    graph_sub.add_parser(
        "stats", help="entities, edges per relation, mentions, the most connected entities", parents=[common]
    ).set_defaults(func=cmd_graph)
    export = graph_sub.add_parser("export", help="write the graph as GraphML or JSON", parents=[common])
    export.add_argument("--format", choices=["graphml", "json"], default="graphml")
    export.add_argument("--out", help="the file to write (default: <index>-graph.<format>)")
    export.set_defaults(func=cmd_graph)
    draw = graph_sub.add_parser("draw", help="draw an entity's neighbourhood as a PNG", parents=[common])
    draw.add_argument("entity", help="the entity (its name as written, or its key)")
    draw.add_argument("--hops", type=int, choices=[1, 2, 3], default=2)
    draw.add_argument("--limit", type=int, default=30, help="entities drawn at most (the nearest first)")
    draw.add_argument("--out", help="the PNG to write (default: <index>-graph.png)")
    draw.set_defaults(func=cmd_graph)
    reset = graph_sub.add_parser(
        "reset",
        help="forget the graph (its stores, its shard actors, its consumer group) so that the next ingest "
        "with graph.enabled builds it again from the topic; the text index stays",
        parents=[common],
    )
    reset.add_argument("--yes", action="store_true", help="really remove it (required)")
    reset.set_defaults(func=cmd_graph)

    k8s = sub.add_parser(
        "k8s",
        help="Kubernetes manifests (KubeRay RayService, Strimzi Kafka) for these settings",
        parents=[common],
    )
    k8s_sub = k8s.add_subparsers(dest="k8s_command", required=True, metavar="ACTION")
    k8s_render = k8s_sub.add_parser("render", help="print the manifests as YAML", parents=[common])
    k8s_backfill = k8s_sub.add_parser(
        "backfill",
        help="print a RayJob (and its ConfigMap) that builds the index these settings name from the "
        "topics, on a Ray cluster of its own, beside the running RayService",
        parents=[common],
    )
    for k8s_parser in (k8s_render, k8s_backfill):
        k8s_parser.add_argument(
            "--overlay", choices=["cpu", "gpu"], default="cpu", help="gpu adds a GPU worker group"
        )
    k8s_write = k8s_sub.add_parser(
        "write", help="write the kustomize tree (base/, overlays/cpu, overlays/gpu)", parents=[common]
    )
    k8s_write.add_argument("--dir", default="k8s", help="where to write it (default: k8s)")
    for k8s_parser in (k8s_render, k8s_backfill, k8s_write):
        k8s_parser.add_argument("--namespace", default="riverbed", help="the namespace of every object")
        k8s_parser.set_defaults(func=cmd_k8s)

    index = sub.add_parser(
        "index",
        help="manage indexes: copy, reindex with another model, aliases, list, release",
        parents=[common],
    )
    index_sub = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    copy = index_sub.add_parser(
        "copy",
        help="copy an index (vectors, text, metadata, document rows, offsets; no re-embedding) to a new "
        "name; --set settings (e.g. index.backend=milvus) apply to the copy only",
        parents=[common],
    )
    copy.add_argument("--from", dest="source", required=True, metavar="INDEX", help="the index to copy")
    copy.add_argument(
        "--to", dest="target", required=True, metavar="INDEX", help="the new index (must be empty)"
    )
    copy.set_defaults(func=cmd_index_copy)
    reindex = index_sub.add_parser(
        "reindex",
        help="build a new index from the documents topic with another embedding model, while the served "
        "one keeps serving; then move the alias (index alias)",
        parents=[common],
    )
    reindex.add_argument("--model", required=True, help="the embedding model (id or path) of the new index")
    reindex.add_argument(
        "--as", dest="target", required=True, metavar="INDEX", help="the new index (never a served one)"
    )
    reindex.add_argument("--follow", action="store_true", help="keep ingesting once caught up (Ctrl-C stops)")
    reindex.set_defaults(func=cmd_index_reindex)
    alias = index_sub.add_parser(
        "alias", help="point an alias at an index (an app serving index.alias follows it)", parents=[common]
    )
    alias.add_argument("alias")
    alias.add_argument("--to", dest="target", required=True, metavar="INDEX")
    alias.set_defaults(func=cmd_index_alias)
    listing = index_sub.add_parser(
        "list", help="indexes under this home: model, documents, chunks, lag, aliases", parents=[common]
    )
    listing.add_argument("--no-broker", action="store_true", help="skip the lag (no broker needed)")
    listing.set_defaults(func=cmd_index_list)
    release = index_sub.add_parser(
        "release",
        help="stop an index's shard actors (text, images, graph) to free their memory, e.g. the old index "
        "after an alias move; its data stays, and reading it starts them again (never a served index)",
        parents=[common],
    )
    release.add_argument("target", metavar="INDEX")
    release.set_defaults(func=cmd_index_release)

    bench = sub.add_parser(
        "bench",
        help="benchmarks, measured side by side (ingest, query, batching, freshness, ann, peer, load, fuzz, "
        "images, graph)",
        parents=[common],
    )
    bench.add_argument(
        "which",
        choices=[
            "ingest",
            "query",
            "batching",
            "freshness",
            "ann",
            "peer",
            "load",
            "fuzz",
            "images",
            "graph",
            "rerank",
            "edge",
        ],
    )
    bench.add_argument(
        "--corpus", default="data/squad-v1.1-dev/corpus.jsonl", help="ingest, graph: documents to ingest"
    )
    bench.add_argument(
        "--dataset",
        default="data/squad-v1.1-dev",
        help="query, batching, ann, peer, load, fuzz: BEIR-layout corpus and queries",
    )
    bench.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="copies of the corpus under different ids (ingest 1, query 5, ann 1); images: pipeline "
        "runs, each between two raw forwards (3)",
    )
    bench.add_argument(
        "--queries",
        type=int,
        default=400,
        help="query, ann, peer, rerank: questions sent per measurement; graph: entities queried",
    )
    bench.add_argument("--k", type=int, default=10, help="query, ann, peer, load: hits per search")
    bench.add_argument(
        "--backend",
        default=None,
        help="ann: index backends side by side, comma-separated (faiss,milvus); ingest: one backend; "
        "default index.backend",
    )
    bench.add_argument(
        "--synthetic",
        type=int,
        default=0,
        help="ann: this many random unit vectors (and random queries) instead of the dataset's",
    )
    bench.add_argument(
        "--mode",
        choices=SEARCH_MODES,
        default=None,
        help="query: the one search mode to measure (default: vector, keyword and hybrid); load: the "
        "search mode (default vector)",
    )
    bench.add_argument(
        "--texts", type=int, default=None, help="batching: embed only this many texts of the mix"
    )
    bench.add_argument("--rate", type=float, default=20.0, help="freshness: documents produced per second")
    bench.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="freshness: how long to produce (60); load: how long each concurrency level runs (30); "
        "edge: each protocol and client count (10)",
    )
    bench.add_argument("--grpc-port", type=int, default=9000, help="edge: the port Serve's gRPC answers on")
    bench.add_argument("--requests", type=int, default=3000, help="load: most requests per concurrency level")
    bench.add_argument(
        "--examples", type=int, default=200, help="fuzz: most examples per route in each schemathesis phase"
    )
    bench.add_argument(
        "--seed",
        type=int,
        default=0,
        help="fuzz: schemathesis' seed (a run repeats with it); graph: draws the entities queried",
    )
    bench.add_argument(
        "--images",
        default="easy-vqa",
        help="images: easy-vqa, or a directory of images with NAME.txt captions",
    )
    bench.add_argument("--split", default=None, help="images: the dataset split (test)")
    bench.add_argument("--limit", type=int, default=None, help="images: only the first N captioned images")
    bench.add_argument("--out", default="out/bench", help="where JSON, PNG and markdown reports go")
    bench.set_defaults(func=cmd_bench)

    serve = sub.add_parser(
        "serve", help="answer search, RAG and embeddings over HTTP (and keep ingesting)", parents=[common]
    )
    serve.add_argument("--no-ingest", action="store_true", help="serve only; do not run the ingest pipeline")
    serve.set_defaults(func=cmd_serve)

    evaluate = sub.add_parser(
        "eval",
        help="measure retrieval (recall, MRR, nDCG) or answers (EM, F1, citations, abstention) on a "
        "BEIR-layout dataset (with --index NAME: that index as it is; without: the corpus ingested "
        "into a fresh index); or images (zero-shot caption accuracy, text->image and image->image "
        "precision) through the pipeline and the app; compare: retrieval reports of the same "
        "questions side by side (a table and a bar chart of MRR@10 and recall@10 per method)",
        parents=[common],
    )
    evaluate.add_argument("what", choices=["retrieval", "rag", "images", "compare"])
    evaluate.add_argument("reports", nargs="*", help="compare: the retrieval reports (.json) to compare")
    evaluate.add_argument(
        "--dataset",
        help="retrieval, rag, images (required): directory with corpus.jsonl, queries.jsonl, qrels.tsv; "
        "images: easy-vqa, or a directory of images with NAME.txt captions",
    )
    evaluate.add_argument("--corpus", help="take the corpus from this dataset instead (cross-lingual runs)")
    evaluate.add_argument(
        "--split", help="retrieval, rag: tune, heldout (default) or all; images: the dataset's split (test)"
    )
    evaluate.add_argument(
        "--sample",
        type=int,
        help="evaluate this many queries of the split (rag: default 200); images: the first N images",
    )
    evaluate.add_argument("--seed", type=int, default=0, help="of the sample")
    evaluate.add_argument(
        "--mode",
        choices=[*SEARCH_MODES, "all"],
        default="all",
        help="retrieval: modes to score (all: each); rag: the retrieval mode (all: serve.rag.mode)",
    )
    evaluate.add_argument("--out", default="out/eval", help="where JSON and markdown reports go")
    evaluate.set_defaults(func=cmd_eval)

    explain = sub.add_parser(
        "explain",
        help="why each hit of a search ranks where it does (asks the running app)",
        parents=[common],
    )
    explain.add_argument("query")
    explain.add_argument("--k", type=int, default=5)
    explain.add_argument("--mode", choices=SEARCH_MODES, default="hybrid")
    explain.add_argument("--filter", help='metadata filter as JSON, e.g. \'{"title": "Normans"}\'')
    explain.set_defaults(func=cmd_explain)

    finetune = sub.add_parser(
        "finetune", help="train Riverbed's own models (cached by their settings)", parents=[common]
    )
    finetune_sub = finetune.add_subparsers(dest="finetune_command", required=True, metavar="MODEL")
    image_text = finetune_sub.add_parser(
        "image-text",
        help="train the LiT image-text model (a ViT into the text embedder's space) on Ray Train; "
        "settings: images.finetune.*",
        parents=[common],
    )
    image_text.add_argument(
        "--dataset",
        required=True,
        help="easy-vqa (the installed package's data), or a directory of images with NAME.txt captions "
        "(with train/ and test/ subdirectories, or all of it as train)",
    )
    image_text.add_argument("--out", help="also copy the trained model to this directory")
    image_text.add_argument("--limit", type=int, help="train on the first N captioned images only")
    image_text.add_argument(
        "--evaluate",
        nargs="?",
        const="test",
        default=None,
        metavar="SPLIT",
        help="then score it zero-shot on this split of the dataset (default: test)",
    )
    image_text.set_defaults(func=cmd_finetune)
    reranker = finetune_sub.add_parser(
        "reranker",
        help="train the cross-encoder reranker (serve.search.rerank) on Ray Train; "
        "settings: finetune.reranker.*",
        parents=[common],
    )
    reranker.add_argument(
        "--dataset",
        help="BEIR-layout directory whose tune questions it learns from (default: SQuAD v1.1 dev)",
    )
    reranker.add_argument("--out", help="write the model here (needed with another --dataset)")
    reranker.set_defaults(func=cmd_finetune_text)
    embedder = finetune_sub.add_parser(
        "embedder",
        help="fine-tune the embedding model on the tune questions with mined hard negatives (Ray Train); "
        "a new index is built with it (riverbed index reindex --model PATH); settings: finetune.embedder.*",
        parents=[common],
    )
    embedder.add_argument(
        "--dataset",
        help="BEIR-layout directory whose tune questions it learns from (default: SQuAD v1.1 dev)",
    )
    embedder.add_argument("--out", help="write the model here (needed with another --dataset)")
    embedder.set_defaults(func=cmd_finetune_text)
    reader = finetune_sub.add_parser(
        "reader",
        help="train the extractive reader (serve.llm.backend: extractive) on Ray Train and set its "
        "abstention threshold; settings: finetune.reader.*",
        parents=[common],
    )
    reader.add_argument("--dataset", help="BEIR-layout answerable questions (default: SQuAD v1.1 dev)")
    reader.add_argument(
        "--unanswerable", help="BEIR-layout questions with unanswerable ones (default: SQuAD v2.0 dev)"
    )
    reader.add_argument("--out", help="write the model here (needed with other datasets)")
    reader.set_defaults(func=cmd_finetune_text)

    demo = sub.add_parser("demo", help="run the main job end to end on the sample corpus", parents=[common])
    demo.add_argument("--data", default="data/squad-v1.1-dev", help="BEIR-layout directory to ingest")
    demo.add_argument("--serve", action="store_true", help="keep the HTTP app up after the sample queries")
    demo.set_defaults(func=cmd_demo)
    return parser


_GLOBAL_DEFAULTS: dict[str, Any] = {
    "config": None,
    "set": [],
    "bootstrap_servers": None,
    "index": None,
    "home": None,
    "json": False,
    "verbose": False,
    "quiet": False,
}


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # kafka-python logs every connection attempt at INFO and refusals at ERROR.
    logging.getLogger("kafka").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    # faiss logs at INFO that it tried and skipped its AVX2/AVX512 builds.
    logging.getLogger("faiss").setLevel(logging.DEBUG if verbose else logging.WARNING)
    # httpx logs every request at INFO; the demo and the benchmarks send thousands.
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills `eval compare`'s report list from the words right after "compare" only: the
    # rest of them (after an option such as --out) come back unknown, and are reports too
    if extra and getattr(args, "what", None) == "compare" and not any(e.startswith("-") for e in extra):
        args.reports = [*args.reports, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    for name, default in _GLOBAL_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    _configure_logging(args.verbose)
    try:
        settings = load_settings(args.config, _overrides(args))
        from cluster.ray_runtime import prepare_environment

        prepare_environment(settings)
        func: Command = args.func
        return func(args, settings)
    except ConfigError as exc:
        print(f"riverbed: {exc}", file=sys.stderr)
        return 2
    except RiverbedError as exc:
        print(f"riverbed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
