// The platform's own request fields: system_prompt and rag_context.
import { ref } from 'vue';
import { systemPrompt, ragContext, ragFileName } from '../settings.js';

const MAX_FILE_BYTES = 2 * 1024 * 1024;

export default {
  name: 'ContextPanel',
  setup() {
    const fileInput = ref(null);
    const fileError = ref('');
    async function loadFile(event) {
      const file = event.target.files?.[0];
      event.target.value = '';
      if (!file) return;
      fileError.value = '';
      if (file.size > MAX_FILE_BYTES) {
        fileError.value = `${file.name} is larger than 2 MB`;
        return;
      }
      ragContext.value = await file.text();
      ragFileName.value = file.name;
    }
    function clearRag() {
      ragContext.value = '';
      ragFileName.value = '';
    }
    return { systemPrompt, ragContext, ragFileName, fileInput, fileError, loadFile, clearRag };
  },
  template: `
    <section class="panel">
      <h2>Context</h2>
      <label class="field">
        <span>System prompt <code>system_prompt</code></span>
        <textarea v-model="systemPrompt" rows="3" data-testid="system-prompt"
                  placeholder="You are a helpful assistant."></textarea>
      </label>
      <label class="field">
        <span>RAG context <code>rag_context</code></span>
        <textarea v-model="ragContext" rows="5" data-testid="rag-context"
                  @input="ragFileName = ''"
                  placeholder="Paste reference text, or load a .txt / .md file"></textarea>
      </label>
      <div class="row small">
        <button type="button" class="ghost" @click="fileInput.click()" data-testid="rag-load">Load file…</button>
        <button type="button" class="ghost" @click="clearRag" :disabled="!ragContext" data-testid="rag-clear">Clear</button>
        <span class="muted grow ta-right">{{ ragFileName ? ragFileName + ' · ' : '' }}{{ ragContext.length.toLocaleString() }} chars</span>
        <input ref="fileInput" type="file" accept=".txt,.md,.markdown,text/plain,text/markdown" hidden
               @change="loadFile" data-testid="rag-file">
      </div>
      <p v-if="fileError" class="error small">{{ fileError }}</p>
    </section>`,
};
