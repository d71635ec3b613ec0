// One line of per-answer telemetry: TTFT, tok/s, token usage, finish reason.
export default {
  name: 'AnswerMeta',
  props: { run: { type: Object, required: true } },
  setup() {
    const ms = (v) => (v < 1000 ? `${Math.round(v)} ms` : `${(v / 1000).toFixed(2)} s`);
    return { ms };
  },
  template: `
    <div class="meta" data-testid="answer-meta">
      <span v-if="run.state === 'waiting'" class="pulse">waiting for first token…</span>
      <span v-if="run.ttftMs != null" title="time to first token">TTFT <b data-testid="meta-ttft">{{ ms(run.ttftMs) }}</b></span>
      <span v-if="run.tps != null" title="decode speed">
        <b data-testid="meta-tps">{{ run.tps.toFixed(1) }}</b> tok/s</span>
      <template v-if="run.usage">
        <span title="prompt tokens">prompt <b data-testid="meta-prompt">{{ run.usage.prompt_tokens ?? '–' }}</b></span>
        <span title="completion tokens">completion <b data-testid="meta-completion">{{ run.usage.completion_tokens ?? '–' }}</b></span>
        <span title="prompt tokens served from the prefix cache">cached
          <b data-testid="meta-cached">{{ run.usage.prompt_tokens_details?.cached_tokens ?? '–' }}</b></span>
      </template>
      <span v-else-if="run.chunks" title="streamed chunks (usage not reported)">~{{ run.chunks }} tokens</span>
      <span v-if="run.finish" class="tag" :class="run.finish">{{ run.finish }}</span>
      <span v-if="run.state === 'stopped'" class="tag stopped">stopped</span>
    </div>`,
};
