"""The real MLX engine behind the real HTTP app, in this process: ServeRuntime on 127.0.0.1, port 0."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from macprovider.core import config as cfg
from macprovider.core.config import Settings
from macprovider.engine.engine import Engine
from macprovider.serve.preflight import plan_serve
from macprovider.serve.runtime import ServeRuntime


@contextlib.contextmanager
def serving_engine(model: str, **settings: Any) -> Iterator[tuple[str, Engine]]:
    """(base URL, engine) of `model` served with `settings` (setting names as in config.resolve) until the
    block ends; then the server shuts down and the engine is closed (a generation thread alive at interpreter
    exit makes MLX's runtime abort the test process)."""
    engine = Engine(plan_serve(cfg.resolve({"model": model, **settings})))
    engine.load()
    runtime = ServeRuntime(
        engine, Settings(model=engine.model_id, host="127.0.0.1", port=0, drain_timeout_s=5.0), None, load=False
    )
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    assert runtime.started.wait(15), "server did not start"
    try:
        yield runtime.url, engine
    finally:
        runtime.request_shutdown("test teardown")
        thread.join(15)
        engine.close()
