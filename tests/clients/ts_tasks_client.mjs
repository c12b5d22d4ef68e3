// The official TypeScript MCP SDK (`@modelcontextprotocol/sdk` 1.32.2, as bundled with the MCP
// Inspector that .ci/run caches) running a ~6 s `complete` as a task in the 2025-11-25
// experimental form, with a fixed 3 s request timeout (`timeout` in RequestOptions, no reset):
// `client.experimental.tasks.callToolStream` (sdk dist/esm/experimental/tasks/client.js) sends
// `task` on tools/call because tools/list marked the tool `execution.taskSupport`
// (client/index.js:511 `isToolTask`), then polls tasks/get and fetches tasks/result
// (shared/protocol.js:558-628). A plain call of the same with the same timeout must time out;
// a plain call without it gives the result to compare.
//
// usage: node ts_tasks_client.mjs <sdk package dir> <daemon binary> <config file>   (stdio)
//        node ts_tasks_client.mjs <sdk package dir> <http://…/mcp URL>             (Streamable HTTP)
// Prints one JSON line: {ok, error, messages, statuses, task_result, plain_result, control, elapsed_ms}.
import { pathToFileURL } from 'node:url';

const [sdk, target, config] = process.argv.slice(2);
const load = (p) => import(pathToFileURL(`${sdk}/dist/esm/${p}`).href);
const { Client } = await load('client/index.js');

let transport;
if (/^https?:/.test(target)) {
  const { StreamableHTTPClientTransport } = await load('client/streamableHttp.js');
  transport = new StreamableHTTPClientTransport(new URL(target));
} else {
  const { StdioClientTransport } = await load('client/stdio.js');
  transport = new StdioClientTransport({
    command: target,
    args: ['stdio', '--standalone', '--config', config],
    env: { ...process.env, RUST_LOG: 'warn' },
    stderr: 'inherit',
  });
}
const client = new Client({ name: 'prix-ts-tasks', version: '1.0.0' });
await client.connect(transport);
// Caches which tools run as tasks (execution.taskSupport).
await client.listTools();

const directive = (o) => `#sim ${JSON.stringify(o)}`;
const ask = (label) => ({
  name: 'complete',
  arguments: {
    model_id: 'm',
    messages: [{ role: 'user', content: `${directive({ tokens: 30, token_interval_ms: 200 })} ${label}` }],
  },
});

const started = Date.now();
const messages = [];
const statuses = [];
let taskResult = null;
let error = null;
for await (const message of client.experimental.tasks.callToolStream(ask('task'), undefined, {
  timeout: 3000,
})) {
  messages.push(message.type);
  if (message.type === 'taskCreated' || message.type === 'taskStatus') {
    statuses.push(`${message.task.status}: ${message.task.statusMessage ?? ''}`);
  } else if (message.type === 'result') {
    taskResult = message.result;
  } else if (message.type === 'error') {
    error = `${message.error.code}: ${message.error.message}`;
  }
}
const elapsed = Date.now() - started;

const control = await client.callTool(ask('control'), undefined, { timeout: 3000 }).then(
  () => 'answered',
  (e) => `error ${e.code}: ${e.message}`,
);
const plainResult = await client.callTool(ask('plain'), undefined, { timeout: 60000 });
await client.close();
console.log(
  JSON.stringify({
    ok: error === null && taskResult !== null,
    error,
    messages,
    statuses,
    task_result: taskResult,
    plain_result: plainResult,
    control,
    elapsed_ms: elapsed,
  }),
);
