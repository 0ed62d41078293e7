"""Build and release engines for the fleet (`serve.fleet`): the one place that turns a model's `ServePlan`
into a loaded engine and gives its memory back.

    load_engine(plan, kind="chat") -> Engine     built, loaded and self-tested (blocking; any thread)
    release_engine(engine)                       stop its generation thread and return its memory

The fleet is handed these two callables, so it never imports MLX and another kind of engine (an embedding
model) plugs in by its `kind`. Unloading in-process gives the memory back because nothing outlives the
engine: the generation thread owns the model, `close()` ends that thread, and once the last reference is
dropped MLX frees the arrays; `mx.clear_cache()` then hands MLX's buffer cache back to the allocator
(docs/architecture.md, "Several models", has the measurements).
"""

from __future__ import annotations

import gc
from typing import Any

from macprovider.core.errors import ModelError
from macprovider.engine.protocol import ServePlan

ENGINE_KINDS = ("chat", "embedding")


def load_engine(plan: ServePlan, kind: str = "chat") -> Any:
    """A loaded engine for `plan` (blocks while the weights load and the one-token self-test runs).

    kind: the model's kind (`models.embedding.model_kind`): `chat` builds engine.engine.Engine, `embedding`
    engine.embedding.EmbeddingEngine. Raises ModelError when loading fails (the half-built engine is released
    first) or the kind is unknown."""
    if kind not in ENGINE_KINDS:
        raise ModelError(f"model {plan.model_id}: no engine for kind {kind!r} (known: {', '.join(ENGINE_KINDS)})")
    engine: Any
    if kind == "embedding":
        from macprovider.engine.embedding import EmbeddingEngine

        engine = EmbeddingEngine(plan)
    else:
        from macprovider.engine.engine import Engine

        engine = Engine(plan)
    try:
        engine.load()
    except BaseException:
        release_engine(engine)
        raise
    return engine


def release_engine(engine: Any) -> None:
    """Stop `engine`'s generation thread and give its memory back: close it, drop what it holds, collect, and
    empty MLX's buffer cache. The caller must drop its own references to `engine` too."""
    close = getattr(engine, "close", None)
    if close is not None:
        close()
    # The engine object may still be referenced for a moment (a finished request's handle, a log record):
    # its model, batch generator, prompt cache and tokenizer must not keep the weights alive meanwhile.
    for name in ("_batch", "_prompt_cache", "_make_cache", "_grammar_tokenizers", "_samplers", "tokenizer"):
        if hasattr(engine, name):
            setattr(engine, name, None)
    gc.collect()
    try:
        import mlx.core as mx

        mx.clear_cache()
    except ImportError:  # a fake engine in tests: nothing of MLX's to give back
        pass
