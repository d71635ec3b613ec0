// Parallel mode: the same prompt N times at once, to watch continuous
// batching work (batch size and aggregate tokens/s rise with N).
import { reactive, ref, computed, onBeforeUnmount } from 'vue';
import { runGeneration } from '../api.js';
import { chatRequest } from '../settings.js';
import { persisted } from '../storage.js';
import { server, pollFast, resetPeaks } from '../telemetry.js';
import AnswerMeta from './AnswerMeta.js';

// Browsers open at most 6 HTTP/1.1 connections per server, counted separately
// for requests with and without credentials. Streams 1-6 and 12-16 use the
// first pool, 7-11 the second, which keeps one connection of that second pool
// free for the telemetry polls (api.js): up to 11 streams run at once.
const pool = (i) => (i >= 6 && i < 11 ? 'omit' : 'same-origin');

export default {
  name: 'ParallelView',
  components: { AnswerMeta },
  setup() {
    const prompt = persisted('parallelPrompt', 'Write a short poem about the sea.');
    const count = persisted('parallelN', 4);
    const runs = ref([]);
    const busy = ref(false);
    const started = ref(0);
    const ended = ref(0);
    const now = ref(performance.now());
    let controller = null;
    let ticker = null;

    async function start() {
      if (busy.value || !prompt.value.trim()) return;
      const n = Math.max(1, Math.min(16, Number(count.value) || 1));
      const body = chatRequest([{ role: 'user', content: prompt.value }], server.model);
      controller = new AbortController();
      runs.value = Array.from({ length: n }, (_, i) => reactive({ id: i + 1, text: '', state: 'waiting' }));
      busy.value = true;
      resetPeaks();
      started.value = performance.now();
      ended.value = 0;
      ticker = setInterval(() => { now.value = performance.now(); pollFast(1500); }, 250);
      pollFast(1500);
      try {
        await Promise.all(runs.value.map((run, i) => runGeneration(body, run, controller.signal, pool(i))));
      } finally {
        clearInterval(ticker);
        ended.value = performance.now();
        now.value = ended.value;
        busy.value = false;
        controller = null;
        pollFast(2000); // let the peaks settle from the last steps
      }
    }

    function stopAll() {
      controller?.abort();
    }
    onBeforeUnmount(stopAll);

    const tokens = (r) => r.usage?.completion_tokens ?? r.chunks ?? 0;
    const summary = computed(() => {
      const list = runs.value;
      const total = list.reduce((sum, r) => sum + tokens(r), 0);
      const firsts = list.map((r) => r.firstAt).filter((t) => t != null);
      const end = ended.value || now.value;
      const wall = started.value ? (end - started.value) / 1000 : 0;
      // Aggregate decode rate: all tokens since the first token of any stream.
      const since = firsts.length ? (end - Math.min(...firsts)) / 1000 : 0;
      const ttfts = list.map((r) => r.ttftMs).filter((v) => v != null);
      return {
        done: list.filter((r) => ['done', 'stopped', 'error'].includes(r.state)).length,
        streaming: list.filter((r) => r.state === 'streaming').length,
        total,
        wall,
        aggregate: since > 0.2 ? total / since : null,
        meanTtft: ttfts.length ? ttfts.reduce((a, b) => a + b, 0) / ttfts.length : null,
      };
    });

    const batchNow = computed(() => server.stats?.last_batch_size ?? null);
    const dash = (v, d = 0) => (v == null ? '–' : Number(v).toFixed(d));

    return {
      prompt, count, runs, busy, summary, server, batchNow, dash, start, stopAll,
    };
  },
  template: `
    <section class="parallel">
      <form class="par-controls" @submit.prevent="start">
        <textarea v-model="prompt" rows="2" data-testid="parallel-prompt" placeholder="Prompt sent N times"
                  @keydown.enter.exact.prevent="start"></textarea>
        <div class="par-bar">
          <label class="n-picker">streams
            <input type="range" min="1" max="16" step="1" v-model.number="count" :disabled="busy">
            <input type="number" min="1" max="16" class="num" v-model.number="count" :disabled="busy" data-testid="parallel-n">
          </label>
          <button v-if="!busy" type="submit" class="primary" data-testid="parallel-run">Run {{ count }} at once</button>
          <button v-else type="button" class="danger" @click="stopAll" data-testid="parallel-stop">■ Stop all</button>
          <span class="muted small grow">Uses the sidebar's parameters and context. Up to 11 streams run at once
            (browsers cap connections per server and one is kept for telemetry); more wait in the browser, shown as queued.</span>
        </div>
      </form>

      <div class="par-summary" data-testid="parallel-summary" :data-state="busy ? 'running' : (runs.length ? 'done' : 'idle')">
        <div class="stat"><label>finished</label><b data-testid="parallel-done">{{ summary.done }} / {{ runs.length }}</b></div>
        <div class="stat"><label>aggregate tok/s</label><b data-testid="parallel-aggregate">{{ dash(summary.aggregate, 1) }}</b></div>
        <div class="stat"><label>tokens</label><b>{{ summary.total }}</b></div>
        <div class="stat"><label>mean TTFT</label><b>{{ summary.meanTtft == null ? '–' : Math.round(summary.meanTtft) + ' ms' }}</b></div>
        <div class="stat"><label>wall time</label><b>{{ summary.wall ? summary.wall.toFixed(1) + ' s' : '–' }}</b></div>
        <div class="stat"><label>server batch now</label><b data-testid="parallel-batch">{{ dash(batchNow) }}</b></div>
        <div class="stat accent"><label>peak batch size</label>
          <b data-testid="parallel-peak-batch">{{ server.stats || server.peakBatch ? server.peakBatch : '–' }}</b></div>
        <div class="stat"><label>peak running</label><b>{{ server.stats || server.peakRunning ? server.peakRunning : '–' }}</b></div>
      </div>

      <div v-if="!runs.length" class="empty">
        <h3>Batching demonstration</h3>
        <p class="muted">Send one prompt several times at once. The server decodes all active sequences in the
          same batch, so the aggregate tokens/s climbs with N while each stream slows down only a little.
          Watch the batch size and the throughput chart in the right-hand panel.</p>
      </div>
      <div class="par-grid" :class="{ dense: runs.length > 8 }">
        <article v-for="r in runs" :key="r.id" class="stream" :class="r.state" data-testid="parallel-stream" :data-state="r.state">
          <header>
            <b>#{{ r.id }}</b>
            <span class="tag" :class="r.state">{{ r.state === 'waiting' ? 'queued' : r.state }}</span>
            <span class="grow"></span>
            <span class="tps"><b>{{ dash(r.tps, 1) }}</b> tok/s</span>
          </header>
          <div class="stream-text">{{ r.text }}</div>
          <div v-if="r.error" class="error-box">{{ r.error }}</div>
          <AnswerMeta :run="r" />
        </article>
      </div>
    </section>`,
};
