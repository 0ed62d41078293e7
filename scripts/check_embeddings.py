"""Hold `macprovider serve`'s /v1/embeddings to sentence-transformers on the same model files.

    python scripts/check_embeddings.py [--model ID] [--min-cosine 0.9999]

Starts `macprovider serve --model ID` (default the `models demo --embeddings` model, installed first when
absent), sends a few dozen varied texts through the openai SDK (short, long up to the model's input limit,
non-Latin scripts, code, emoji; as one batch and one by one, float and base64), and compares each vector with
`SentenceTransformer(<snapshot dir>, device="cpu").encode(text)`: cosine similarity must be ≥ --min-cosine per
input. Also checks that an input one token over the limit is refused (400 naming its index) and that an empty
string is refused (400, as OpenAI does). Prints one line per text and a summary; exit 1 on any failure.

Needs sentence-transformers and torch, which are not test dependencies (PyPI's Linux torch wheel pulls CUDA
libraries, gigabytes): `pip install torch==<a CPU wheel> sentence-transformers`. CI holds a NumPy forward of the
same BERT weights to the same bound instead (tests/test_embeddings.py).
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from serve_ready import wait_healthy

TEXTS = [
    "Hello world",
    "a",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "MLX is an array framework for machine learning on Apple silicon.",
    "def add(a, b):\n    return a + b",
    "SELECT name, COUNT(*) FROM users WHERE age > 30 GROUP BY name;",
    "  leading and trailing spaces  ",
    "UPPER CASE AND lower case and MiXeD CaSe",
    "Numbers: 3.14159, 2.71828, 1e-12, 42, -7, 1,000,000.",
    "Emoji 😀🚀🔥 and symbols © ® ™ ∑ ∫ √",
    "東京は日本の首都です。",
    "北京是中华人民共和国的首都。",
    "Москва — столица России.",
    "القاهرة هي عاصمة مصر.",
    "नई दिल्ली भारत की राजधानी है।",
    "서울은 대한민국의 수도입니다.",
    "Αθήνα είναι η πρωτεύουσα της Ελλάδας.",
    "Ünïcödé àccénts: café, naïve, façade, Zürich, São Paulo.",
    "tab\tseparated\tvalues\nand new lines\n\nand blank lines",
    "https://example.com/path?query=1&other=two#fragment",
    "user@example.com wrote: 'quoted text' and \"double quotes\"",
    "The mitochondria is the powerhouse of the cell.",
    "Embeddings map text to vectors so that similar meanings lie close together.",
    "A cat sat on the mat.",
    "A dog lay on the rug.",
    "Stock markets fell sharply on Tuesday after the central bank raised interest rates.",
    "I love this product, it works perfectly!",
    "This is the worst purchase I have ever made.",
    "ok",
    "?",
]


def long_text(tokenizer, tokens: int) -> str:
    """A text whose tokenization (special tokens included) is exactly `tokens` long."""
    words = ("retrieval augmented generation embeds documents and queries into one vector space " * 80).split()
    lo, hi = 1, len(words)
    while lo < hi:  # the most words whose encoding fits
        mid = (lo + hi + 1) // 2
        if len(tokenizer.encode(" ".join(words[:mid])).ids) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    text = " ".join(words[:lo])
    assert len(tokenizer.encode(text).ids) == tokens, "word-sized steps missed the exact length"
    return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="macprovider-demo/all-minilm-l6-v2")
    parser.add_argument("--min-cosine", type=float, default=0.9999)
    args = parser.parse_args()

    import openai
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

    from macprovider.models.demo import EMBEDDING_DEMO_MODEL_ID, create_embedding_demo_model
    from macprovider.models.embedding import read_embedding_config
    from macprovider.models.ids import cached_model_path

    path = cached_model_path(args.model)
    if path is None and args.model == EMBEDDING_DEMO_MODEL_ID:
        path = create_embedding_demo_model()
    if path is None:
        print(f"model {args.model} is not in the cache", file=sys.stderr)
        return 1
    limit = read_embedding_config(path).max_tokens
    tokenizer = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    texts = TEXTS + [long_text(tokenizer, limit // 2), long_text(tokenizer, limit - 1), long_text(tokenizer, limit)]

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "macprovider", "serve", "--model", args.model, "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    try:
        wait_healthy(port, server)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        t0 = time.perf_counter()
        batch = client.embeddings.create(model=args.model, input=texts, encoding_format="float")
        t_batch = time.perf_counter() - t0
        # base64 asked for explicitly: the SDK hands the string back undecoded (little-endian float32 bytes)
        singles = [
            np.frombuffer(
                base64.b64decode(
                    client.embeddings.create(model=args.model, input=text, encoding_format="base64").data[0].embedding
                ),
                "<f4",
            )
            for text in texts
        ]
        refused = []
        for bad, what in ((long_text(tokenizer, limit + 1), "one token over the limit"), ("", "an empty string")):
            try:
                client.embeddings.create(model=args.model, input=["fine", bad])
                refused.append(f"FAIL {what}: accepted")
            except openai.BadRequestError as exc:
                ok = "input[1]" in str(exc)
                refused.append(
                    f"{'ok  ' if ok else 'FAIL'} {what}: 400 "
                    f"{exc.body.get('message') if isinstance(exc.body, dict) else exc}"
                )
    finally:
        server.terminate()
        server.wait(30)

    reference = SentenceTransformer(str(path), device="cpu")
    t0 = time.perf_counter()
    expected = reference.encode(texts, convert_to_numpy=True, normalize_embeddings=False)
    t_reference = time.perf_counter() - t0
    served = np.array([d.embedding for d in batch.data], dtype=np.float64)
    single = np.array(singles, dtype=np.float64)

    def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    batch_cos, single_cos = cosine(served, expected), cosine(single, expected)
    failures = 0
    for text, tokens, c1, c2 in zip(texts, (len(tokenizer.encode(t).ids) for t in texts), batch_cos, single_cos):
        status = "ok  " if min(c1, c2) >= args.min_cosine else "FAIL"
        failures += status == "FAIL"
        print(f"{status} cos batch {c1:.7f} single {c2:.7f} tokens {tokens:>3}  {text[:48]!r}")
    for line in refused:
        print(line)
        failures += line.startswith("FAIL")
    print(
        f"\n{len(texts)} texts: min cosine {min(batch_cos.min(), single_cos.min()):.7f} (bound {args.min_cosine}); "
        f"max |Δ| {np.abs(served - expected).max():.2e}; usage.prompt_tokens {batch.usage.prompt_tokens}"
    )
    print(
        f"one request of {len(texts)} texts: served {t_batch * 1000:.0f} ms; sentence-transformers encode "
        f"{t_reference * 1000:.0f} ms"
    )
    print("PASS" if not failures else f"FAIL: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
