// Thin client for the Sentiric LLM Llama Service HTTP API: JSON helpers,
// readable errors and a hand-written SSE parser over fetch + ReadableStream.

// The studio is served by the service itself, so the API lives on the same
// origin. `?api=http://host:port` points it elsewhere (that server must send
// CORS headers).
const override = new URLSearchParams(location.search).get('api');
export const API_BASE = override ? override.replace(/\/+$/, '') : '';

export class ApiError extends Error {
  constructor(message, { status = 0, type = null, code = null, param = null } = {}) {
    super(message);
    this.name = 'ApiError';
    Object.assign(this, { status, type, code, param });
  }
}

// OpenAI error bodies look like {"error": {"message", "type", "param", "code"}}.
// Anything else is shown as its text, never as raw JSON when a message exists.
export function errorFromBody(body, status = 0) {
  const err = body && typeof body === 'object' ? (body.error ?? body) : body;
  if (typeof err === 'string') return new ApiError(err, { status });
  if (err && typeof err.message === 'string') {
    return new ApiError(err.message, { status, type: err.type, code: err.code, param: err.param });
  }
  return new ApiError(`HTTP ${status}: ${JSON.stringify(body).slice(0, 300)}`, { status });
}

async function errorFromResponse(res) {
  const text = await res.text().catch(() => '');
  try {
    return errorFromBody(JSON.parse(text), res.status);
  } catch {
    const msg = text.trim().slice(0, 500) || res.statusText || 'request failed';
    return new ApiError(`HTTP ${res.status}: ${msg}`, { status: res.status });
  }
}

// Telemetry requests use credentials:'omit'. Chromium keeps those in their
// own connection pool, so polling keeps working while the per-host limit of
// six HTTP/1.1 connections is taken by streaming generations.
export async function getJSON(path, { timeout = 3000 } = {}) {
  let res;
  try {
    res = await fetch(API_BASE + path, {
      cache: 'no-store', credentials: 'omit', signal: AbortSignal.timeout(timeout),
    });
  } catch (e) {
    throw new ApiError(`Cannot reach the server (${e.name === 'TimeoutError' ? 'timeout' : e.message})`);
  }
  if (!res.ok) throw await errorFromResponse(res);
  return res.json();
}

// POST a JSON body (same connection pool as telemetry); the answer's JSON, or an ApiError.
export async function postJSON(path, body, { timeout = 3000 } = {}) {
  let res;
  try {
    res = await fetch(API_BASE + path, {
      method: 'POST', credentials: 'omit', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(body), signal: AbortSignal.timeout(timeout),
    });
  } catch (e) {
    throw new ApiError(`Cannot reach the server (${e.name === 'TimeoutError' ? 'timeout' : e.message})`);
  }
  if (!res.ok) throw await errorFromResponse(res);
  return res.json();
}

// Returns 'ok' (200), 'loading' (503) or 'down' (unreachable / other status).
export async function getHealth() {
  try {
    const res = await fetch(API_BASE + '/health', {
      cache: 'no-store', credentials: 'omit', signal: AbortSignal.timeout(3000),
    });
    res.body?.cancel().catch(() => {});
    if (res.status === 200) return 'ok';
    if (res.status === 503) return 'loading';
    return 'down';
  } catch {
    return 'down';
  }
}

// Yields the data of each server-sent event (multi-line data joined by "\n").
export async function* sseData(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        let line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line.endsWith('\r')) line = line.slice(0, -1);
        if (line === '') {
          if (data.length) yield data.join('\n');
          data = [];
        } else if (line.startsWith('data:')) {
          data.push(line.slice(line[5] === ' ' ? 6 : 5));
        } // comments (":") and other fields (event:, id:, retry:) are ignored
      }
    }
    if (buf.startsWith('data:')) data.push(buf.slice(buf[5] === ' ' ? 6 : 5));
    if (data.length) yield data.join('\n');
  } finally {
    reader.cancel().catch(() => {});
  }
}

