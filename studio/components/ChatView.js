// Chat: streaming answers, stop, regenerate, clear, export. The service is
// stateless: every request carries the whole conversation kept in the browser.
import { ref, reactive, computed, watch, nextTick, onMounted, onBeforeUnmount } from 'vue';
import { runGeneration } from '../api.js';
import { curlCommand } from '../params.js';
import { params, systemPrompt, ragContext, adapter, chatRequest } from '../settings.js';
import { persisted, load, save } from '../storage.js';
import { server } from '../telemetry.js';
import Markdown from './Markdown.js';
import AnswerMeta from './AnswerMeta.js';

const uid = () => Math.random().toString(36).slice(2, 10);

const EXAMPLES = [
  'Explain KV-cache reuse in two sentences.',
  'Write a Python function that checks whether a string is a palindrome.',
  'Give me three name ideas for a coffee shop, as a Markdown list.',
];

export default {
  name: 'ChatView',
  components: { Markdown, AnswerMeta },
  setup() {
    const messages = persisted('chat', []);
    // Answers cut by a page reload were interrupted.
    for (const m of messages.value) if (m.state === 'waiting' || m.state === 'streaming') m.state = 'stopped';

    const input = ref(load('draft', ''));
    const busy = ref(false);
    const notice = ref('');
    const scroller = ref(null);
    const textarea = ref(null);
    let controller = null;
    let stick = true;

    // The conversation as the API takes it: an answer with its tool calls, each call's result a `tool` turn.
    const history = () => messages.value
      .filter((m) => m.role !== 'assistant' || ((m.text || m.toolCalls?.length) && m.state !== 'error'))
      .map(toApi);

    function toApi(m) {
      if (m.role === 'tool') return { role: 'tool', tool_call_id: m.callId, content: m.text };
      if (m.role === 'assistant' && m.toolCalls?.length) {
        return {
          role: 'assistant', content: m.text || null,
          tool_calls: m.toolCalls.map((c) => ({ id: c.id, type: 'function', function: { name: c.name, arguments: c.arguments } })),
        };
      }
      return { role: m.role, content: m.text };
    }

    // A tool call's result, typed by the user; the answer goes on once every call of the turn has one.
    const drafts = reactive({});
    const answered = (id) => messages.value.some((m) => m.role === 'tool' && m.callId === id);
    const lastAnswer = computed(() => messages.value.findLast((m) => m.role === 'assistant'));
    function sendResult(turn, call) {
      const text = (drafts[call.id] ?? '').trim();
      if (!text || busy.value) return;
      messages.value.push({ id: uid(), role: 'tool', callId: call.id, name: call.name, text });
      delete drafts[call.id];
      if (turn.toolCalls.every((c) => answered(c.id))) generate();
    }

    async function generate() {
      const body = chatRequest(history(), server.model);
      messages.value.push({ id: uid(), role: 'assistant', text: '', state: 'waiting' });
      const msg = messages.value[messages.value.length - 1]; // the reactive proxy
      controller = new AbortController();
      busy.value = true;
      stick = true;
      try {
        await runGeneration(body, msg, controller.signal);
      } finally {
        busy.value = false;
        controller = null;
        nextTick(() => textarea.value?.focus());
      }
    }

    function send() {
      const text = input.value;
      if (!text.trim() || busy.value) return;
      input.value = '';
      messages.value.push({ id: uid(), role: 'user', text });
      generate();
    }

    function stop() {
      controller?.abort();
    }

    function regenerate() {
      if (busy.value) return;
      if (messages.value.at(-1)?.role === 'assistant') messages.value.pop();
      if (['user', 'tool'].includes(messages.value.at(-1)?.role)) generate();
    }

    function clear() {
      stop();
      messages.value = [];
    }

    const canRegenerate = computed(() => !busy.value && messages.value.some((m) => m.role === 'user'));

    function exportJson() {
      const data = {
        exported_at: new Date().toISOString(),
        model: server.model,
        system_prompt: systemPrompt.value,
        rag_context: ragContext.value,
        params: params.value,
        lora_adapter: adapter.value.name ? adapter.value : null,
        messages: messages.value.map((m) => ({
          ...toApi(m),
          ...(m.role === 'assistant' ? {
            reasoning_content: m.reasoning || null,
            state: m.state, finish_reason: m.finish ?? null, usage: m.usage ?? null,
            ttft_ms: m.ttftMs ?? null, tokens_per_second: m.tps ?? null, error: m.error ?? null,
          } : {}),
        })),
      };
      const blob = new Blob([JSON.stringify(data, null, 2)], { type: 'application/json' });
      const a = document.createElement('a');
      a.href = URL.createObjectURL(blob);
      a.download = `sentiric-chat-${new Date().toISOString().slice(0, 19).replace(/[:T]/g, '-')}.json`;
      a.click();
      setTimeout(() => URL.revokeObjectURL(a.href), 1000);
    }

    function flash(text) {
      notice.value = text;
      setTimeout(() => { if (notice.value === text) notice.value = ''; }, 1800);
    }

    async function copy(text, what) {
      try {
        await navigator.clipboard.writeText(text);
        flash(`${what} copied`);
      } catch {
        flash('clipboard not available');
      }
    }

    function copyCurl() {
      const body = chatRequest([...history(), ...(input.value.trim() ? [{ role: 'user', content: input.value }] : [])],
        server.model);
      copy(curlCommand(body), 'curl command');
    }

    function onKey(e) {
      if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        send();
      } else if (e.key === 'Escape' && busy.value) {
        stop();
      }
    }

    // Keep the newest text in view unless the user scrolled up to read.
    function onScroll() {
      const el = scroller.value;
      stick = el.scrollTop + el.clientHeight >= el.scrollHeight - 48;
    }
    watch(() => [messages.value.length, messages.value.at(-1)?.text, messages.value.at(-1)?.state], () => {
      if (stick && scroller.value) scroller.value.scrollTop = scroller.value.scrollHeight;
    }, { flush: 'post' });

    // Persist the draft and grow the textarea with its content.
    watch(input, (v) => {
      save('draft', v);
      nextTick(() => {
        const el = textarea.value;
        if (!el) return;
        el.style.height = 'auto';
        el.style.height = `${Math.min(el.scrollHeight, 220)}px`;
      });
    });

    const onGlobalKey = (e) => { if (e.key === 'Escape' && busy.value) stop(); };
    onMounted(() => {
      addEventListener('keydown', onGlobalKey);
      if (scroller.value) scroller.value.scrollTop = scroller.value.scrollHeight;
      textarea.value?.focus();
    });
    onBeforeUnmount(() => removeEventListener('keydown', onGlobalKey));

    return {
      messages, input, busy, notice, scroller, textarea, EXAMPLES, canRegenerate, drafts, answered, lastAnswer,
      send, stop, regenerate, clear, exportJson, copy, copyCurl, onKey, onScroll, sendResult,
    };
  },
  template: `
    <section class="chat">
      <div class="messages" ref="scroller" @scroll.passive="onScroll" data-testid="messages">
        <div v-if="!messages.length" class="empty">
          <h3>Chat with the model</h3>
          <p class="muted">Answers stream token by token. The whole conversation is sent with every request,
            together with the system prompt and RAG context from the sidebar.</p>
          <div class="examples">
            <button v-for="ex in EXAMPLES" :key="ex" type="button" class="example" @click="input = ex; send()">{{ ex }}</button>
          </div>
        </div>
        <article v-for="(m, i) in messages" :key="m.id" class="msg" :class="[m.role, m.state]"
                 :data-testid="'msg-' + m.role" :data-state="m.state || 'done'">
          <header>
            <span class="who">{{ { user: 'You', assistant: 'Assistant', tool: 'Tool result · ' + m.name }[m.role] }}</span>
            <button type="button" class="link" v-if="m.text" @click="copy(m.text, 'message')">copy</button>
          </header>
          <div v-if="m.role !== 'assistant'" class="plain" data-testid="msg-text">{{ m.text }}</div>
          <template v-else>
            <details v-if="m.reasoning" class="thinking" :open="m.state === 'streaming' && !m.text"
                     data-testid="msg-reasoning">
              <summary>Thinking <span class="muted">reasoning_content · {{ m.reasoning.length.toLocaleString() }} chars</span></summary>
              <div class="plain">{{ m.reasoning }}</div>
            </details>
            <Markdown v-if="m.text" :text="m.text" :class="{ cursor: m.state === 'streaming' }" data-testid="msg-text" />
            <div v-else-if="m.state === 'done' && !m.toolCalls?.length" class="muted">{{ m.reasoning ? '(no answer after the thinking)' : '(empty answer)' }}</div>
            <div v-for="c in m.toolCalls || []" :key="c.id" class="tool-call" data-testid="msg-tool-call">
              <code>{{ c.name }}({{ c.arguments }})</code>
              <form v-if="m === lastAnswer && m.state === 'done' && !answered(c.id)" class="row"
                    @submit.prevent="sendResult(m, c)">
                <input v-model="drafts[c.id]" placeholder='its result, e.g. {"temp_c": 21}' data-testid="tool-result">
                <button type="submit" :disabled="busy || !drafts[c.id]?.trim()" data-testid="tool-result-send">Send result</button>
              </form>
            </div>
            <div v-if="m.error" class="error-box" data-testid="msg-error">{{ m.error }}</div>
            <AnswerMeta :run="m" />
          </template>
        </article>
      </div>

      <form class="composer" @submit.prevent="send">
        <textarea ref="textarea" v-model="input" rows="2" @keydown="onKey" data-testid="chat-input"
                  placeholder="Message…  (Enter to send, Shift+Enter for a new line, Esc to stop)"></textarea>
        <div class="composer-bar">
          <button v-if="!busy" type="submit" class="primary" :disabled="!input.trim()" data-testid="send-button">Send</button>
          <button v-else type="button" class="danger" @click="stop" data-testid="stop-button">■ Stop</button>
          <button type="button" @click="regenerate" :disabled="!canRegenerate" data-testid="regenerate-button">↻ Regenerate</button>
          <button type="button" @click="clear" :disabled="!messages.length" data-testid="clear-button">Clear</button>
          <span class="grow muted small center">{{ notice }}</span>
          <button type="button" class="ghost" @click="copyCurl" title="Copy the next request as a curl command">curl</button>
          <button type="button" class="ghost" @click="exportJson" :disabled="!messages.length" data-testid="export-button">Export JSON</button>
        </div>
      </form>
    </section>`,
};
