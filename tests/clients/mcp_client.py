"""The official Python `mcp` SDK against prix-dispatch: list tools, stream a completion with a
progress callback, cancel a long one mid-stream, and an error result.

usage: mcp_client.py <http URL | stdio> <mode: auto | legacy | 2026-07-28> [binary config]
"""
import json
import sys

import anyio
from mcp import Client, StdioServerParameters

target, mode = sys.argv[1], sys.argv[2]
if target == "stdio":
    server = StdioServerParameters(command=sys.argv[3], args=["stdio", "--config", sys.argv[4]])
else:
    server = target


def directive(tokens, interval_ms):
    return '#sim {"tokens": %d, "token_interval_ms": %d}' % (tokens, interval_ms)


async def main():
    async with Client(server, mode=mode) as client:
        names = sorted(t.name for t in (await client.list_tools()).tools)
        assert names == ["complete", "complete_stream", "dispatch_status", "list_models"], names

        seen = []

        async def on_progress(progress, total, message):
            seen.append((progress, message))

        result = await client.call_tool(
            "complete_stream",
            {"model_id": "chat-model", "messages": [{"role": "user", "content": directive(5, 20)}]},
            progress_callback=on_progress,
        )
        assert not result.is_error, result
        assert result.content[0].text == "tok0 tok1 tok2 tok3 tok4 ", result.content
        assert result.structured_content["host"] == "gpu0", result.structured_content
        values = [p for p, _ in seen]
        assert values == sorted(set(values)), ("progress must strictly increase", values)
        deltas = "".join(m for _, m in seen if m and m.startswith("tok"))
        assert deltas == "tok0 tok1 tok2 tok3 tok4 ", seen

        # Cancel mid-stream: the daemon must drop the host connection.
        with anyio.move_on_after(0.5):
            await client.call_tool(
                "complete_stream",
                {"model_id": "chat-model", "messages": [{"role": "user", "content": directive(500, 20)}]},
            )
        cancelled = 0
        with anyio.fail_after(5):
            while cancelled < 1:
                status = await client.call_tool("dispatch_status", {})
                cancelled = status.structured_content["counters"]["cancelled"]
                await anyio.sleep(0.05)

        # Arguments as real clients send them (see src/params.rs).
        tools = (await client.list_tools()).tools
        schema = next(t for t in tools if t.name == "complete").input_schema
        for name, prop in schema["properties"].items():
            assert "type" in prop and "null" not in json.dumps(prop), (name, prop)
        hi = [{"role": "user", "content": "hi"}]
        ok = await client.call_tool(
            "complete",
            {"model_id": "chat-model", "messages": hi, "max_tokens": 50.0, "seed": 42.0,
             "response_format": '{"type":"json_object"}'},
        )
        assert not ok.is_error, ok
        for args, param in [({"max_tokens": "50"}, "max_tokens"), ({"max_tokens": 50.5}, "max_tokens"),
                            ({"response_format": "json_object"}, "response_format")]:
            refused = await client.call_tool("complete", {"model_id": "chat-model", "messages": hi, **args})
            assert refused.is_error, refused
            assert refused.structured_content["kind"] == "invalid_request", refused.structured_content
            assert refused.structured_content["retryable"] is False, refused.structured_content
            assert param in refused.content[0].text, refused.content

        # An answer that is only a tool call still has text content: the structured result's JSON.
        tool = await client.call_tool("complete", {"model_id": "tool-model", "messages": hi})
        assert not tool.is_error, tool
        assert json.loads(tool.content[0].text)["tool_calls"][0]["name"] == "get_weather", tool.content

        bad = await client.call_tool(
            "complete", {"model_id": "nope", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert bad.is_error, bad
        assert "not available on any server" in bad.content[0].text, bad.content
        assert bad.structured_content["kind"] == "model_not_available", bad.structured_content
    print(f"mcp client ({target if target == 'stdio' else 'http'}, {mode}): ok")


anyio.run(main)
