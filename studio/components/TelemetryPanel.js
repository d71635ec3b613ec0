// Server-wide telemetry: health, model, /stats counters, throughput chart, speculative drafts' acceptance
// and the tenants' shares.
import { computed } from 'vue';
import { server } from '../telemetry.js';
import Sparkline from './Sparkline.js';

const HEALTH_LABEL = { ok: 'ready', loading: 'loading model', down: 'unreachable', unknown: 'connecting' };
const MAX_TENANTS = 8; // the busiest; /stats lists every tenant seen lately
const fmt = (v, digits = 0) => (v === null || v === undefined || !Number.isFinite(Number(v))
  ? '–' : Number(v).toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: digits }));

export default {
  name: 'TelemetryPanel',
  components: { Sparkline },
  setup() {
    const s = computed(() => server.stats || {});
    const kvPct = computed(() => {
      const { kv_used: used, kv_total: total } = s.value;
      return total > 0 ? Math.min(100, (100 * used) / total) : null;
    });
    const last = computed(() => server.history.at(-1)?.v ?? null);
    // each tenant's share of the service so far (requests without x-tenant-id are one tenant, named '')
    const tenants = computed(() => Object.entries(s.value.tenants || {})
      .map(([name, t]) => ({ name, ...t }))
      .sort((a, b) => (b.share || 0) - (a.share || 0))
      .slice(0, MAX_TENANTS));
    // speculative decoding (docs/speculative.md): how many drafted tokens held, overall and by source
    const drafts = computed(() => {
      const sp = s.value.speculative;
      if (!sp || !sp.drafted) return null;
      const sources = Object.entries(sp.acceptance || {}).filter(([, rate]) => rate !== null);
      return { drafted: sp.drafted, accepted: sp.accepted, rate: sp.accepted / sp.drafted, sources };
    });
    return { server, s, kvPct, last, tenants, drafts, fmt, healthLabel: computed(() => HEALTH_LABEL[server.health]) };
  },
  template: `
    <section class="panel telemetry" data-testid="telemetry">
      <h2>Server</h2>
      <div class="health-row">
        <span class="dot" :class="server.health" data-testid="health-dot" :data-state="server.health"></span>
        <span data-testid="health-label">{{ healthLabel }}</span>
      </div>
      <div class="model" title="model" data-testid="model-name">{{ server.model || s.model || '–' }}</div>

      <div class="stat-grid">
        <div class="stat"><label>running</label><b data-testid="stat-running">{{ fmt(s.running) }}</b></div>
        <div class="stat"><label>waiting</label><b data-testid="stat-waiting">{{ fmt(s.waiting) }}</b></div>
        <div class="stat"><label>batch size</label><b data-testid="stat-batch">{{ fmt(s.last_batch_size) }}</b></div>
        <div class="stat"><label>decode tok/s</label><b data-testid="stat-tps">{{ fmt(s.tokens_per_second, 1) }}</b></div>
      </div>

      <div class="kv">
        <div class="kv-label"><label>KV cache</label>
          <span data-testid="stat-kv">{{ kvPct === null ? '–' : fmt(s.kv_used) + ' / ' + fmt(s.kv_total) + ' (' + fmt(kvPct, 0) + '%)' }}</span>
        </div>
        <div class="bar"><div class="fill" :style="{ width: (kvPct || 0) + '%' }"></div></div>
      </div>

      <div class="chart">
        <div class="kv-label"><label>throughput (60 s)</label>
          <span data-testid="stat-throughput">{{ fmt(last, 0) }} tok/s</span>
        </div>
        <Sparkline :points="server.history" />
      </div>

      <dl class="counters">
        <dt>generated tokens</dt><dd data-testid="stat-generated">{{ fmt(s.generated_tokens) }}</dd>
        <dt>decode steps</dt><dd>{{ fmt(s.steps) }}</dd>
        <dt>prefix-cache hits</dt><dd>{{ fmt(s.prefix_hit_tokens) }} tok</dd>
        <dt>workers alive</dt><dd>{{ fmt(s.workers_alive) }}</dd>
      </dl>
      <div v-if="drafts" class="kv" data-testid="drafts">
        <div class="kv-label"><label>drafted tokens accepted</label>
          <span data-testid="stat-acceptance">{{ fmt(drafts.accepted) }} / {{ fmt(drafts.drafted) }} ({{ fmt(100 * drafts.rate) }}%)</span>
        </div>
        <div class="bar"><div class="fill" :style="{ width: 100 * drafts.rate + '%' }"></div></div>
        <div class="muted small" data-testid="drafts-by-source">
          <span v-for="[source, rate] in drafts.sources" :key="source">{{ source }} {{ fmt(100 * rate) }}% </span>
        </div>
      </div>
      <div v-if="tenants.length" class="tenants" data-testid="tenants">
        <div class="kv-label"><label>tenants (share of the service)</label></div>
        <div v-for="t in tenants" :key="t.name" class="tenant" data-testid="tenant-row" :data-tenant="t.name">
          <div class="kv-label">
            <span class="tenant-name" :class="{ muted: !t.name }">{{ t.name || '(no tenant id)' }}</span>
            <span>{{ fmt(t.running) }} running · {{ fmt(t.waiting) }} waiting · {{ fmt(100 * (t.share || 0)) }}%</span>
          </div>
          <div class="bar"><div class="fill" :style="{ width: 100 * (t.share || 0) + '%' }"></div></div>
        </div>
      </div>
      <p v-if="server.statsError" class="muted small" data-testid="stats-error">/stats: {{ server.statsError }}</p>
    </section>`,
};
