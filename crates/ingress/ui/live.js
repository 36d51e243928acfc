// One live subscription to a progress subtree over SSE (docs/contract.md §2 Live): `snapshot`, `update` and
// `delete` events. The browser's EventSource resends `Last-Event-ID` when it reconnects by
// itself; when it gives up (an HTTP error), this module reconnects with `?after=<last id>` after
// a backoff, so the stream resumes exactly where it stopped. The connection's state is shown in
// the page header for as long as a subscription is open.

import { eventsUrl, statusPath } from './api.js';

const conn = () => document.getElementById('conn');
const open = new Set();

function showState() {
  const el = conn();
  if (!el) return;
  const states = [...open].map((s) => s.state);
  if (!states.length) {
    el.hidden = true;
    return;
  }
  const state = states.includes('lost') ? 'lost' : states.includes('connecting') ? 'connecting' : 'live';
  el.hidden = false;
  el.dataset.state = state;
  el.textContent = { live: 'live', connecting: 'connecting…', lost: 'connection lost, reconnecting…' }[state];
}

/**
 * Watches `key` to `depth` levels with `limit` children per parent. Calls
 * `onSnapshot(node)`, `onUpdate(nodes)` and `onDelete(keys)`; returns `close()`.
 */
export function watch(key, { depth = 2, limit = 100, onSnapshot, onUpdate, onDelete }) {
  const sub = { state: 'connecting', lastId: null, source: null, timer: null, closed: false, retries: 0 };
  open.add(sub);
  showState();

  const connect = () => {
    const params = { depth: String(depth), limit: String(limit) };
    if (sub.lastId) params.after = sub.lastId;
    const source = new EventSource(eventsUrl(`${statusPath(key)}/events`, params));
    sub.source = source;
    const seen = (e) => {
      if (e.lastEventId) sub.lastId = e.lastEventId;
      sub.retries = 0;
      if (sub.state !== 'live') {
        sub.state = 'live';
        showState();
      }
    };
    source.onopen = () => {
      sub.state = 'live';
      sub.retries = 0;
      showState();
    };
    source.addEventListener('snapshot', (e) => {
      seen(e);
      onSnapshot?.(JSON.parse(e.data));
    });
    source.addEventListener('update', (e) => {
      seen(e);
      const data = JSON.parse(e.data);
      onUpdate?.(Array.isArray(data) ? data : data.nodes || [data]);
    });
    source.addEventListener('delete', (e) => {
      seen(e);
      onDelete?.(deletedKeys(JSON.parse(e.data)));
    });
    source.onerror = () => {
      if (sub.closed) return;
      sub.state = 'lost';
      showState();
      if (source.readyState === EventSource.CLOSED) {
        // The browser gave up (HTTP error or a non-SSE answer): reconnect ourselves.
        const delay = Math.min(30000, 500 * 2 ** sub.retries++);
        sub.timer = setTimeout(connect, delay);
      }
    };
  };
  connect();

  return () => {
    sub.closed = true;
    clearTimeout(sub.timer);
    sub.source?.close();
    open.delete(sub);
    showState();
  };
}

/** A `delete` event's keys, whichever shape it takes: [keys], [{key}], {keys}, {key} or "key". */
export function deletedKeys(data) {
  if (typeof data === 'string') return [data];
  if (Array.isArray(data)) return data.map((k) => (typeof k === 'string' ? k : k.key)).filter(Boolean);
  if (data && Array.isArray(data.keys)) return data.keys;
  if (data && Array.isArray(data.nodes)) return deletedKeys(data.nodes);
  if (data && data.key) return [data.key];
  return [];
}
