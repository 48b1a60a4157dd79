"""Embedder throughput on its own: ``Embedder.embed`` (token-budget batches) next to
``SentenceTransformer.encode(batch_size=32)`` on the same texts, device and model, in one run.

Runs without Ray, Kafka or FAISS (so it also runs on a bare GPU machine):
``python -m cluster.bench.embedder --model PATH_OR_ID --repeat 3``. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from actors.embedder import Embedder
from actors.models import resolve_model
from cluster.bench.report import machine
from schemas.settings import EmbedConfig

CORPUS = Path(__file__).resolve().parents[2] / "data" / "squad-v1.1-dev" / "corpus.jsonl"


def passages(repeat: int) -> list[str]:
    with CORPUS.open(encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return texts * repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N passages")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    import torch
    from sentence_transformers import SentenceTransformer

    texts = passages(args.repeat)[: args.limit]
    embedder = Embedder(
        EmbedConfig(model=args.model, device=args.device, num_cpus=float(torch.get_num_threads()))
    )
    embedder.warm_up()
    embedder.embed(texts[:256])  # warm-up: kernels, allocator
    t0 = time.perf_counter()
    ours = embedder.embed(texts)
    ours_s = time.perf_counter() - t0

    device = embedder.device
    reference = SentenceTransformer(resolve_model(args.model).location, device=device)
    results = {}
    for name, half in (("encode_fp32", False), ("encode_fp16", True)):
        if half and device != "cuda":
            continue
        model = reference.half() if half else reference
        model.encode(texts[:256], batch_size=32, show_progress_bar=False)
        t0 = time.perf_counter()
        ref = model.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False)
        results[name] = {
            "texts_per_s": round(len(texts) / (time.perf_counter() - t0), 1),
            "min_cosine_to_ours": round(float((ref * ours).sum(axis=1).min()), 5),
        }
    ours_rate = len(texts) / ours_s
    out = {
        "texts": len(texts),
        "device": device,
        "model": args.model,
        "embedder_texts_per_s": round(ours_rate, 1),
        "batch_limits": embedder.batch_limits,
        **{f"{k}": v for k, v in results.items()},
        "ratio_vs_encode": {k: round(ours_rate / v["texts_per_s"], 2) for k, v in results.items()},
        "machine": machine(),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
