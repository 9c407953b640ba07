"""The API's names for an output constraint -> one StructuredOutputs, checked (HTTP 400 naming the field).

OpenAI's `response_format` (json_object, json_schema), vLLM's `structured_outputs {json|regex|choice|grammar}`
and its older `guided_json | guided_regex | guided_choice | guided_grammar`. At most one may be given.
"""
from __future__ import annotations

from kvloom.errors import InvalidRequestError
from kvloom.structured.backend import validate
from kvloom.structured.spec import StructuredOutputs

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def constraint_from_request(req) -> StructuredOutputs | None:
    """The request's constraint, validated by the grammar library (so the engine never sees a bad one)."""
    found: list[tuple[str, dict]] = []   # (the field the client used, StructuredOutputs fields)
    rf = req.response_format
    if rf is not None:
        kind = rf.get("type", "text") if isinstance(rf, dict) else None
        if kind == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
                raise InvalidRequestError("response_format.json_schema must be an object with a `schema` object",
                                          field="response_format.json_schema")
            # OpenAI allows leaving the schema out: then any JSON object
            found.append(("response_format.json_schema.schema",
                          {"json": js["schema"]} if "schema" in js else {"json_object": True}))
        elif kind != "text":
            raise InvalidRequestError(f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                                      field="response_format.type")
    if req.structured_outputs is not None:
        so = req.structured_outputs
        given = {k: v for k, v in so.items() if k in ("json", "json_object", "regex", "choice", "grammar")
                 and v is not None} if isinstance(so, dict) else None
        kind = next(iter(given), None) if given else None
        found.append((f"structured_outputs.{kind}" if kind and len(given) == 1 else "structured_outputs", so))
    for name, kind in _GUIDED.items():
        v = getattr(req, name)
        if v is not None:
            found.append((name, {kind: v}))
    if not found:
        return None
    if len(found) > 1:
        raise InvalidRequestError(f"give at most one output constraint; got {', '.join(f for f, _ in found)}",
                                  field=found[1][0].split(".")[0])
    field, fields = found[0]
    try:
        spec = StructuredOutputs.coerce(fields)
        validate(spec)
    except InvalidRequestError as e:
        raise InvalidRequestError(str(e).replace(f"structured_outputs.{_kind(fields)}", field),
                                  field=field if e.field != "structured_outputs" else "structured_outputs") from e
    return spec


def _kind(fields) -> str:
    return next(iter(fields), "") if isinstance(fields, dict) else ""
