"""The admin API's OpenAPI 3.1 document, generated from the operation table and its models.

Schemas come from pydantic (`TypeAdapter(...).json_schema`, whose JSON Schema dialect is
OpenAPI 3.1's), so the document cannot drift from what the API validates and returns. Paths
are assembled here from `api.OPS`. Built once per process, on the first request for it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, TypeAdapter

from garrison import __version__
from garrison.admin import models as m
from garrison.auth.sessions import COOKIE

if TYPE_CHECKING:
    from garrison.admin.api import Op

REF = "#/components/schemas/{model}"
_PATTERNS = {"name": m.NAME, "key_id": m.KEY_ID, "serial": m.SERIAL, "session_id": m.SESSION_ID}
_ERRORS = {
    "400": "Unreadable body or query",
    "401": "No usable credential: sign in",
    "403": "Not allowed (address, role, scope, client certificate, cross-site or CSRF)",
    "404": "No such endpoint or object",
    "405": "Method not allowed here (see the Allow header)",
    "409": "Conflicts with the current state",
    "413": "Body too large",
    "415": "Body is not application/json",
    "422": "Invalid request (field paths in error.fields)",
}


class _Schemas:
    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def ref(self, tp: Any, mode: str = "serialization") -> dict[str, Any]:
        schema = TypeAdapter(tp).json_schema(ref_template=REF, mode=mode)  # type: ignore[arg-type]
        self.components.update(schema.pop("$defs", {}))
        name = getattr(tp, "__name__", None)
        if isinstance(tp, type) and name and schema.get("type") == "object":
            self.components[name] = schema
            return {"$ref": REF.format(model=name)}
        return schema


def _content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(mode="validation")
    return [
        {"name": name, "in": "query", "required": False, "schema": prop}
        for name, prop in schema.get("properties", {}).items()
    ]


def _path_parameters(path: str) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": _PATTERNS[name]},
        }
        for name in re.findall(r"\{(\w+)\}", path)
    ]


def _operation(op: Op, schemas: _Schemas, error: dict[str, Any]) -> dict[str, Any]:
    responses: dict[str, Any] = {
        str(op.status): {"description": "OK", "content": _content(schemas.ref(op.response))}
    }
    for status, text in _ERRORS.items():
        responses[status] = {"description": text, "content": _content(error)}
    operation: dict[str, Any] = {
        "summary": op.summary,
        "operationId": f"{op.method.lower()}{re.sub(r'[^A-Za-z0-9]+', '_', op.path)}".rstrip("_"),
        "responses": responses,
    }
    parameters = _path_parameters(op.path)
    if op.query is not None:
        parameters += _query_parameters(op.query)
    if parameters:
        operation["parameters"] = parameters
    if op.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": _content(schemas.ref(op.body, mode="validation")),
        }
    return operation


def document(ops: Iterable[Op], prefix: str) -> dict[str, Any]:
    """The whole document; paths are absolute (the server URL is the gateway's origin)."""
    schemas = _Schemas()
    error = schemas.ref(m.ErrorBody)
    paths: dict[str, dict[str, Any]] = {
        f"{prefix}/openapi.json": {
            "get": {
                "summary": "This document",
                "operationId": "get_openapi",
                "responses": {"200": {"description": "OpenAPI 3.1 document"}},
            }
        }
    }
    for op in ops:
        paths.setdefault(prefix + op.path, {})[op.method.lower()] = _operation(op, schemas, error)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Garrison admin API",
            "version": __version__,
            "description": (
                "Administer users, API keys, client certificates and sessions; search the "
                "audit log. Admins only (role admin; API keys and scoped tokens also need "
                "scope admin), from the addresses in [admin] allow. Cookie-authenticated "
                "unsafe calls need the same origin and the header X-Garrison-CSRF: 1."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": schemas.components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "session": {"type": "apiKey", "in": "cookie", "name": COOKIE},
            },
        },
        "security": [{"bearer": []}, {"apiKey": []}, {"session": []}],
    }
