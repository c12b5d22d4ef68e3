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
print("openai client: ok")
