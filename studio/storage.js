// localStorage helpers: a ref that loads its value once and saves it on change.
import { ref, watch } from 'vue';

const PREFIX = 'sentiric.studio.';

export function load(key, fallback) {
  try {
    const raw = localStorage.getItem(PREFIX + key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch {
    return fallback;
  }
}

export function save(key, value) {
  try {
    localStorage.setItem(PREFIX + key, JSON.stringify(value));
  } catch (e) {
    console.warn(`studio: could not save ${key} to localStorage (${e.message})`);
  }
}

// Saves at most every `delay` ms (streaming answers change the chat often).
export function persisted(key, fallback, delay = 250) {
  const r = ref(load(key, fallback));
  let timer = null;
  watch(r, (value) => {
    clearTimeout(timer);
    timer = setTimeout(() => save(key, value), delay);
  }, { deep: true });
  addEventListener('pagehide', () => { if (timer) save(key, r.value); });
  return r;
}
