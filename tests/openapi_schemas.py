"""OpenAI's published OpenAPI document (vendored as `tests/data/openai-openapi.json`; its source commit and
licence are in `tests/data/README.md`) as JSON Schema validators for the schema tier: every response body and
every stream chunk validates against its component schema (docs/api.md).

The document is OpenAPI 3.1 but still marks many fields with 3.0-style `nullable: true`, which JSON Schema
ignores; `_map_nullable` rewrites each such node to `anyOf: [node, {"type": "null"}]`.

    check(name, instance)    raise jsonschema.ValidationError unless `instance` is a valid `name`
                             (a component schema name such as "CreateChatCompletionResponse")
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

DOCUMENT = Path(__file__).resolve().parent / "data" / "openai-openapi.json"
BASE = "urn:openai-openapi"


def _map_nullable(node: Any) -> Any:
    if isinstance(node, list):
        return [_map_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    mapped = {key: _map_nullable(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [mapped, {"type": "null"}]}
    return mapped


@functools.lru_cache(maxsize=1)
def _registry() -> Registry:
    document = json.loads(DOCUMENT.read_text(encoding="utf-8"))
    contents = {"components": {"schemas": _map_nullable(document["components"]["schemas"])}}
    return Registry().with_resource(BASE, Resource.from_contents(contents, default_specification=DRAFT202012))


@functools.cache
def validator(name: str) -> Draft202012Validator:
    """A validator for the component schema `name` (KeyError-free: a missing name fails on first use)."""
    return Draft202012Validator({"$ref": f"{BASE}#/components/schemas/{name}"}, registry=_registry())


def check(name: str, instance: Any) -> None:
    """Raise the most relevant jsonschema.ValidationError unless `instance` validates as `name`."""
    error = best_match(validator(name).iter_errors(instance))
    if error is not None:
        raise error
