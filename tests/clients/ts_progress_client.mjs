// The official TypeScript MCP SDK (`@modelcontextprotocol/sdk`, as bundled with the MCP
// Inspector that .ci/run installs) calling `complete` with a 5 s timeout that restarts on every
// progress notification (`resetTimeoutOnProgress`, sdk dist/esm/shared/protocol.js
// `_onprogress`), while the call waits ~20 s in the queue and ~20 s for a model load.
// A control call with the same 5 s timeout but no reset must time out.
//
// usage: node ts_progress_client.mjs <sdk package dir> <MCP URL>
// Prints one JSON line: {ok, text, elapsed_ms, widest_gap_ms, messages, control}.
import { pathToFileURL } from 'node:url';

const [sdk, url] = process.argv.slice(2);
const load = (p) => import(pathToFileURL(`${sdk}/dist/esm/${p}`).href);
const { Client } = await load('client/index.js');
const { StreamableHTTPClientTransport } = await load('client/streamableHttp.js');

const client = new Client({ name: 'prix-ts-progress', version: '1.0.0' });
await client.connect(new StreamableHTTPClientTransport(new URL(url)));

const directive = (o) => `#sim ${JSON.stringify(o)}`;
const ask = (model, content) => ({
  name: 'complete',
  arguments: { model_id: model, messages: [{ role: 'user', content }] },
});

const started = Date.now();
const times = [started];
const messages = [];
const main = client.callTool(ask('n', directive({ load_ms: 20000, tokens: 2 })), undefined, {
  timeout: 5000,
  resetTimeoutOnProgress: true,
  onprogress: (p) => {
    times.push(Date.now());
    messages.push(p.message);
  },
});
const control = client
  .callTool(ask('m', 'hi'), undefined, {
    timeout: 5000,
    resetTimeoutOnProgress: false,
    onprogress: () => {},
  })
  .then(
    () => 'answered',
    (e) => `error ${e.code}: ${e.message}`,
  );

let result;
let error = null;
try {
  result = await main;
} catch (e) {
  error = `${e.code}: ${e.message}`;
}
times.push(Date.now());
let widest = 0;
for (let i = 1; i < times.length; i++) widest = Math.max(widest, times[i] - times[i - 1]);
console.log(
  JSON.stringify({
    ok: error === null && !result.isError,
    error,
    text: result?.structuredContent?.text ?? null,
    elapsed_ms: Date.now() - started,
    widest_gap_ms: widest,
    messages,
    control: await control,
  }),
);
await client.close();
