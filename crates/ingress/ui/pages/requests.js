// Requests: the list (newest first, filtered by state and handler, paged) and a request's page
// (its record, payload, result or error, its live progress tree, cancel and retry).

import { api } from '../api.js';
import { clear, h, setText } from '../dom.js';
import { clock, duration, isoTime, json, relative } from '../format.js';
import { navigate } from '../nav.js';
import { treeView } from '../tree.js';

export const STATES = ['queued', 'running', 'succeeded', 'failed', 'canceled', 'dead'];
const TERMINAL = new Set(['succeeded', 'canceled', 'dead']);

function timeCell(ms) {
  return typeof ms === 'number'
    ? h('time', { datetime: isoTime(ms), title: clock(ms) }, relative(ms))
    : h('span.none', null, '–');
}

/** `/requests?state=&handler=&after=` */
export function requestsPage(main, params) {
  const state = params.get('state') || '';
  const handler = params.get('handler') || '';
  const after = params.get('after') || '';
  document.title = 'Requests · Cairn';

  const stateSelect = h('select', { id: 'filter-state', name: 'state' },
    h('option', { value: '' }, 'any state'),
    STATES.map((s) => h('option', { value: s, selected: s === state }, s)));
  const handlerInput = h('input', { id: 'filter-handler', name: 'handler', value: handler, placeholder: 'any handler', autocomplete: 'off' });
  const form = h('form.filters', {
    onsubmit(e) {
      e.preventDefault();
      const q = new URLSearchParams();
      if (stateSelect.value) q.set('state', stateSelect.value);
      if (handlerInput.value.trim()) q.set('handler', handlerInput.value.trim());
      navigate(`/requests${q.size ? `?${q}` : ''}`);
    },
  },
  h('label', { for: 'filter-state' }, 'State'), stateSelect,
  h('label', { for: 'filter-handler' }, 'Handler'), handlerInput,
  h('button', { type: 'submit' }, 'Filter'));

  const status = h('p.notice', { role: 'status' }, 'Loading…');
  const body = h('tbody');
  const table = h('table.list', { hidden: true },
    h('caption.sr', null, 'Requests, newest first'),
    h('thead', null, h('tr', null, ['Request', 'Handler', 'State', 'Attempts', 'Created', 'Finished'].map((t) => h('th', { scope: 'col' }, t)))),
    body);
  const pager = h('nav.pager', { 'aria-label': 'Pages of requests' });
  main.append(h('h1', null, 'Requests'), form, status, h('div.scroll', null, table), pager);

  const q = new URLSearchParams({ limit: '50' });
  if (state) q.set('state', state);
  if (handler) q.set('handler', handler);
  if (after) q.set('after', after);
  const controller = new AbortController();
  api(`/v1/requests?${q}`, { signal: controller.signal })
    .then(({ items, next }) => {
      status.hidden = items.length > 0;
      status.textContent = after ? 'No more requests.' : 'No requests match.';
      table.hidden = items.length === 0;
      for (const r of items) {
        body.append(h('tr', { dataset: { state: r.state } },
          h('td', null, h('a.id', { href: `/requests/${r.id}`, dataset: { nav: '' }, title: r.id }, r.id.slice(0, 8))),
          h('td', null, r.handler),
          h('td', null, h('span.badge', { dataset: { status: r.state } }, r.state)),
          h('td', null, `${r.attempts}/${r.max_attempts}`),
          h('td', null, timeCell(r.created_at)),
          h('td', null, timeCell(r.finished_at))));
      }
      const keep = new URLSearchParams();
      if (state) keep.set('state', state);
      if (handler) keep.set('handler', handler);
      if (after) pager.append(h('a', { href: `/requests${keep.size ? `?${keep}` : ''}`, dataset: { nav: '' } }, '« Newest'));
      if (next) {
        keep.set('after', next);
        pager.append(h('a.next', { href: `/requests?${keep}`, dataset: { nav: '' }, rel: 'next' }, 'Older »'));
      }
    })
    .catch((e) => {
      if (e.name === 'AbortError') return;
      status.textContent = `Cannot list requests: ${e.message}`;
      status.classList.add('error');
    });
  return () => controller.abort();
}

