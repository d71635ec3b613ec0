// Markdown -> sanitized HTML, with highlighted code blocks.
import { Marked } from 'marked';
import DOMPurify from 'dompurify';
import hljs from 'highlight.js';

const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => (
  { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));

function highlight(code, lang) {
  try {
    if (lang && hljs.getLanguage(lang)) return hljs.highlight(code, { language: lang, ignoreIllegals: true }).value;
    if (code.length < 4000) return hljs.highlightAuto(code).value;
  } catch { /* fall through to plain text */ }
  return escapeHtml(code);
}

const marked = new Marked({
  gfm: true,
  breaks: true,
  renderer: {
    code({ text, lang }) {
      const language = (lang || '').trim().split(/\s+/)[0];
      const label = language ? escapeHtml(language) : 'code';
      return `<div class="code-block"><div class="code-head"><span>${label}</span>`
        + '<button type="button" class="copy-code" title="Copy code">copy</button></div>'
        + `<pre><code class="hljs">${highlight(text, language)}</code></pre></div>`;
    },
  },
});

DOMPurify.addHook('afterSanitizeAttributes', (node) => {
  if (node.tagName === 'A') {
    node.setAttribute('target', '_blank');
    node.setAttribute('rel', 'noopener noreferrer');
  }
});

export function renderMarkdown(text) {
  return DOMPurify.sanitize(marked.parse(text || ''));
}

// Event delegation for the "copy" buttons inside rendered code blocks.
export function handleCopyClick(event) {
  const button = event.target.closest?.('.copy-code');
  if (!button) return;
  const code = button.closest('.code-block')?.querySelector('code')?.innerText ?? '';
  navigator.clipboard?.writeText(code).then(() => {
    button.textContent = 'copied';
    setTimeout(() => { button.textContent = 'copy'; }, 1200);
  }).catch(() => {});
}
