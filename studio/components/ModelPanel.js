// The model a request runs on: the service's profiles (GET /v1/profiles, POST /v1/models/switch)
// and the LoRA adapter every request asks for (GET /v1/lora-adapters, sent as `lora`).
import { ref, computed, onMounted, watch } from 'vue';
import { getJSON, postJSON } from '../api.js';
import { adapter } from '../settings.js';
import { server, refreshModel } from '../telemetry.js';

const SWITCH_TIMEOUT_MS = 600_000; // loading a large model takes minutes

export default {
  name: 'ModelPanel',
  setup() {
    const profiles = ref([]);
    const active = ref('');
    const chosen = ref('');
    const adapters = ref([]);
    const switching = ref('');
    const error = ref('');

    async function load() {
      try {
        const p = await getJSON('/v1/profiles');
        profiles.value = p.data || [];
        active.value = p.active_profile || '';
        if (!chosen.value) chosen.value = active.value;
        adapters.value = (await getJSON('/v1/lora-adapters')).data || [];
        // an adapter removed from the directory is no longer asked for
        if (adapter.value.name && !adapters.value.some((a) => a.name === adapter.value.name)) adapter.value.name = '';
      } catch (e) {
        error.value = e.message;
      }
    }

    async function switchProfile() {
      const name = chosen.value;
      if (!name || name === active.value || switching.value) return;
      switching.value = name;
      error.value = '';
      try {
        await postJSON('/v1/models/switch', { profile: name }, { timeout: SWITCH_TIMEOUT_MS });
        await refreshModel();
      } catch (e) {
        error.value = e.message;
      } finally {
        switching.value = '';
        await load();
      }
    }

    // the service came back (a restart may have changed its profiles or adapters)
    watch(() => server.health, (h, before) => { if (h === 'ok' && before !== 'ok') load(); });
    onMounted(load);

    const current = computed(() => profiles.value.find((p) => p.name === active.value));
    return { profiles, active, chosen, adapters, adapter, switching, error, current, switchProfile };
  },
  template: `
    <section class="panel" data-testid="model-panel">
      <h2>Model</h2>
      <div class="field">
        <span>Profile <code v-if="profiles.length > 1">POST /v1/models/switch</code></span>
        <div v-if="profiles.length > 1" class="row">
          <select v-model="chosen" :disabled="!!switching" data-testid="profile-select">
            <option v-for="p in profiles" :key="p.name" :value="p.name">{{ p.name }}{{ p.active ? ' (active)' : '' }}</option>
          </select>
          <button type="button" @click="switchProfile" data-testid="profile-switch"
                  :disabled="!!switching || !chosen || chosen === active">Switch</button>
        </div>
        <span v-if="switching" class="pulse" data-testid="profile-switching">loading {{ switching }}…</span>
        <span v-else-if="current" class="small" data-testid="profile-active">serving <b>{{ current.name }}</b>
          <span v-if="current.display_name && current.display_name !== current.name"
          class="muted"> · {{ current.display_name }}</span></span>
      </div>
      <div v-if="adapters.length" class="field">
        <span>LoRA adapter <code>lora</code></span>
        <div class="row">
          <select v-model="adapter.name" data-testid="adapter-select">
            <option value="">(base model)</option>
            <option v-for="a in adapters" :key="a.name" :value="a.name">{{ a.name }}</option>
          </select>
          <input type="number" class="num" min="-4" max="4" step="0.1" v-model.number="adapter.scale"
                 :disabled="!adapter.name" title="scale" aria-label="adapter scale" data-testid="adapter-scale">
        </div>
      </div>
      <p v-if="error" class="error small" data-testid="model-error">{{ error }}</p>
    </section>`,
};
