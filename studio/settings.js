// User settings shared by the chat and parallel views, kept in localStorage.
import { persisted } from './storage.js';
import { DEFAULT_PARAMS, buildRequest } from './params.js';

// The studio starts from the server's own sampling defaults (GET /v1/models), so what it sends
// by default is what any client leaving the fields out gets; DEFAULT_PARAMS until they arrive.
let defaults = { ...DEFAULT_PARAMS };

export const params = persisted('params', { ...DEFAULT_PARAMS });
// Fill in parameters added after the user's settings were saved.
for (const [k, v] of Object.entries(DEFAULT_PARAMS)) if (!(k in params.value)) params.value[k] = v;

const SERVER_FIELDS = ['temperature', 'top_k', 'top_p', 'min_p', 'repeat_penalty', 'max_tokens'];

export function useServerDefaults(sampling) {
  if (!sampling) return;
  const untouched = SERVER_FIELDS.every((k) => params.value[k] === defaults[k]);
  const next = { ...defaults };
  for (const k of SERVER_FIELDS) if (sampling[k] !== null && sampling[k] !== undefined) next[k] = sampling[k];
  defaults = next;
  if (untouched) params.value = { ...params.value, ...Object.fromEntries(SERVER_FIELDS.map((k) => [k, next[k]])) };
}

export const systemPrompt = persisted('systemPrompt', '');
// The LoRA adapter every request asks for ('' = the base model), and its scale.
export const adapter = persisted('adapter', { name: '', scale: 1 });

// The functions offered to the model (OpenAI's `tools`), as the JSON the user edits, and `tool_choice`.
export const TOOLS_EXAMPLE = JSON.stringify([{
  type: 'function',
  function: {
    name: 'get_weather', description: 'Current weather in a city',
    parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
  },
}], null, 2);
export const tools = persisted('tools', { enabled: false, json: TOOLS_EXAMPLE, choice: 'auto' });

// The tools list, or why the JSON is not one.
export function parseTools(json) {
  try {
    const list = JSON.parse(json);
    if (!Array.isArray(list) || !list.length) return { error: 'tools must be a non-empty JSON array' };
    return { list };
  } catch (e) {
    return { error: `not JSON: ${e.message}` };
  }
}
export const ragContext = persisted('ragContext', '');
export const ragFileName = persisted('ragFileName', '');

export function resetParams() {
  params.value = { ...defaults };
}

// The request body for a conversation with the current settings, on `model`.
export function chatRequest(messages, model) {
  const offered = tools.value.enabled ? parseTools(tools.value.json).list : null;
  return buildRequest({
    messages, model, params: params.value, systemPrompt: systemPrompt.value, ragContext: ragContext.value,
    adapter: adapter.value, tools: offered && { list: offered, choice: tools.value.choice },
  });
}
