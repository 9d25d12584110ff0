"""The JSON schemas benchmarks/lab/bench_grammar.py walks, each with a valid instance."""

from __future__ import annotations

import json

# Schemas, each with a valid instance (keys in schema order: both engines emit properties in the
# order the schema lists them). Objects say additionalProperties: false, as OpenAI strict mode
# does (outlines-core never allows extra keys; llguidance would by default).


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
    }


_STR = lambda n: {"type": "string", "maxLength": n}  # noqa: E731 - a one-line local helper

SCHEMAS: dict[str, tuple[dict, object]] = {
    "person": (
        _obj(
            {
                "name": _STR(40),
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "email": _STR(80),
                "is_member": {"type": "boolean"},
            },
            ["name", "age", "is_member"],
        ),
        {"name": "Ana López", "age": 34, "is_member": True},
    ),
    "tool_call": (  # a forced tool call: {"name": const, "arguments": {...}}
        _obj(
            {
                "name": {"const": "get_weather"},
                "arguments": _obj(
                    {
                        "location": _STR(64),
                        "unit": {"enum": ["celsius", "fahrenheit"]},
                        "days": {"type": "integer", "minimum": 1, "maximum": 14},
                    },
                    ["location", "unit"],
                ),
            }
        ),
        {"name": "get_weather", "arguments": {"location": "Zürich, Switzerland", "unit": "celsius", "days": 3}},
    ),
    "nested_user": (
        _obj(
            {
                "user": _obj(
                    {
                        "id": {"type": "integer"},
                        "name": _STR(50),
                        "address": _obj(
                            {
                                "street": _STR(80),
                                "city": _STR(40),
                                "country": {"enum": ["FR", "DE", "ES", "IT", "US", "JP"]},
                                "zip": _STR(10),
                            },
                            ["street", "city", "country"],
                        ),
                    }
                ),
                "tags": {"type": "array", "items": _STR(20), "minItems": 1, "maxItems": 5},
            }
        ),
        {
            "user": {
                "id": 90210,
                "name": "Jean Dupont",
                "address": {"street": "12 rue de la Paix", "city": "Paris", "country": "FR", "zip": "75002"},
            },
            "tags": ["vip", "newsletter"],
        },
    ),
    "order": (
        _obj(
            {
                "order_id": _STR(20),
                "items": {
                    "type": "array",
                    "items": _obj(
                        {
                            "sku": _STR(16),
                            "qty": {"type": "integer", "minimum": 1},
                            "price": {"type": "number"},
                        }
                    ),
                    "minItems": 1,
                    "maxItems": 10,
                },
                "currency": {"enum": ["USD", "EUR", "GBP", "JPY"]},
                "express": {"type": "boolean"},
            },
            ["order_id", "items", "currency"],
        ),
        {
            "order_id": "A-1042",
            "items": [
                {"sku": "TEA-GRN-100", "qty": 2, "price": 4.5},
                {"sku": "MUG-BLU", "qty": 1, "price": 12.99},
                {"sku": "SPOON-07", "qty": 6, "price": 0.75},
            ],
            "currency": "EUR",
            "express": False,
        },
    ),
    "anyof_result": (
        _obj(
            {
                "result": {
                    "anyOf": [
                        _obj({"status": {"const": "ok"}, "value": {"type": "number"}}),
                        _obj(
                            {
                                "status": {"const": "error"},
                                "code": {"type": "integer"},
                                "message": _STR(100),
                            }
                        ),
                    ]
                }
            }
        ),
        {"result": {"status": "error", "code": 404, "message": "The requested item was not found."}},
    ),
    "event": (
        _obj(
            {
                "title": _STR(60),
                "start": {"type": "string", "format": "date-time"},
                "day": {"type": "string", "format": "date"},
                "organizer": {"type": "string", "format": "email"},
                "online": {"type": "boolean"},
            },
            ["title", "start", "online"],
        ),
        {"title": "Quarterly review", "start": "2025-03-14T09:30:00Z", "online": True},
    ),
    "deep_config": (
        _obj(
            {
                "service": _obj(
                    {
                        "name": _STR(30),
                        "http": _obj(
                            {
                                "host": _STR(60),
                                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                                "tls": _obj({"enabled": {"type": "boolean"}, "min_version": {"enum": ["1.2", "1.3"]}}),
                            }
                        ),
                        "db": _obj(
                            {
                                "url": _STR(100),
                                "pool": _obj({"min": {"type": "integer"}, "max": {"type": "integer"}}),
                            }
                        ),
                    }
                )
            }
        ),
        {
            "service": {
                "name": "orchard-api",
                "http": {"host": "api.example.com", "port": 8443, "tls": {"enabled": True, "min_version": "1.3"}},
                "db": {"url": "postgres://db.internal:5432/orchard", "pool": {"min": 2, "max": 16}},
            }
        },
    ),
    "classification": (
        _obj(
            {
                "label": {
                    "enum": ["billing", "bug", "feature_request", "account", "security", "praise", "spam", "other"]
                },
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                "reasons": {"type": "array", "items": _STR(80), "maxItems": 3},
            }
        ),
        {
            "label": "bug",
            "confidence": 0.87,
            "reasons": ["mentions a crash on startup", "includes a stack trace"],
        },
    ),
    "optional_fields": (  # eight optional properties, three present
        _obj(
            {
                "nickname": _STR(30),
                "height_cm": {"type": "number"},
                "vegetarian": {"type": "boolean"},
                "shoe_size": {"type": "integer"},
                "language": {"enum": ["en", "fr", "de", "es"]},
                "bio": _STR(200),
                "pets": {"type": "array", "items": _STR(20), "maxItems": 4},
                "newsletter": {"type": "boolean"},
            },
            [],
        ),
        {"height_cm": 172.5, "language": "fr", "pets": ["cat"]},
    ),
    "mixed_arrays": (
        _obj(
            {
                "values": {
                    "type": "array",
                    "items": {"anyOf": [{"type": "integer"}, _STR(20), {"type": "boolean"}, {"type": "null"}]},
                    "maxItems": 12,
                },
                "matrix": {
                    "type": "array",
                    "items": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 4},
                    "minItems": 1,
                    "maxItems": 4,
                },
                "ids": {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 3},
            }
        ),
        {
            "values": [1, "two", True, None, 5],
            "matrix": [[1.5, 2.0], [-3.25, 4.0, 0.5]],
            "ids": [7, 8, 9],
        },
    ),
    "json_object": (  # response_format {"type": "json_object"}: any JSON object
        {"type": "object"},
        {"title": "Report", "count": 3, "ok": True, "tags": ["a", "b"], "meta": {"owner": None, "score": 0.75}},
    ),
}


def instance_text(instance) -> str:
    return json.dumps(instance, ensure_ascii=False)


def check_instances() -> None:
    import jsonschema

    for schema, inst in SCHEMAS.values():
        jsonschema.validate(inst, schema, format_checker=jsonschema.FormatChecker())
