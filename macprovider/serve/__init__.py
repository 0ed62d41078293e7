"""`macprovider serve`, the HTTP side (docs/api.md): OpenAI (chat, completions, Responses) and Anthropic
(Messages) routes over an engine that is handed in.

Layout (docs/architecture.md#layers):
    app.py             create_app: wires the routers, the error handlers (each API's envelope) and the
                       middleware (Host/Origin, CORS, key, body cap)
    context.py         AppContext, the one per-app object every router receives: ServerState (counters,
                       drain), the fleet, read_body, require_loaded, the generation driver, the recorder
    ops_api.py         /v1/health, /health, /metrics, /v1/models[/{id}], /v1/macprovider/load|unload
    core.py            the one request/stream core: Turn -> start -> Generation deltas; EventStream
    openai_api.py      /v1/chat/completions, /v1/completions: request -> Turn, deltas -> OpenAI chunks/bodies
    openai_schemas.py  OpenAI request models, response/chunk builders, the error envelope
    responses_api.py   /v1/responses (+ GET/DELETE by id): request -> Turn, typed events; the bounded store
    responses_schemas.py  Responses API request model, input items -> messages, Response/item builders
    anthropic_api.py   /v1/messages, /v1/messages/count_tokens: request -> Turn, Anthropic stream events
    anthropic_schemas.py  Messages API request model, blocks -> messages, Message/blocks, error envelope
    fleet.py           ServeFleet: which models exist and which are loaded (names, aliases, load on demand,
                       admission by memory, keep_alive unload); every route asks it for an engine
    runtime.py         ServeRuntime / run_server: uvicorn lifecycle, background load, watchdog, drain
    preflight.py       plan_serve: every check before a model loads -> engine.protocol.ServePlan
    workload.py        the content-free request-shape record (macprovider.core.request_shapes) autotune replays
    tool_calls.py      tool validation, the forced-call grammar, the streamed tool-markup splitter
    grammar.py         response_format -> llguidance grammar (400 for a bad one)
    embeddings_api.py  /v1/embeddings: request checks, the engine lookup (one function), the response body
Each `*_api.py` ends in `router(ctx) -> APIRouter` (Responses: `router(ctx, store)`), its routes over the
app's AppContext; nothing is module-global.
Imports: `runtime` -> `app` -> the `*_api` modules -> `context` -> `core`, `fleet` and `openai_schemas`;
each `*_api` -> its `*_schemas`; never the reverse (`responses_*`/`anthropic_*` reuse
`openai_api.check_model` and `openai_schemas`' request base). The engine is reached through
`engine.protocol` only; nothing
here imports MLX or the engine itself (`commands/serve.py` builds it), so the HTTP tests run on a fake engine.
Importers: `commands` only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from macprovider.engine.protocol import EngineProtocol, ServePlan
    from macprovider.serve.fleet import ServeFleet


def run_server(plan: ServePlan, engine: EngineProtocol | ServeFleet) -> int:
    """Serve `engine` (or a fleet) as planned until drained; see `macprovider.serve.runtime.run_server`."""
    from macprovider.serve.runtime import run_server as _run_server

    return _run_server(plan, engine)
