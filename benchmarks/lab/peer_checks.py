"""Reliability checks against any OpenAI-compatible server, by base URL: ours or a peer's.

    python -m benchmarks.lab.peer_checks --label ours --base-url http://127.0.0.1:8000 \
        --model smollm2-135m-instruct --out /tmp/ours.json
    python -m benchmarks.lab.peer_checks --merge /tmp/ours.json /tmp/mlx_lm.json --out docs/results/peer_checks_cpu.json

Checks (each: pass/fail plus what was observed; progress on stderr, JSON and a markdown table on stdout):

1. hostile  - the hostile bodies of tests/e2e/test_serve_e2e.py (benchmarks/hostile_bodies.py) to
              /v1/chat/completions. Pass: every one a 4xx with {"error": {"message": ...}}, no 5xx,
              no hang (30 s each), and the server answers a normal request afterwards.
2. features - tools (with a forced tool_choice), logprobs, n=2, response_format json_schema. Pass per
              feature: refused with a 4xx naming the field, or truly honoured. Fail: a 200 that
              silently ignores it (no tool_calls, no logprobs, one choice, output not matching the schema).
3. aborts   - 100 concurrent streams (max_tokens 16, temperature 0), 10 closed after their first
              chunk. Pass: every other one gets exactly max_tokens completion tokens (usage when the
              server sends it, else content chunks) and the server answers afterwards.
4. load     - 200 concurrent streaming clients (max_tokens 8), 20 leaving at random points. Pass: no
              error but a clean 429/503 with Retry-After, and the server answers afterwards.

`--ignore-eos auto` (the default) sends `ignore_eos: true` in checks 3-4 when a probe request with it
is accepted. The prompts ask for long answers so that a server which ignores the field still runs
to max_tokens. No prompt or output text is printed or stored, only status codes, counts and the
first characters of error messages.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import re
import sys
import time
from collections import Counter

import httpx

from tests.e2e.hostile_bodies import hostile_bodies

LONG_PROMPT = "Write a long, detailed essay about the history of the Roman Empire, from its founding to its fall."
HEALTH_MSG = [{"role": "user", "content": "Say hello."}]
FEATURES = ("tools", "logprobs", "n", "response_format")


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def short(text: str, n: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n] + "..."


async def answers(c: httpx.AsyncClient, model: str, timeout_s: float = 120) -> dict:
    """A normal chat request after a check: does the server still answer?"""
    t0 = time.monotonic()
    try:
        r = await asyncio.wait_for(
            c.post(
                "/v1/chat/completions", json={"model": model, "messages": HEALTH_MSG, "max_tokens": 4, "temperature": 0}
            ),
            timeout_s,
        )
        ok = r.status_code == 200 and bool(r.json()["choices"][0]["message"].get("content"))
        return {"ok": ok, "status": r.status_code, "s": round(time.monotonic() - t0, 2)}
    except Exception as e:  # noqa: BLE001 - anything here is the observation
        return {"ok": False, "error": f"{type(e).__name__}: {short(e)}", "s": round(time.monotonic() - t0, 2)}


def error_shape(r: httpx.Response) -> tuple[bool, str]:
    try:
        body = r.json()
    except Exception:  # noqa: BLE001 - any failure is reported, not raised
        return False, "not JSON: " + short(r.text, 80)
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str) and err["message"]:
        return True, short(err["message"])
    return False, "body: " + short(json.dumps(body), 80)


# --- 1. hostile bodies ---------------------------------------------------------------------------


async def check_hostile(c: httpx.AsyncClient, model: str) -> dict:
    cases, stalled = {}, False
    for name, raw in hostile_bodies(model).items():
        if stalled:
            cases[name] = {"pass": False, "status": None, "observed": "not sent: the server stopped answering"}
            continue
        t0 = time.monotonic()
        try:
            r = await asyncio.wait_for(
                c.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"}), 30
            )
            shaped, what = error_shape(r) if r.status_code >= 400 else (False, "200 answered")
            ok = 400 <= r.status_code < 500 and shaped
            cases[name] = {"pass": ok, "status": r.status_code, "openai_error_shape": shaped, "observed": what}
        except TimeoutError:
            cases[name] = {"pass": False, "status": None, "observed": "no answer in 30 s"}
        except Exception as e:  # noqa: BLE001 - any failure is reported, not raised
            cases[name] = {"pass": False, "status": None, "observed": f"{type(e).__name__}: {short(e)}"}
        cases[name]["s"] = round(time.monotonic() - t0, 2)
        if cases[name]["status"] is None:  # a hang or a dropped connection: wait for the server to answer again
            rec = await answers(c, model, timeout_s=60)
            cases[name]["answers_after"] = rec
            stalled = not rec["ok"]
        log(f"  hostile {name!r}: {cases[name]['status']} {'ok' if cases[name]['pass'] else 'FAIL'}")
    after = await answers(c, model)
    failed = [n for n, v in cases.items() if not v["pass"]]
    statuses = Counter(str(v["status"]) for v in cases.values())
    summary = (
        f"{len(cases) - len(failed)}/{len(cases)} refused 4xx in the OpenAI shape"
        + ("; failed: " + ", ".join(f"{n} ({cases[n]['status']})" for n in failed) if failed else "")
        + ("" if after["ok"] else "; NOT answering afterwards")
    )
    return {
        "pass": not failed and after["ok"],
        "summary": summary,
        "statuses": dict(statuses),
        "cases": cases,
        "answers_after": after,
    }


# --- 2. unsupported features ---------------------------------------------------------------------


def _feature_request(feature: str, model: str) -> dict:
    base = {"model": model, "max_tokens": 48, "temperature": 0}
    if feature == "tools":
        return {
            **base,
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "description": "Current weather for a city",
                        "parameters": {
                            "type": "object",
                            "properties": {"city": {"type": "string"}},
                            "required": ["city"],
                        },
                    },
                }
            ],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        }
    if feature == "logprobs":
        return {**base, "messages": HEALTH_MSG, "logprobs": True, "max_tokens": 4}
    if feature == "n":
        return {**base, "messages": HEALTH_MSG, "n": 2, "max_tokens": 4, "temperature": 0.8}
    if feature == "response_format":
        schema = {
            "type": "object",
            "properties": {"answer": {"type": "string"}},
            "required": ["answer"],
            "additionalProperties": False,
        }
        return {
            **base,
            "messages": HEALTH_MSG,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "reply", "schema": schema, "strict": True},
            },
        }
    raise ValueError(feature)


def _honoured(feature: str, body: dict) -> tuple[bool, str]:
    choices = body.get("choices") or []
    if feature == "n":
        return len(choices) == 2, f"{len(choices)} choice(s)"
    if not choices:
        return False, "no choices"
    ch = choices[0]
    msg = ch.get("message") or {}
    if feature == "tools":
        calls = msg.get("tool_calls") or []
        names = [(tc.get("function") or {}).get("name") for tc in calls]
        return "get_weather" in names, f"tool_calls: {names or 'none'}; finish_reason {ch.get('finish_reason')}"
    if feature == "logprobs":
        lp = ch.get("logprobs")
        content = (lp or {}).get("content") if isinstance(lp, dict) else None
        return bool(content), f"logprobs: {f'{len(content)} entries' if content else short(json.dumps(lp), 40)}"
    if feature == "response_format":
        try:
            parsed = json.loads(msg.get("content") or "")
        except ValueError:
            return False, "content is not JSON"
        ok = isinstance(parsed, dict) and set(parsed) == {"answer"} and isinstance(parsed["answer"], str)
        return ok, "content is JSON " + ("matching the schema" if ok else "not matching the schema")
    raise ValueError(feature)


async def check_features(c: httpx.AsyncClient, model: str) -> dict:
    out = {}
    for feature in FEATURES:
        field = "tool" if feature == "tools" else feature
        try:
            r = await asyncio.wait_for(c.post("/v1/chat/completions", json=_feature_request(feature, model)), 120)
        except Exception as e:  # noqa: BLE001 - any failure is reported, not raised
            out[feature] = {"pass": False, "verdict": "no answer", "observed": f"{type(e).__name__}: {short(e)}"}
            continue
        if 400 <= r.status_code < 500:
            shaped, what = error_shape(r)
            param = (r.json().get("error") or {}).get("param") if shaped else None
            pattern = r"\bn\b" if feature == "n" else field
            named = bool(re.search(pattern, what)) or (isinstance(param, str) and field in param)
            out[feature] = {
                "pass": named,
                "verdict": "refused" if named else "refused without naming the field",
                "status": r.status_code,
                "observed": what,
            }
        elif r.status_code == 200:
            ok, what = _honoured(feature, r.json())
            out[feature] = {
                "pass": ok,
                "verdict": "honoured" if ok else "silently ignored",
                "status": 200,
                "observed": what,
            }
        else:
            out[feature] = {
                "pass": False,
                "verdict": f"{r.status_code}",
                "status": r.status_code,
                "observed": short(r.text, 100),
            }
        log(f"  feature {feature}: {out[feature]['verdict']} ({out[feature].get('status')})")
    after = await answers(c, model)
    summary = "; ".join(f"{f}: {v['verdict']}" for f, v in out.items())
    return {
        "pass": all(v["pass"] for v in out.values()) and after["ok"],
        "summary": summary,
        "features": out,
        "answers_after": after,
    }


# --- streaming helpers ---------------------------------------------------------------------------


async def _stream(c: httpx.AsyncClient, body: dict, leave_after: int | None) -> dict:
    """One streamed chat completion. leave_after: close after that many data chunks (0 = right after headers)."""
    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {
                "outcome": "refused",
                "status": r.status_code,
                "retry_after": r.headers.get("retry-after"),
                "observed": short(r.text, 100),
            }
        if leave_after == 0:
            return {"outcome": "left", "status": 200}
        chunks = content_chunks = 0
        usage, finish, errors, done = None, None, [], False
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunks += 1
            try:
                event = json.loads(data)
            except ValueError:
                errors.append("unparsable event")
                continue
            if "error" in event:
                errors.append(short(json.dumps(event["error"]), 100))
            for ch in event.get("choices") or []:
                if (ch.get("delta") or {}).get("content"):
                    content_chunks += 1
                finish = ch.get("finish_reason") or finish
            if event.get("usage"):
                usage = event["usage"]
            if leave_after is not None and chunks >= leave_after:
                return {"outcome": "left", "status": 200}
        tokens = usage.get("completion_tokens") if usage else None
        return {
            "outcome": "error" if errors else "ok",
            "status": 200,
            "errors": errors,
            "done": done,
            "finish": finish,
            "content_chunks": content_chunks,
            "usage_tokens": tokens,
            "tokens": tokens if tokens is not None else content_chunks,
            "counted_by": "usage" if tokens is not None else "content chunks",
        }


async def _guarded(coro, timeout_s: float) -> dict:
    try:
        return await asyncio.wait_for(coro, timeout_s)
    except TimeoutError:
        return {"outcome": "timeout"}
    except Exception as e:  # noqa: BLE001 - any failure is reported, not raised
        return {"outcome": "transport error", "observed": f"{type(e).__name__}: {short(e, 80)}"}


async def probe_ignore_eos(c: httpx.AsyncClient, model: str) -> bool:
    r = await c.post(
        "/v1/chat/completions", json={"model": model, "messages": HEALTH_MSG, "max_tokens": 2, "ignore_eos": True}
    )
    return r.status_code == 200


# --- 3. aborts -----------------------------------------------------------------------------------


async def check_aborts(
    c: httpx.AsyncClient, model: str, ignore_eos: bool, n: int = 100, leave: int = 10, max_tokens: int = 16
) -> dict:
    extra = {"ignore_eos": True} if ignore_eos else {}

    def body(i: int) -> dict:
        return {
            "model": model,
            "messages": [{"role": "user", "content": f"{LONG_PROMPT} (Part {i}.)"}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **extra,
        }

    leavers = set(range(0, n, n // leave))
    t0 = time.monotonic()
    results = await asyncio.gather(*(_guarded(_stream(c, body(i), 1 if i in leavers else None), 600) for i in range(n)))
    wall = time.monotonic() - t0
    kept = [r for i, r in enumerate(results) if i not in leavers]
    exact = [r for r in kept if r.get("outcome") == "ok" and r.get("tokens") == max_tokens]
    left = sum(r.get("outcome") == "left" for i, r in enumerate(results) if i in leavers)
    token_counts = Counter(str(r.get("tokens")) for r in kept if r.get("outcome") == "ok")
    outcomes = Counter(
        f"{r.get('outcome')}" + (f" {r.get('status')}" if r.get("outcome") == "refused" else "") for r in kept
    )
    counted_by = sorted({r["counted_by"] for r in kept if "counted_by" in r})
    after = await answers(c, model)
    problems = [f"{k}: {v}" for k, v in outcomes.items() if k != "ok"]
    if len(exact) < len(kept):
        problems.append(f"tokens per request {dict(token_counts)}")
    summary = (
        f"{len(exact)}/{len(kept)} got exactly {max_tokens} tokens ({'/'.join(counted_by) or '-'}), "
        f"{left}/{len(leavers)} left; {wall:.0f} s"
        + (f"; {'; '.join(problems)}" if problems else "")
        + ("" if after["ok"] else "; NOT answering afterwards")
    )
    samples = [r for r in kept if r.get("outcome") != "ok"][:3]
    log(f"  aborts: {summary}")
    return {
        "pass": len(exact) == len(kept) and after["ok"],
        "summary": summary,
        "wall_s": round(wall, 1),
        "ignore_eos_sent": ignore_eos,
        "outcomes": dict(outcomes),
        "tokens": dict(token_counts),
        "finish_reasons": dict(Counter(str(r.get("finish")) for r in kept if r.get("outcome") == "ok")),
        "samples_not_ok": samples,
        "answers_after": after,
    }


# --- 4. load -------------------------------------------------------------------------------------


async def check_load(
    c: httpx.AsyncClient,
    model: str,
    ignore_eos: bool,
    n: int = 200,
    leave: int = 20,
    max_tokens: int = 8,
    seed: int = 7,
) -> dict:
    rng = random.Random(seed)
    leave_after = {i: rng.randint(0, 4) for i in rng.sample(range(n), leave)}  # data chunks before leaving
    extra = {"ignore_eos": True} if ignore_eos else {}

    def body(i: int) -> dict:
        return {
            "model": model,
            "messages": [{"role": "user", "content": f"Tell me about the number {i}."}],
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "stream": True,
            **extra,
        }

    t0 = time.monotonic()
    results = await asyncio.gather(*(_guarded(_stream(c, body(i), leave_after.get(i)), 600) for i in range(n)))
    wall = time.monotonic() - t0
    outcomes = Counter()
    bad = []
    for r in results:
        o = r.get("outcome")
        if o == "refused":
            clean = r.get("status") in (429, 503) and str(r.get("retry_after") or "").strip().isdigit()
            key = f"refused {r.get('status')}" + ("" if clean else " (not clean)")
            if not clean:
                bad.append(r)
        else:
            key = o
            if o not in ("ok", "left"):
                bad.append(r)
        outcomes[key] += 1
    after = await answers(c, model)
    summary = (
        ", ".join(f"{v} {k}" for k, v in sorted(outcomes.items()))
        + f"; {wall:.0f} s"
        + ("" if after["ok"] else "; NOT answering afterwards")
    )
    log(f"  load: {summary}")
    return {
        "pass": not bad and after["ok"],
        "summary": summary,
        "wall_s": round(wall, 1),
        "outcomes": dict(outcomes),
        "samples_bad": bad[:3],
        "answers_after": after,
    }


# --- driver --------------------------------------------------------------------------------------

CHECKS = ("hostile", "features", "aborts", "load")


async def run(args) -> dict:
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=50)
    async with httpx.AsyncClient(
        base_url=args.base_url.rstrip("/"),
        timeout=httpx.Timeout(600, connect=60),
        limits=limits,
        headers={"authorization": "Bearer none"},
    ) as c:
        try:
            listed = [m.get("id") for m in (await c.get("/v1/models")).json().get("data", [])]
        except Exception as e:  # noqa: BLE001 - any failure is reported, not raised
            listed = [f"GET /v1/models failed: {type(e).__name__}"]
        ignore_eos = args.ignore_eos == "on" or (args.ignore_eos == "auto" and await probe_ignore_eos(c, args.model))
        report = {
            "label": args.label,
            "base_url": args.base_url,
            "model": args.model,
            "models_listed": listed,
            "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "ignore_eos_accepted": ignore_eos,
            "checks": {},
        }
        for name in args.checks:
            log(f"[{args.label}] check {name} ...")
            t0 = time.monotonic()
            fn = {
                "hostile": lambda: check_hostile(c, args.model),
                "features": lambda: check_features(c, args.model),
                "aborts": lambda: check_aborts(c, args.model, ignore_eos),
                "load": lambda: check_load(c, args.model, ignore_eos),
            }[name]
            report["checks"][name] = await fn()
            log(
                f"[{args.label}] {name}: {'pass' if report['checks'][name]['pass'] else 'FAIL'} "
                f"({time.monotonic() - t0:.0f} s)"
            )
            if args.out:  # after every check, so a run cut short keeps what it measured
                with open(args.out, "w") as f:
                    json.dump(report, f, indent=1)
        return report


def markdown(reports: list[dict]) -> str:
    names = [n for n in CHECKS if any(n in r["checks"] for r in reports)]
    lines = ["| check | " + " | ".join(r["label"] for r in reports) + " |", "|---|" + "---|" * len(reports)]
    for n in names:
        cells = []
        for r in reports:
            ch = r["checks"].get(n)
            cells.append("—" if ch is None else f"**{'pass' if ch['pass'] else 'FAIL'}**: {ch['summary']}")
        lines.append(f"| {n} | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", help="e.g. http://127.0.0.1:8000 (without /v1)")
    p.add_argument("--model", help="model name to send")
    p.add_argument("--label", default="server")
    p.add_argument("--checks", default=",".join(CHECKS), help="comma-separated subset of " + ",".join(CHECKS))
    p.add_argument("--ignore-eos", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--out", help="write the JSON here")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="combine earlier runs into one report")
    args = p.parse_args(argv)
    if args.merge:
        reports = []
        for path in args.merge:
            data = json.load(open(path))
            reports.extend(data.get("servers", [data]))
    else:
        if not (args.base_url and args.model):
            p.error("--base-url and --model are needed (or --merge)")
        args.checks = [c for c in args.checks.split(",") if c]
        unknown = set(args.checks) - set(CHECKS)
        if unknown:
            p.error(f"unknown checks: {sorted(unknown)}")
        reports = [asyncio.run(run(args))]
    doc = reports[0] if len(reports) == 1 and not args.merge else {"servers": reports}
    text = json.dumps(doc, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    print()
    print(markdown(reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
