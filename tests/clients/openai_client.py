"""The official `openai` package against prix-dispatch's /v1, the way prompt-prix's pooled
adapter uses an OpenAI-compatible server: list models, stream a completion, stream a tool
call, and one non-streaming call. Exits non-zero with a message on any mismatch."""
import json
import sys

from openai import OpenAI

base = sys.argv[1]
client = OpenAI(base_url=f"{base}/v1", api_key=sys.argv[2] if len(sys.argv) > 2 else "unused")

ids = sorted(m.id for m in client.models.list())
assert ids == ["chat-model", "tool-model"], ids

# A streamed completion: deltas arrive one by one, then the stream ends.
deltas = []
for chunk in client.chat.completions.create(
    model="chat-model",
    messages=[{"role": "user", "content": "Say hello."}],
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.choices and chunk.choices[0].delta.content:
        deltas.append(chunk.choices[0].delta.content)
assert len(deltas) >= 3, deltas
assert "".join(deltas) == "tok0 tok1 tok2 ", deltas

# A streamed tool call: fragments accumulated by index, as prompt-prix does.
calls = {}
finish = None
for chunk in client.chat.completions.create(
    model="tool-model",
    messages=[{"role": "user", "content": "Weather in Paris?"}],
    tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}],
    stream=True,
):
    if not chunk.choices:
        continue
    choice = chunk.choices[0]
    finish = choice.finish_reason or finish
    for call in choice.delta.tool_calls or []:
        entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
        if call.function and call.function.name:
            entry["name"] = call.function.name
        if call.function and call.function.arguments:
            entry["arguments"] += call.function.arguments
assert finish == "tool_calls", finish
assert calls[0]["name"] == "get_weather", calls
assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}, calls

# Not streamed.
answer = client.chat.completions.create(
    model="chat-model", messages=[{"role": "user", "content": "hi"}]
)
assert answer.choices[0].message.content == "tok0 tok1 tok2 ", answer

# An unknown model is a 404 with OpenAI's error shape.
try:
    client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    raise AssertionError("expected a 404")
except Exception as e:  # openai.NotFoundError
    assert getattr(e, "status_code", None) == 404, e

# Host failures as real servers send them (replayed by the simulated host's `raw` replies).
import openai


def replay(chunks, status=200, content_type="text/event-stream", abort=False):
    raw = {"status": status, "content_type": content_type, "chunks": chunks, "abort": abort}
    return "#sim " + json.dumps({"raw": raw})


def ask(content, stream):
    return client.chat.completions.create(
        model="chat-model", messages=[{"role": "user", "content": content}], stream=stream
    )


# vLLM's 400 for a prompt over the context: the SDK's BadRequestError with vLLM's whole message,
# and no retry (the Rust side counts the host's requests: one per call).
vllm = json.dumps({"object": "error", "message": "This model's maximum context length is 2048 tokens. However, you requested 2100 tokens (1900 in the messages, 200 in the completion). Please reduce the length of the messages or completion.", "type": "BadRequestError", "param": None, "code": 400})
for stream in (False, True):
    try:
        result = ask(replay([vllm], status=400, content_type="application/json"), stream)
        if stream:
            list(result)
        raise AssertionError("expected a BadRequestError")
    except openai.BadRequestError as e:
        assert e.status_code == 400, e
        assert "Please reduce the length of the messages or completion." in e.message, e.message

# LM Studio's 200 + JSON error to a stream request: an exception, not an empty stream.
lm = '{"error":"Unexpected endpoint or method. (POST /chat/completions)"}'
try:
    chunks = list(ask(replay([lm], content_type="application/json"), True))
    raise AssertionError(f"expected an error, got {len(chunks)} chunks")
except openai.APIStatusError as e:
    assert "Unexpected endpoint or method" in e.message, e.message


def chunk(delta, finish=None):
    return "data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "chat-model",
                                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"


# llama.cpp's error field after a token: the stream raises, after the token.
llama_error = 'error: {"code":400,"message":"the request exceeds the available context size. try increasing the context size or enable context shift","type":"invalid_request_error"}\n\n'
seen = []
try:
    for c in ask(replay([chunk({"role": "assistant", "content": "Hel"}), llama_error, "data: [DONE]\n\n"]), True):
        if c.choices and c.choices[0].delta.content:
            seen.append(c.choices[0].delta.content)
    raise AssertionError("expected the stream to raise")
except openai.APIError as e:
    assert "exceeds the available context size" in e.message, e.message
assert seen == ["Hel"], seen

# A stream cut with `finish_reason: ""` on every chunk: the stream raises, not a clean end.
try:
    for c in ask(replay([chunk({"content": "Hel"}, ""), chunk({"content": "lo"}, "")]), True):
        pass
    raise AssertionError("expected the stream to raise")
except openai.APIError as e:
    assert "Stream truncated" in e.message, e.message

# vLLM's engine-side abort: finish_reason "abort" then [DONE] is not an answer.
try:
    for c in ask(replay([chunk({"content": "Hel"}), chunk({}, "abort"), "data: [DONE]\n\n"]), True):
        pass
    raise AssertionError("expected the stream to raise")
except openai.APIError as e:
    assert "Stream truncated" in e.message and "abort" in e.message, e.message

# Ollama's parallel tool calls, both at index 0: the SDK's chunks, accumulated by index as
# prompt-prix does, give two calls with valid arguments.
def whole_call(call_id, path):
    return chunk({"role": "assistant", "content": "", "tool_calls": [{
        "id": call_id, "index": 0, "type": "function",
        "function": {"name": "read", "arguments": json.dumps({"filePath": path})}}]})


calls = {}
for c in ask(replay([whole_call("call_a1", "hello.py"), whole_call("call_b2", "world.py"),
                     chunk({}, "tool_calls"), "data: [DONE]\n\n"]), True):
    for call in (c.choices[0].delta.tool_calls or []) if c.choices else []:
        entry = calls.setdefault(call.index, {"id": None, "arguments": ""})
        entry["id"] = call.id or entry["id"]
        entry["arguments"] += call.function.arguments or ""
assert sorted(calls) == [0, 1], calls
assert [json.loads(calls[i]["arguments"])["filePath"] for i in (0, 1)] == ["hello.py", "world.py"], calls
assert [calls[i]["id"] for i in (0, 1)] == ["call_a1", "call_b2"], calls

print("openai client: ok")
