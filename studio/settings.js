// User settings shared by the chat and parallel views, kept in localStorage.
import { persisted } from './storage.js';
import { DEFAULT_PARAMS } from './params.js';

export const params = persisted('params', { ...DEFAULT_PARAMS });
// Fill in parameters added after the user's settings were saved.
for (const [k, v] of Object.entries(DEFAULT_PARAMS)) if (!(k in params.value)) params.value[k] = v;

export const systemPrompt = persisted('systemPrompt', '');
export const ragContext = persisted('ragContext', '');
export const ragFileName = persisted('ragFileName', '');

export function resetParams() {
  params.value = { ...DEFAULT_PARAMS };
}
