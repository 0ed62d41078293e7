"""Embedding throughput and latency: `macprovider serve`'s /v1/embeddings against sentence-transformers on the
same machine and model.

    python scripts/bench_embeddings.py [--model ID] [--requests 160] [--clients 1,8] [--batch 256]

Workloads (the texts are a fixed mix of 8–70-token sentences, cycled):
- many small requests: `--requests` requests of one text each, sent by 1 and 8 concurrent clients (threads
  with their own openai SDK client); per request latency p50/p95 and texts/s over the whole run. The server
  batches the concurrent clients' texts together (dynamic batching).
- one large request of `--batch` texts: wall time and texts/s.
The reference runs the same workloads in-process: `SentenceTransformer(<snapshot>, device="cpu").encode([text])`
per request (8 threads calling it for 8 clients, as a naive server would), and `encode(texts, batch_size=32)`
for the large one. Needs sentence-transformers and torch (see scripts/check_embeddings.py). Prints a table
and the served/reference ratio. Run it with OpenBLAS preloaded as the tests do
(LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0) on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from serve_ready import wait_healthy

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital and most populous city of France, with an estimated population of two million.",
    "Embeddings map text to vectors so that texts with similar meanings lie close together in the space.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Stock markets fell sharply on Tuesday after the central bank raised interest rates by half a point, "
    "the largest increase in two decades, citing persistent inflation in services and housing.",
    "東京は日本の首都であり、世界最大級の都市圏を形成している。",
    "I love this product, it works perfectly and the battery lasts for days.",
    "Retrieval-augmented generation retrieves passages relevant to a question from a document store and "
    "gives them to a language model as context, so that its answer can cite sources it was never trained on. "
    "The retriever ranks passages by the cosine similarity of their embeddings to the question's embedding.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_clients(clients: int, requests: int, call: Callable[[int, str], None]) -> tuple[float, list[float]]:
    """`requests` calls of `call(client_index, text)` spread over `clients` threads: (wall seconds, latencies)."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker(index: int) -> None:
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            start = time.perf_counter()
            call(index, SENTENCES[n % len(SENTENCES)])
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, latencies


def report(name: str, clients: int, wall: float, latencies: list[float]) -> float:
    rate = len(latencies) / wall
    print(
        f"{name:<22} {clients:>7}  {rate:>9.1f}  {percentile(latencies, 0.5) * 1000:>8.1f}  "
        f"{percentile(latencies, 0.95) * 1000:>8.1f}"
    )
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="macprovider-demo/all-minilm-l6-v2")
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]

    import openai

    from macprovider.models.demo import EMBEDDING_DEMO_MODEL_ID, create_embedding_demo_model
    from macprovider.models.ids import cached_model_path

    path = cached_model_path(args.model) or (
        create_embedding_demo_model() if args.model == EMBEDDING_DEMO_MODEL_ID else None
    )
    if path is None:
        print(f"model {args.model} is not in the cache", file=sys.stderr)
        return 1
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "macprovider", "serve", "--model", args.model, "--port", str(port)],
        stderr=subprocess.DEVNULL,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    served: dict[tuple[str, int], float] = {}
    print(f"{'workload':<22} {'clients':>7}  {'texts/s':>9}  {'p50 ms':>8}  {'p95 ms':>8}")
    try:
        wait_healthy(port, server)
        sdk = [
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
            for _ in range(max(clients))
        ]
        sdk[0].embeddings.create(model=args.model, input=SENTENCES)  # warm-up
        for c in clients:
            wall, lat = run_clients(
                c, args.requests, lambda i, text: sdk[i].embeddings.create(model=args.model, input=text)
            )
            served[("small", c)] = report("macprovider, 1 text", c, wall, lat)
        texts = [SENTENCES[i % len(SENTENCES)] for i in range(args.batch)]
        start = time.perf_counter()
        sdk[0].embeddings.create(model=args.model, input=texts)
        wall = time.perf_counter() - start
        served[("batch", 1)] = report(f"macprovider, {args.batch} texts", 1, wall / args.batch, [wall])
    finally:
        server.terminate()
        server.wait(30)

    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(path), device="cpu")
    reference.encode(SENTENCES)  # warm-up
    ratios = []
    for c in clients:
        wall, lat = run_clients(c, args.requests, lambda i, text: reference.encode([text]))
        rate = report("sentence-transformers", c, wall, lat)
        ratios.append(f"{c} client(s) {served[('small', c)] / rate:.2f}x")
    start = time.perf_counter()
    reference.encode(texts, batch_size=32)
    wall = time.perf_counter() - start
    rate = report(f"s-t, {args.batch} texts", 1, wall / args.batch, [wall])
    ratios.append(f"{args.batch}-text request {served[('batch', 1)] / rate:.2f}x")
    print("texts/s, macprovider / sentence-transformers: " + ", ".join(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
