// Live server telemetry shared by all views: health, model, GET /stats every
// second and a 60 s throughput history for the sparkline.
import { reactive } from 'vue';
import { getHealth, getJSON } from './api.js';
import { useServerDefaults } from './settings.js';

export const server = reactive({
  health: 'unknown', // ok | loading | down | unknown
  model: null,
  stats: null, // last /stats answer, null while unavailable
  statsError: null,
  history: [], // [{ t: ms, v: tokens/s }], last 60 s
  peakBatch: 0, // max last_batch_size since resetPeaks()
  peakRunning: 0,
});

const WINDOW_MS = 60_000;
let fastUntil = 0;
let started = false;
let rateBase = null; // { t, gen } sample the next throughput point is measured from

// Poll /stats four times a second for a while (parallel runs), to catch peaks.
export function pollFast(ms = 2000) {
  fastUntil = Math.max(fastUntil, performance.now() + ms);
}

export function resetPeaks() {
  server.peakBatch = 0;
  server.peakRunning = 0;
}

function record(stats) {
  const now = performance.now();
  server.stats = stats;
  server.statsError = null;
  server.peakBatch = Math.max(server.peakBatch, Number(stats.last_batch_size) || 0);
  server.peakRunning = Math.max(server.peakRunning, Number(stats.running) || 0);
  const gen = Number(stats.generated_tokens);
  if (Number.isFinite(gen) && rateBase && gen >= rateBase.gen) {
    if (now - rateBase.t < 900) return; // one point per second, even when polling fast
    pushPoint(now, ((gen - rateBase.gen) * 1000) / (now - rateBase.t));
  } else if (!Number.isFinite(gen) && Number.isFinite(Number(stats.tokens_per_second))) {
    pushPoint(now, Number(stats.tokens_per_second));
  }
  rateBase = Number.isFinite(gen) ? { t: now, gen } : null;
}

function pushPoint(t, v) {
  server.history.push({ t, v });
  while (server.history.length && server.history[0].t < t - WINDOW_MS) server.history.shift();
}

async function pollStats() {
  let delay = 1000;
  try {
    record(await getJSON('/stats', { timeout: 2500 }));
  } catch (e) {
    server.stats = null;
    server.statsError = e.status === 404 ? 'this server has no /stats' : e.message;
    rateBase = null;
    delay = e.status === 404 ? 10_000 : 2000; // back off: don't flood the console
  }
  if (performance.now() < fastUntil) delay = 250;
  setTimeout(pollStats, delay);
}

// The active model's id and sampling defaults (the first entry of GET /v1/models); after a switch too.
export async function refreshModel() {
  try {
    const models = await getJSON('/v1/models');
    server.model = models?.data?.[0]?.id ?? null;
    useServerDefaults(models?.data?.[0]?.meta?.sampling_defaults);
  } catch { /* shown as "–" */ }
}

async function pollHealth() {
  server.health = await getHealth();
  if (server.health === 'ok' && !server.model) await refreshModel();
  setTimeout(pollHealth, server.health === 'ok' ? 2000 : 1000);
}

export function startTelemetry() {
  if (started) return;
  started = true;
  pollHealth();
  pollStats();
}
