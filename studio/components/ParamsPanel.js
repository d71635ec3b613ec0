// Sampling parameters (remembered in localStorage).
import { params, resetParams } from '../settings.js';

const SLIDERS = [
  { key: 'temperature', label: 'temperature', min: 0, max: 2, step: 0.05 },
  { key: 'top_p', label: 'top_p', min: 0, max: 1, step: 0.01 },
  { key: 'min_p', label: 'min_p', min: 0, max: 1, step: 0.01 },
  { key: 'repeat_penalty', label: 'repeat_penalty', min: 0.8, max: 2, step: 0.01 },
];

export default {
  name: 'ParamsPanel',
  setup() {
    return { params, resetParams, SLIDERS };
  },
  template: `
    <section class="panel">
      <div class="panel-head">
        <h2>Parameters</h2>
        <button type="button" class="link" @click="resetParams" data-testid="params-reset">reset</button>
      </div>
      <div v-for="s in SLIDERS" :key="s.key" class="slider">
        <label :for="'p-' + s.key">{{ s.label }}</label>
        <input type="number" class="num" :id="'p-' + s.key" :min="s.min" :max="s.max" :step="s.step"
               v-model.number="params[s.key]" :data-testid="'param-' + s.key">
        <input type="range" :min="s.min" :max="s.max" :step="s.step" v-model.number="params[s.key]"
               :aria-label="s.label">
      </div>
      <div class="grid2">
        <label class="field"><span>top_k</span>
          <input type="number" min="0" step="1" v-model.number="params.top_k" data-testid="param-top_k"></label>
        <label class="field"><span>max_tokens</span>
          <input type="number" min="1" step="1" v-model.number="params.max_tokens" data-testid="param-max_tokens"></label>
        <label class="field"><span>seed</span>
          <input type="number" step="1" v-model="params.seed" placeholder="random" data-testid="param-seed"></label>
        <label class="field check"><input type="checkbox" v-model="params.json_mode" data-testid="param-json">
          <span>JSON mode</span></label>
      </div>
      <label class="field">
        <span>stop sequences <span class="muted">(one per line, \\n allowed)</span></span>
        <textarea v-model="params.stop" rows="2" data-testid="param-stop"></textarea>
      </label>
    </section>`,
};
