"""Strict request models, and the one way a validation problem becomes a message naming its field.

Request bodies are parsed strictly (types are not coerced; unknown fields are refused); the first
problem becomes a 400 whose `param` is the field's dotted path (`messages.0.content.1.input`). A
field an API knows but this server does not implement is refused by name
(`code: unsupported_parameter`), never silently ignored. The config schema formats its problems
with the same pieces (`problem_message`, one line per field).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ApiError


class Strict(BaseModel):
    """The base of every request model: unknown fields refused, no type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True)


def problem_message(err: dict[str, Any]) -> str:
    """Pydantic's message without the "Value error, " its validators' ValueErrors get."""
    return err["msg"].removeprefix("Value error, ")


def problem_param(loc: Sequence[Any], keep: Callable[[Sequence[Any], int], bool] | None = None) -> str | None:
    """The dotted path of a problem's location; `keep(loc, i)` drops the parts that are not
    fields (pydantic's union and discriminator tags)."""
    return ".".join(str(p) for i, p in enumerate(loc) if keep is None or keep(loc, i)) or None


_BRANCH_TAGS = {"str", "int", "float", "bool", "none", "null"}
_NAMED = re.compile(r"^([a-z_]+(?:\.[a-z_0-9]+)*): ")  # "field: ..." from a check across fields


def request_error(
    exc: ValidationError,
    *,
    keep: Callable[[Sequence[Any], int], bool] | None = None,
    unsupported: Callable[[str | None, dict[str, Any]], bool] = lambda param, err: False,
    unknown_field: str | None = None,
) -> ApiError:
    """The first problem of a request body as a 400 naming its field. `unsupported(param, err)`:
    the field is one this server refuses by name; `unknown_field`: the message for any other
    extra field (None: pydantic's)."""
    errors = exc.errors()
    # a union's plain branch failing (`content.str` when the list branch is the one meant) is not
    # the problem when another branch says what is
    specific = [e for e in errors if not (e["loc"] and str(e["loc"][-1]) in _BRANCH_TAGS)]
    err = (specific or errors or [{"type": "", "loc": (), "msg": "invalid request"}])[0]
    param = problem_param(err["loc"], keep)
    if err["type"] == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {err['ctx'].get('error', err['msg'])}")
    if err["type"] == "model_type" and not param:
        return ApiError(400, "the request body must be a JSON object")
    if unsupported(param, err):
        return ApiError(
            400,
            f"{param}: not supported by this server; remove it from the request",
            param=param,
            code="unsupported_parameter",
        )
    if err["type"] == "extra_forbidden" and unknown_field is not None:
        return ApiError(400, f"{param}: {unknown_field}", param=param)
    msg = problem_message(err)
    if not param and (named := _NAMED.match(msg)):
        return ApiError(400, msg, param=named.group(1))
    return ApiError(400, f"{param}: {msg}" if param else msg, param=param)


def parse_body(body: bytes, model_cls: type[BaseModel], error: Callable[[ValidationError], ApiError]) -> Any:
    """`model_cls` from a JSON body; its first problem raised as `error(exc)` says."""
    try:
        return model_cls.model_validate_json(body)
    except ValidationError as exc:
        raise error(exc) from None


def typed_items(
    v: Any,
    allowed: tuple[str, ...],
    unsupported: set[str],
    label: str,
    noun: str | None = None,
    default: str | None = None,
) -> Any:
    """A list whose every element needs a `type` we implement (a content block, an input part):
    one the API has and we do not run is refused by name, any other unknown one with what we
    take. `label` names an element in the error ("block 2"), `noun` its kind ("content block");
    `default` is the type of an element that has none. Anything but a list is left to the model."""
    if not isinstance(v, list):
        return v
    noun = noun or label
    out = []
    for i, item in enumerate(v):
        if isinstance(item, dict) and "type" not in item and default is not None:
            item = {**item, "type": default}
        kind = item.get("type") if isinstance(item, dict) else None
        if not isinstance(kind, str):
            raise ValueError(f'{label} {i} must be an object with a "type"')
        if kind in unsupported:
            raise ValueError(f"{label} {i}: {kind!r} {noun}s are not supported by this server")
        if kind not in allowed:
            raise ValueError(f"{label} {i}: unknown {noun} type {kind!r} (expected one of {', '.join(allowed)})")
        out.append(item)
    return out
