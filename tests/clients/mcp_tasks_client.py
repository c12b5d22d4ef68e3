"""The official Python `mcp` SDK (2.3.0) running long calls as MCP tasks.

The SDK ships no tasks client, but it has a client extension API (SEP-2133,
`mcp/client/extension.py`: `ClientExtension`, `ResultClaim`) through which a client declares
`io.modelcontextprotocol/tasks` (SEP-2663) and claims `tools/call` results with
`resultType: "task"`. `Tasks` below is such an extension: its resolver polls `tasks/get` until
the task ends. Every request has a fixed 3 s read timeout (`read_timeout_seconds`, which does
not restart on progress).

usage: mcp_tasks_client.py <MCP URL>
Prints one JSON line with what it saw.
"""
import json
import sys
from typing import Any, Literal

import anyio
import mcp_types as types
from mcp import Client
from mcp.client.extension import ClaimContext, ClientExtension, ResultClaim
from pydantic import Field, TypeAdapter

url = sys.argv[1]
TIMEOUT = 3.0
RAW = TypeAdapter(dict[str, Any])


class TaskCreated(types.Result):
    result_type: Literal["task"] = Field(alias="resultType")
    task_id: str
    status: str
    status_message: str | None = None
    poll_interval_ms: int | None = None


class TaskRequest(types.Request[dict[str, Any], str]):
    # SEP-2663 mirrors the task id into the Mcp-Name header on HTTP.
    name_param = "taskId"


async def task_request(session, method: str, task_id: str) -> dict[str, Any]:
    request = TaskRequest(method=method, params={"taskId": task_id})
    return await session.send_request(request, RAW, request_read_timeout_seconds=TIMEOUT)


class Tasks(ClientExtension):
    identifier = "io.modelcontextprotocol/tasks"

    def __init__(self, wait: bool):
        self.wait = wait
        self.created: list[TaskCreated] = []
        self.statuses: list[str] = []

    def claims(self):
        return [ResultClaim(result_type="task", model=TaskCreated, resolve=self.resolve)]

    async def resolve(self, task: TaskCreated, ctx: ClaimContext) -> types.CallToolResult:
        self.created.append(task)
        if not self.wait:
            return types.CallToolResult(content=[types.TextContent(type="text", text=task.task_id)])
        while True:
            state = await task_request(ctx.session, "tasks/get", task.task_id)
            self.statuses.append(state.get("statusMessage") or state["status"])
            if state["status"] == "completed":
                return types.CallToolResult.model_validate(state["result"])
            if state["status"] in ("failed", "cancelled"):
                raise RuntimeError(f"task {task.task_id} {state['status']}")
            await anyio.sleep((task.poll_interval_ms or 1000) / 1000)


def ask(content: str) -> dict[str, Any]:
    return {"model_id": "m", "messages": [{"role": "user", "content": content}]}


def directive(label: str, **behaviour) -> str:
    return "#sim %s %s" % (json.dumps(behaviour), label)


async def main():
    report: dict[str, Any] = {}

    # Control: a plain 6 s call with the fixed 3 s timeout gives up.
    async with Client(url, mode="2026-07-28", read_timeout_seconds=TIMEOUT) as plain:
        try:
            await plain.call_tool("complete", ask(directive("control", ttft_ms=6000, tokens=2)))
            report["control"] = "answered"
        except Exception as e:  # the SDK raises MCPError(REQUEST_TIMEOUT)
            report["control"] = f"{type(e).__name__}: {e}"

    # The same call as a task: answered at once, polled, completes after ~6 s.
    waiting = Tasks(wait=True)
    async with Client(url, mode="2026-07-28", read_timeout_seconds=TIMEOUT, extensions=[waiting]) as client:
        started = anyio.current_time()
        result = await client.call_tool("complete", ask(directive("long", ttft_ms=6000, tokens=2)))
        report["long"] = {
            "seconds": anyio.current_time() - started,
            "is_error": result.is_error,
            "text": result.content[0].text,
            "structured": result.structured_content,
            "statuses": waiting.statuses,
            "created_status": waiting.created[0].status,
        }

    # Cancel a running task, then a queued one behind it.
    detached = Tasks(wait=False)
    async with Client(url, mode="2026-07-28", read_timeout_seconds=TIMEOUT, extensions=[detached]) as client:
        running = (await client.call_tool("complete_stream", ask(directive("running", ttft_ms=30000)))).content[0].text
        queued = (await client.call_tool("complete", ask(directive("queued", tokens=1)))).content[0].text
        session = client.session
        seen = {}
        for _ in range(50):
            seen["running"] = await task_request(session, "tasks/get", running)
            if seen["running"].get("statusMessage", "").startswith("running m on gpu0"):
                break
            await anyio.sleep(0.1)
        seen["queued"] = await task_request(session, "tasks/get", queued)
        await task_request(session, "tasks/cancel", queued)
        await task_request(session, "tasks/cancel", running)
        report["before_cancel"] = {k: v.get("statusMessage") for k, v in seen.items()}
        report["after_cancel"] = {
            "queued": (await task_request(session, "tasks/get", queued))["status"],
            "running": (await task_request(session, "tasks/get", running))["status"],
        }
        try:
            await task_request(session, "tasks/cancel", running)
            report["cancel_again"] = "accepted"
        except Exception as e:
            report["cancel_again"] = str(e)
        try:
            await task_request(session, "tasks/get", "no-such-task")
            report["unknown"] = "found"
        except Exception as e:
            report["unknown"] = str(e)

    # The slot came back: a later task runs.
    waiting = Tasks(wait=True)
    async with Client(url, mode="2026-07-28", read_timeout_seconds=TIMEOUT, extensions=[waiting]) as client:
        result = await client.call_tool("complete", ask(directive("after", tokens=1)))
        report["after"] = result.content[0].text

    print(json.dumps(report))


anyio.run(main)
