"""The MLX side of `macprovider serve`: one generation thread that owns the model (docs/architecture.md#threads).

Layout:
    protocol.py     the HTTP <-> engine contract (EngineProtocol, GenerationRequest/Chunk, ServePlan); no MLX
    engine.py       Engine: the generation thread, mlx-lm's BatchGenerator, prefix cache, stats
    factory.py      load_engine / release_engine: what serve's fleet is handed to build and unload engines
    sequence.py     per-request output text (detokenizer, stop strings) and the handle the HTTP side iterates
    kvcache.py      BatchQuantizedKVCache: kv-bits that keep continuous batching; RowTrimMixin: per-row KV rollback
    speculative.py  prompt-lookup speculative decoding inside the batch (SpeculativeGenerationBatch)
    disk_cache.py   the prompt cache's disk tier: KV files that survive restarts (background writer, checks)
    weights_dtype.py  weights_dtype: dequantize / cast the loaded weights (float32 on MLX's CPU backend)
    cpu_kernels.py  cpu_kernels: attention softmax, SwiGLU and log-softmax through NumPy's vectorized exp on
                    MLX's CPU device (MLX's exp is scalar outside Apple silicon)
    constrained.py  GrammarProcessor (the llguidance logits processor) and its tokenizer cache
    distributed.py  several machines on mx.distributed: split checks, pipeline stages / tensor shard, the
                    per-step control exchange that keeps ranks in lockstep, the follower loop
    embedding.py    EmbeddingEngine: embedding models (the worker thread that owns MLX, dynamic batching);
                    decoder embedding models through mlx-lm's model classes
    bert.py         the BERT encoder in MLX and sentence-transformers' pooling / normalization
Imports: the shared core (`config`, `errors`) and MLX / mlx-lm only; the layers contract would allow `models`,
but nothing here uses it. Importers: `commands` (builds the Engine, hands `factory` to the fleet); `serve` may
import only `protocol`. Nothing imports MLX at
module level, so importing this package stays cheap.
"""
