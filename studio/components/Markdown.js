// Renders one Markdown string; re-renders only when its own text changes.
import { computed } from 'vue';
import { renderMarkdown, handleCopyClick } from '../markdown.js';

export default {
  name: 'Markdown',
  props: { text: { type: String, default: '' } },
  setup(props) {
    return { html: computed(() => renderMarkdown(props.text)), handleCopyClick };
  },
  template: '<div class="md" v-html="html" @click="handleCopyClick"></div>',
};
