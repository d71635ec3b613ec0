// Sentiric Studio: root component and mount.
import { createApp, ref, watch } from 'vue';
import { API_BASE } from './api.js';
import { server, startTelemetry } from './telemetry.js';
import { load, save } from './storage.js';
import ChatView from './components/ChatView.js';
import ParallelView from './components/ParallelView.js';
import ModelPanel from './components/ModelPanel.js';
import ContextPanel from './components/ContextPanel.js';
import ToolsPanel from './components/ToolsPanel.js';
import ParamsPanel from './components/ParamsPanel.js';
import TelemetryPanel from './components/TelemetryPanel.js';

const App = {
  name: 'App',
  components: { ChatView, ParallelView, ModelPanel, ContextPanel, ToolsPanel, ParamsPanel, TelemetryPanel },
  setup() {
    const tab = ref(load('tab', 'chat') === 'parallel' ? 'parallel' : 'chat');
    watch(tab, (t) => save('tab', t));
    startTelemetry();
    return { tab, server, apiBase: API_BASE || location.origin };
  },
  template: `
    <div class="layout">
      <header class="topbar">
        <div class="brand"><span class="logo">◆</span> Sentiric <span class="muted">Studio</span></div>
        <nav class="tabs" role="tablist">
          <button type="button" role="tab" :aria-selected="tab === 'chat'" :class="{ active: tab === 'chat' }"
                  @click="tab = 'chat'" data-testid="tab-chat">Chat</button>
          <button type="button" role="tab" :aria-selected="tab === 'parallel'" :class="{ active: tab === 'parallel' }"
                  @click="tab = 'parallel'" data-testid="tab-parallel">Parallel</button>
        </nav>
        <div class="grow"></div>
        <div class="server-pill" :title="apiBase">
          <span class="dot" :class="server.health"></span>
          <span>{{ server.model || 'no model' }}</span>
        </div>
      </header>
      <div class="sidebars">
        <aside class="sidebar left">
          <ModelPanel />
          <ContextPanel />
          <ToolsPanel />
          <ParamsPanel />
        </aside>
        <aside class="sidebar right">
          <TelemetryPanel />
        </aside>
      </div>
      <main class="main">
        <ChatView v-show="tab === 'chat'" />
        <ParallelView v-show="tab === 'parallel'" />
      </main>
    </div>`,
};

createApp(App).mount('#app');
