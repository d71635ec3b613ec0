// Tiny SVG sparkline of { t, v } points over a fixed time window.
import { computed } from 'vue';

export default {
  name: 'Sparkline',
  props: {
    points: { type: Array, required: true },
    windowMs: { type: Number, default: 60_000 },
    width: { type: Number, default: 240 },
    height: { type: Number, default: 56 },
  },
  setup(props) {
    const max = computed(() => Math.max(1, ...props.points.map((p) => p.v)));
    const path = computed(() => {
      const pts = props.points;
      if (pts.length < 2) return null;
      const end = pts[pts.length - 1].t;
      const { width: w, height: h } = props;
      const xy = pts.map((p) => [
        w - ((end - p.t) / props.windowMs) * w,
        h - 2 - (p.v / max.value) * (h - 6),
      ].map((n) => n.toFixed(1)).join(','));
      return { line: xy.join(' '), area: `${xy[0].split(',')[0]},${h} ${xy.join(' ')} ${w},${h}` };
    });
    return { max, path };
  },
  template: `
    <div class="sparkline-wrap">
      <span class="peak">{{ points.length ? 'peak ' + Math.round(max) + ' tok/s' : 'no data yet' }}</span>
      <svg class="sparkline" :viewBox="'0 0 ' + width + ' ' + height" preserveAspectRatio="none" role="img"
           :aria-label="'throughput, peak ' + Math.round(max) + ' tokens per second'">
        <line :x1="0" :x2="width" :y1="height - 0.5" :y2="height - 0.5" class="axis" />
        <template v-if="path">
          <polygon :points="path.area" class="area" />
          <polyline :points="path.line" class="line" />
        </template>
      </svg>
    </div>`,
};
