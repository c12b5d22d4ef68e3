"""A prompt-prix-style client for an OpenAI-compatible server, with the official `openai` package.

prompt-prix's pooled adapter takes one base URL per server (`LOCAL_INFERENCE_SERVER_1=http://host:port`,
no `/v1`), reads only `data[].id` from `GET /v1/models`, and streams every completion, yielding
`delta.content` as it arrives and accumulating `delta.tool_calls` by index (last non-empty name wins,
argument fragments concatenated). Pointing that one URL at prix-dispatch instead of at a single
LM Studio is the whole switch; this script does exactly that against whatever serves the URL.

Usage: prompt_prix_driver.py BASE_URL [MODEL]
  BASE_URL  the server's base URL without /v1 (default: $LOCAL_INFERENCE_SERVER_1)
  MODEL     the model id to use (default: the first id the server lists)

Prints "prompt-prix driver: ok" and exits 0, or exits non-zero with the reason.
"""
import asyncio
import os
import sys
import time

from openai import AsyncOpenAI, OpenAI

base = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LOCAL_INFERENCE_SERVER_1", "")
if not base:
    sys.exit("usage: prompt_prix_driver.py BASE_URL [MODEL] (or set LOCAL_INFERENCE_SERVER_1)")
base = base.rstrip("/")
if base.endswith("/v1"):  # prompt-prix strips a trailing /v1 and adds it back itself
    base = base[: -len("/v1")]
api_key = os.environ.get("LOCAL_INFERENCE_SERVER_1_KEY") or "unused"
client = OpenAI(base_url=f"{base}/v1", api_key=api_key, timeout=60, max_retries=0)

# 1. The routing manifest: only data[].id matters.
ids = [m.id for m in client.models.list()]
assert ids, "the server lists no models"
model = sys.argv[2] if len(sys.argv) > 2 else ids[0]
assert model in ids, f"{model!r} is not among the listed models {ids}"
print(f"models: {ids}; using {model!r}")


def consume(chunks):
    """What prompt-prix's adapter does with a stream, plus what it ignores (finish, usage)."""
    out = {"text": "", "deltas": 0, "calls": {}, "finish": None, "usage": None,
           "first_delta_s": None, "end_s": None}
    start = time.monotonic()
    for chunk in chunks:
        if chunk.usage is not None:  # include_usage: a final chunk with "choices": []
            out["usage"] = chunk.usage
        if not chunk.choices:  # tolerate choices [] / null (upstream latent bug L6)
            continue
        choice = chunk.choices[0]
        out["finish"] = choice.finish_reason or out["finish"]
        delta = choice.delta
        if delta is None:
            continue
        if delta.content:
            if out["first_delta_s"] is None:
                out["first_delta_s"] = time.monotonic() - start
            out["text"] += delta.content
            out["deltas"] += 1
        for call in delta.tool_calls or []:
            entry = out["calls"].setdefault(call.index or 0, {"name": "", "arguments": ""})
            if call.function and call.function.name:
                entry["name"] = call.function.name
            if call.function and call.function.arguments:
                entry["arguments"] += call.function.arguments
    # The iterator ends only once the SDK has read `data: [DONE]` (or the body ended).
    out["end_s"] = time.monotonic() - start
    return out


def check(result, what):
    has_content = bool(result["text"]) or bool(result["calls"])
    # prompt-prix raises "Stream aborted" on a stream that ends without content and without [DONE];
    # with the SDK the clean end shows as a finish_reason plus the usage chunk that precedes [DONE].
    assert has_content, f"{what}: stream aborted, no content: {result}"
    assert result["finish"] in ("stop", "length", "tool_calls"), f"{what}: finish_reason {result}"
    assert result["usage"] is not None and result["usage"].completion_tokens > 0, \
        f"{what}: no usage chunk before the end of the stream: {result}"
    named = [c for c in result["calls"].values() if c["name"]]
    if result["finish"] == "tool_calls":
        assert named, f"{what}: finish_reason tool_calls but no named call: {result}"
    # SmolLM2 has no tool template, so no calls are expected here; with a tool-capable model the
    # accumulated calls would be forwarded as prompt-prix's __TOOL_CALLS__ sentinel.
    assert "tok0 tok1" not in result["text"], f"{what}: simulator text, not a real model: {result}"


# 2. One streamed completion, with a tool offered (SmolLM2 ignores it and answers in text).
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
one = consume(client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Write two sentences about the sea."}],
    temperature=0.0,
    max_tokens=40,
    tools=tools,
    stream=True,
    stream_options={"include_usage": True},
))
check(one, "single stream")
assert one["deltas"] > 1, f"expected several content deltas, got {one}"
assert one["first_delta_s"] < one["end_s"], f"the first delta came only at the end: {one}"
print(f"stream: {one['deltas']} deltas, first after {one['first_delta_s'] * 1000:.0f} ms, "
      f"end after {one['end_s'] * 1000:.0f} ms, finish {one['finish']}, "
      f"tool calls {len(one['calls'])}: {one['text']!r}")


# 3. A fan-out of 4 concurrent streams, as a prompt-prix battery run issues them.
async def stream_async(aclient, i):
    chunks = []
    stream = await aclient.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Give me one fact about the number {i + 2}."}],
        temperature=0.0,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        chunks.append(chunk)
    return consume(chunks)


async def fan_out():
    async with AsyncOpenAI(base_url=f"{base}/v1", api_key=api_key, timeout=60, max_retries=0) as aclient:
        return await asyncio.gather(*(stream_async(aclient, i) for i in range(4)))


started = time.monotonic()
results = asyncio.run(fan_out())
for i, r in enumerate(results):
    check(r, f"fan-out stream {i}")
print(f"fan-out: 4 streams in {(time.monotonic() - started) * 1000:.0f} ms: "
      + "; ".join(repr(r["text"]) for r in results))
print("prompt-prix driver: ok")
