"""Fuzz the HTTP API with schemathesis: every operation of the app's own OpenAPI document, with the
real request models as request bodies, in positive and negative modes, against a running server on the fake
engine. Any 5xx, any error answer that is not JSON in the OpenAI error envelope, or a crash is a defect.

serve publishes no OpenAPI document (openapi_url=None keeps the public surface to the OpenAI routes), so the
document is built here from `create_app(...).openapi()`, with each completion route's `requestBody` taken
from its pydantic request model (the handlers parse the body themselves, so FastAPI cannot see it). Errors
are checked against each API's own envelope: OpenAI's, and Anthropic's under /v1/messages.
Examples per operation: `FUZZ_EXAMPLES` (default 40: ~30 s for the whole file on 2 cores).
"""

from __future__ import annotations

import json
import os

import pytest
import schemathesis
from fake_engine import FakeEngine, serving
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode

from macprovider.core.config import Settings
from macprovider.serve.anthropic_schemas import MessagesRequest
from macprovider.serve.app import create_app
from macprovider.serve.openai_schemas import ChatCompletionRequest, CompletionRequest
from macprovider.serve.responses_schemas import ResponsesRequest

REQUEST_MODELS = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/responses": ResponsesRequest,
    "/v1/messages": MessagesRequest,
    "/v1/messages/count_tokens": MessagesRequest,
}
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))


def openapi_document() -> dict:
    """The app's OpenAPI document plus the request bodies of the completion routes (see module docstring).

    Where a model field is `Any` (checked by hand in the handler) or must name the served model, the
    document says what a valid request holds — so positive cases reach the engine, and negative ones
    probe the hand-written checks."""
    engine = FakeEngine()
    doc = create_app(engine, Settings(model=engine.model_id), None).openapi()
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for path, model in REQUEST_MODELS.items():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        body["properties"]["model"] = {"type": "string", "enum": [engine.model_id]}
        if "n" in body["properties"]:
            body["properties"]["n"] = {"type": "integer", "enum": [1]}
        if path == "/v1/completions":
            body["properties"]["prompt"] = {"type": "string"}
        if path == "/v1/responses":
            body["properties"]["input"] = {"type": "string"}
            body["required"] = ["model", "input"]
        if path.startswith("/v1/messages"):
            body["properties"]["messages"] = {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["role", "content"],
                    "properties": {
                        "role": {"type": "string", "enum": ["user", "assistant"]},
                        "content": {"type": "string"},
                    },
                },
            }
            body["required"] = ["model", "messages", "max_tokens"]
        components[model.__name__] = body
        message = components.get("ChatMessage")
        if message is not None:
            message["properties"]["content"] = {"type": "string"}
            message["required"] = ["role", "content"]
        doc["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    return doc


schema = schemathesis.openapi.from_dict(openapi_document())
# No example database (it would be written into the checkout); derandomized, so a run is reproducible.
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=EXAMPLES, database="none"
)


@pytest.fixture(scope="module")
def server():
    # Short scripted answers; a context small enough that generated prompts also hit 413.
    engine = FakeEngine(max_context=64, queue_limit=1000)
    with serving(engine) as served:
        yield served


def test_the_document_carries_the_real_request_models():
    doc = openapi_document()
    chat = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert "messages" in doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert "/v1/health" in doc["paths"] and "/v1/models" in doc["paths"]
    for path in ("/v1/responses", "/v1/messages", "/v1/messages/count_tokens"):  # the hostile tier covers every API
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"].rsplit("/", 1)[1] in doc["components"]["schemas"]


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
def test_no_5xx_and_every_error_is_the_json_envelope(case, server):
    response = case.call(base_url=server.base, timeout=30)
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        content_type = (response.headers.get("content-type") or [""])[0]  # schemathesis: name -> [values]
        assert content_type.startswith("application/json"), response.text[:200]
        body = json.loads(response.text)
        error = body["error"]
        assert isinstance(error["message"], str) and error["message"]
        if case.path.startswith(
            "/v1/messages"
        ):  # Anthropic's envelope: {"type": "error", "error": {"type", "message"}}
            assert body["type"] == "error" and isinstance(error["type"], str) and set(error) == {"type", "message"}
        else:
            assert isinstance(error["type"], str) and isinstance(error["code"], str)
