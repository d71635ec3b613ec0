// Sampling parameters: defaults, and the request body built from the UI state.
import { API_BASE } from './api.js';

export const DEFAULT_PARAMS = Object.freeze({
  temperature: 0.7,
  top_p: 0.95,
  top_k: 40,
  min_p: 0.05,
  max_tokens: 512,
  seed: '',
  stop: '',
  repeat_penalty: 1.0,
  json_mode: false,
});

const NUMERIC = ['temperature', 'top_p', 'top_k', 'min_p', 'max_tokens', 'repeat_penalty'];

const isNum = (v) => v !== '' && v !== null && v !== undefined && Number.isFinite(Number(v));

// One stop sequence per line; "\n" and "\t" may be typed as escapes.
export function parseStops(text) {
  return String(text || '')
    .split('\n')
    .filter((s) => s.trim() !== '')
    .map((s) => s.replace(/\\n/g, '\n').replace(/\\t/g, '\t'));
}

export function buildRequest({ messages, params, systemPrompt, ragContext, model, adapter, tools }) {
  const body = { messages };
  if (model) body.model = model;
  if (tools) Object.assign(body, { tools: tools.list, tool_choice: tools.choice });
  if (adapter?.name) body.lora = [{ name: adapter.name, scale: isNum(adapter.scale) ? Number(adapter.scale) : 1 }];
  for (const k of NUMERIC) if (isNum(params[k])) body[k] = Number(params[k]);
  if (isNum(params.seed)) body.seed = Math.trunc(Number(params.seed));
  const stop = parseStops(params.stop);
  if (stop.length) body.stop = stop;
  if (params.json_mode) body.response_format = { type: 'json_object' };
  if (systemPrompt && systemPrompt.trim()) body.system_prompt = systemPrompt;
  if (ragContext && ragContext.trim()) body.rag_context = ragContext;
  body.stream = true;
  body.stream_options = { include_usage: true };
  return body;
}

// A shell command reproducing a request, for the "copy as curl" button.
export function curlCommand(body) {
  const url = `${API_BASE || location.origin}/v1/chat/completions`;
  const json = JSON.stringify(body, null, 2).replace(/'/g, `'\\''`);
  return `curl -N ${url} \\\n  -H 'Content-Type: application/json' \\\n  -d '${json}'`;
}
