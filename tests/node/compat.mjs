// The Node openai SDK against the gateway: `node compat.mjs <base_url>` prints one JSON object of what it saw.
// Driven by tests/e2e/test_clients.py, which asserts on the result and on what the simulator saw.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.argv[2], apiKey: "anything", maxRetries: 0, timeout: 30_000 });
const messages = [{ role: "user", content: "hi from node" }];
const out = {};

const chat = await client.chat.completions.create({ model: "chat", messages });
out.chat = chat.choices[0].message.content;

const parts = [];
const stream = await client.chat.completions.create({ model: "chat", messages, stream: true,
  stream_options: { include_usage: true } });
for await (const chunk of stream) {
  if (chunk.choices[0]?.delta?.content) parts.push(chunk.choices[0].delta.content);
  if (chunk.usage) out.stream_usage = chunk.usage.completion_tokens;
}
out.stream = parts;

const tool = { type: "function", function: { name: "lookup", parameters: {
  type: "object", properties: { q: { type: "string" } }, required: ["q"] } } };
const runner = client.chat.completions.stream({ model: "chat", messages, tools: [tool], tool_choice: "required" });
const final = await runner.finalChatCompletion();
out.tool_call = final.choices[0].message.tool_calls.map((c) => [c.function.name, JSON.parse(c.function.arguments)]);

// Abort mid-stream: the gateway must cancel the upstream request at once.
const controller = new AbortController();
const long = await client.chat.completions.create({ model: "chat", messages, stream: true },
  { signal: controller.signal, headers: { "x-sim-tokens": "400", "x-sim-itl-ms": "20", "x-request-id": "node-abort" } });
let seen = 0;
try {
  for await (const chunk of long) {
    if (chunk.choices[0]?.delta?.content) seen += 1;
    if (seen === 3) controller.abort();
  }
  out.abort = "loop ended"; // the SDK ends the iteration quietly when its own signal aborts it
} catch (err) {
  out.abort = err.constructor.name;
}
out.aborted = controller.signal.aborted;
out.abort_seen = seen;

async function failure(fn) {
  try {
    await fn();
    return null;
  } catch (err) {
    return { class: err.constructor.name, status: err.status, param: err.param ?? null, code: err.code ?? null };
  }
}
out.bad_request = await failure(() => client.chat.completions.create({ model: "chat", messages, temperature: 5 }));
out.not_found = await failure(() => client.chat.completions.create({ model: "no-such-model", messages }));
out.rate_limited = await failure(() => client.chat.completions.create({ model: "chat", messages },
  { headers: { "x-sim-error-rate": "1", "x-sim-error-status": "429" } }));
console.log(JSON.stringify(out));
