// The functions offered to the model (`tools`, `tool_choice`); its calls show in the chat, where a
// result can be sent back as a `tool` message.
import { computed } from 'vue';
import { tools, parseTools, TOOLS_EXAMPLE } from '../settings.js';

export default {
  name: 'ToolsPanel',
  setup() {
    const problem = computed(() => (tools.value.enabled ? parseTools(tools.value.json).error : null));
    return { tools, problem, reset: () => { tools.value.json = TOOLS_EXAMPLE; } };
  },
  template: `
    <section class="panel">
      <div class="panel-head">
        <h2>Tools</h2>
        <button type="button" class="link" @click="reset" data-testid="tools-reset">example</button>
      </div>
      <label class="field check"><input type="checkbox" v-model="tools.enabled" data-testid="tools-enabled">
        <span>Offer tools <code>tools</code></span></label>
      <template v-if="tools.enabled">
        <label class="field">
          <span>Functions (JSON)</span>
          <textarea v-model="tools.json" rows="8" class="mono" spellcheck="false" data-testid="tools-json"></textarea>
        </label>
        <label class="field">
          <span><code>tool_choice</code></span>
          <select v-model="tools.choice" data-testid="tools-choice">
            <option value="auto">auto</option>
            <option value="required">required</option>
            <option value="none">none</option>
          </select>
        </label>
        <p v-if="problem" class="error small" data-testid="tools-error">{{ problem }}: not sent</p>
      </template>
    </section>`,
};