/** `/requests/{id}` */
export function requestPage(main, id) {
  document.title = `Request ${id.slice(0, 8)} · Cairn`;
  const controller = new AbortController();
  const { signal } = controller;
  let closeTree = null;
  let record = null;
  let refreshing = null;

  const title = h('h1', null, 'Request ', h('code', null, id));
  const state = h('span.badge.state', { id: 'request-state', role: 'status' });
  const actions = h('div.actions');
  const message = h('p.notice', { role: 'alert', hidden: true });
  const facts = h('dl.facts');
  const payload = h('pre.json', { id: 'request-payload', tabindex: '0' });
  const outcome = h('div.outcome');
  const treeBox = h('div.tree');
  const treeHead = h('h2', null, 'Progress');
  main.append(
    h('nav.crumbs', { 'aria-label': 'Breadcrumbs' }, h('ol', null, h('li', null, h('a', { href: '/requests', dataset: { nav: '' } }, 'Requests')), h('li', null, h('span', { 'aria-current': 'page' }, id.slice(0, 8))))),
    title, h('div.state-line', null, state, actions), message, facts, outcome,
    h('h2', null, 'Payload'), payload, treeHead, treeBox);

  function fail(text) {
    message.textContent = text;
    message.hidden = false;
    message.classList.add('error');
  }

  const heartbeat = h('span');
  function render(r) {
    record = r;
    setText(state, r.state);
    state.dataset.status = r.state;
    clear(facts);
    const rows = [
      ['Handler', r.handler],
      ['Attempts', `${r.attempts} of ${r.max_attempts}`],
      ['Created', timeCell(r.created_at)],
      ['Started', timeCell(r.started_at)],
      ['Finished', timeCell(r.finished_at)],
      ['Heartbeat', heartbeat],
      ['Progress key', h('a', { href: `/trees/${r.progress_key}`, dataset: { nav: '' } }, r.progress_key)],
    ];
    if (r.cancel_requested && !TERMINAL.has(r.state)) rows.push(['Cancel', 'requested, the handler is being stopped']);
    for (const [k, v] of rows) facts.append(h('dt', null, k), h('dd', null, v));
    tickHeartbeat();
    clear(outcome);
    if ('result' in r) outcome.append(h('h2', null, 'Result'), h('pre.json', { id: 'request-result', tabindex: '0' }, json(r.result)));
    if (r.error) outcome.append(h('h2', null, 'Error'), h('pre.error-text', { id: 'request-error' }, r.error));
    clear(actions);
    if (!TERMINAL.has(r.state) && !r.cancel_requested) {
      actions.append(h('button.danger', { type: 'button', id: 'cancel', onclick: cancel }, 'Cancel request'));
    }
    if (r.state === 'dead') actions.append(h('button', { type: 'button', id: 'retry', onclick: retry }, 'Retry'));
  }

  function tickHeartbeat() {
    if (!record) return;
    const hb = record.heartbeat_at;
    setText(heartbeat, typeof hb === 'number'
      ? `${clock(hb)} (${duration(Date.now() - hb)} ago${TERMINAL.has(record.state) ? '' : ''})`
      : '–');
  }

  async function refresh() {
    if (refreshing) return refreshing;
    refreshing = api(`/v1/requests/${id}`, { signal })
      .then(render)
      .catch((e) => { if (e.name !== 'AbortError') fail(`Cannot read the request: ${e.message}`); })
      .finally(() => { refreshing = null; });
    return refreshing;
  }

  async function cancel() {
    if (!confirmAction('Cancel this request?')) return;
    try {
      await api(`/v1/requests/${id}`, { method: 'DELETE', signal });
      await refresh();
    } catch (e) {
      if (e.name !== 'AbortError') fail(`Cannot cancel: ${e.message}`);
    }
  }

  async function retry() {
    try {
      await api(`/v1/dead-letters/${id}/retry`, { method: 'POST', signal });
      await refresh();
      follow();
    } catch (e) {
      if (e.name !== 'AbortError') fail(`Cannot retry: ${e.message}`);
    }
  }

  // While the request is not finished, a long poll (Prefer: wait) brings its outcome as soon as
  // it is stored; changes on the way (running, attempts) come with its progress node's events.
  let following = false;
  async function follow() {
    if (following) return;
    following = true;
    try {
      while (!signal.aborted && record && !TERMINAL.has(record.state)) {
        const r = await api(`/v1/requests/${id}`, { headers: { prefer: 'wait=25' }, signal });
        render(r);
      }
    } catch (e) {
      if (e.name !== 'AbortError') fail(`Lost the request's state: ${e.message}`);
    } finally {
      following = false;
    }
  }

  let lastNodeSig = '';
  api(`/v1/requests/${id}`, { signal })
    .then((r) => {
      render(r);
      closeTree = treeView(treeBox, r.progress_key, {
        onNode(node) {
          const sig = `${node.status}|${node.state}|${node.attempts}|${node.heartbeat_ms}`;
          if (sig !== lastNodeSig) {
            if (lastNodeSig) refresh();
            lastNodeSig = sig;
          }
        },
      });
      follow();
    })
    .catch((e) => {
      if (e.name === 'AbortError') return;
      fail(e.status === 404 ? `No request ${id}.` : `Cannot read the request: ${e.message}`);
    });
  api(`/v1/requests/${id}/payload`, { signal })
    .then((p) => { payload.textContent = json(p); })
    .catch((e) => { if (e.name !== 'AbortError') payload.textContent = `(cannot read the payload: ${e.message})`; });

  const ticker = setInterval(tickHeartbeat, 1000);
  return () => {
    controller.abort();
    clearInterval(ticker);
    closeTree?.();
  };
}

/** Asks before a destructive action; tests and keyboard users get the browser's own dialog. */
function confirmAction(question) {
  return window.confirm(question);
}