// POST /v1/chat/completions with stream:true; yields each parsed chunk until
// `data: [DONE]`. Aborting `signal` closes the connection, which makes the
// server cancel the generation.
export async function* streamChat(body, signal, credentials = 'same-origin') {
  let res;
  try {
    res = await fetch(API_BASE + '/v1/chat/completions', {
      method: 'POST',
      credentials,
      headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
      body: JSON.stringify({ ...body, stream: true }),
      signal,
    });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(`Cannot reach the server (${e.message})`);
  }
  if (!res.ok) throw await errorFromResponse(res);
  if (!(res.headers.get('content-type') || '').includes('text/event-stream')) {
    const j = await res.json().catch(() => null);
    if (j?.error) throw errorFromBody(j, res.status);
    throw new ApiError('The server did not answer with an event stream.');
  }
  for await (const data of sseData(res.body)) {
    if (data.trim() === '[DONE]') return;
    let chunk;
    try {
      chunk = JSON.parse(data);
    } catch {
      throw new ApiError(`Malformed stream data: ${data.slice(0, 200)}`);
    }
    if (chunk.error) throw errorFromBody(chunk, res.status);
    yield chunk;
  }
}

// Runs one streaming generation and keeps `run` (a reactive object) up to date:
// text, the thinking section apart from it (`reasoning_content`), the tool
// calls (`{id, name, arguments}`), timing (TTFT,
// tok/s), usage and final state. Text updates are batched per animation frame
// so a fast stream does not re-render on every token.
// `credentials` picks the browser's connection pool (see parallel mode).
export async function runGeneration(body, run, signal, credentials = 'same-origin') {
  Object.assign(run, {
    text: '', reasoning: '', toolCalls: [], state: 'waiting', error: null, usage: null, finish: null,
    startedAt: performance.now(), firstAt: null, lastAt: null, endedAt: null,
    chunks: 0, ttftMs: null, tps: null,
  });
  const pending = { text: '', reasoning: '' };
  let frame = 0;
  const flush = () => {
    frame = 0;
    for (const k in pending) if (pending[k]) { run[k] += pending[k]; pending[k] = ''; }
    updateRate(run);
  };
  try {
    for await (const chunk of streamChat(body, signal, credentials)) {
      if (chunk.usage) run.usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const content = choice.delta?.content;
        const reasoning = choice.delta?.reasoning_content;
        const calls = choice.delta?.tool_calls;
        for (const c of calls || []) {  // a call's id and name come first, its arguments in pieces
          const call = (run.toolCalls[c.index] ??= { id: '', name: '', arguments: '' });
          if (c.id) call.id = c.id;
          call.name += c.function?.name || '';
          call.arguments += c.function?.arguments || '';
        }
        if (content || reasoning || calls?.length) {
          const now = performance.now();
          if (run.firstAt === null) {
            run.firstAt = now;
            run.ttftMs = now - run.startedAt;
            run.state = 'streaming';
          }
          run.lastAt = now;
          run.chunks += 1;
          if (content) pending.text += content;
          if (reasoning) pending.reasoning += reasoning;
          if (!frame) frame = requestAnimationFrame(flush);
        }
        if (choice.finish_reason) run.finish = choice.finish_reason;
      }
    }
    run.state = 'done';
  } catch (e) {
    if (e.name === 'AbortError') run.state = 'stopped';
    else { run.state = 'error'; run.error = e.message || String(e); }
  } finally {
    if (frame) cancelAnimationFrame(frame);
    flush();
    run.endedAt = performance.now();
    updateRate(run, true);
  }
  return run;
}

// Decode speed: tokens after the first one over the time since the first one.
function updateRate(run, final = false) {
  if (run.firstAt === null) return;
  const n = final && run.usage?.completion_tokens ? run.usage.completion_tokens : run.chunks;
  const end = final ? (run.lastAt ?? run.endedAt) : performance.now();
  const secs = (end - run.firstAt) / 1000;
  if (n > 1 && secs > 0) run.tps = (n - 1) / secs;
}
