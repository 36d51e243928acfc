// The progress tree of one key: the node itself and a page of its children (by start time), each
// a weighted progress bar with status, messages, ETA, age, stalled marker and counts. It reads
// the page once over REST, then follows the subtree live over SSE. Updates are merged per node
// (a state older than the one shown is dropped, so REST and SSE may race), collected, and
// written once per animation frame into the rows that exist: values change in place, rows never
// move, and new children are appended only on the last page.

import { api, statusPath } from './api.js';
import { clear, h, setData, setShown, setText } from './dom.js';
import { clock, count, duration, percent, relative } from './format.js';
import { watch } from './live.js';

export const PAGE_SIZES = [25, 100, 250, 1000];
export const DEFAULT_PAGE = 100;

const KNOWN = new Set(['key', 'name', 'status', 'progress', 'weight', 'msg', 'start_time', 'update_time', 'tasks']);

/** Whether a key names a node (its last segment is not a namespace). */
export function isNodeKey(key) {
  const last = key.split('.').pop();
  return !!last && !last.startsWith('_');
}

export function treeHref(key, params = {}) {
  const q = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== undefined && v !== null && v !== ''));
  const s = q.toString();
  return `/trees/${encodeURIComponent(key).replace(/%2E/gi, '.')}${s ? `?${s}` : ''}`;
}

/** Trees › _portal › job1 › step: every prefix that names a node is a link. */
export function breadcrumbs(key) {
  const segs = key.split('.');
  const items = [h('li', null, h('a', { href: '/', dataset: { nav: '' } }, 'Trees'))];
  segs.forEach((seg, i) => {
    const prefix = segs.slice(0, i + 1).join('.');
    const last = i === segs.length - 1;
    const label = isNodeKey(prefix) && !last
      ? h('a', { href: treeHref(prefix), dataset: { nav: '' } }, seg)
      : h('span', last ? { 'aria-current': 'page' } : null, seg);
    items.push(h('li', null, label));
  });
  return h('nav.crumbs', { 'aria-label': 'Breadcrumbs' }, h('ol', null, items));
}

function labelOf(node) {
  return node.name || node.key.split('.').pop();
}

/** When the node was last updated, on this browser's clock (`_age_ms` is immune to skew). */
function updatedAt(node, receivedAt) {
  if (typeof node._age_ms === 'number') return receivedAt - node._age_ms;
  return typeof node.update_time === 'number' ? node.update_time : receivedAt;
}

/** A node's row (or the focused node's card): built once, then `update(node)` in place. */
class NodeRow {
  constructor(node, { focus = false, link = true } = {}) {
    this.focus = focus;
    this.key = node.key;
    const tag = focus ? 'section.node.focus' : 'li.node';
    this.name = link && !focus
      ? h('a.name', { href: treeHref(node.key), dataset: { nav: '' } })
      : h(focus ? 'h2.name' : 'span.name');
    this.status = h('span.badge');
    this.stalled = h('span.badge.stalled', { hidden: true, title: 'no update for longer than the stall limit' }, 'stalled');
    this.deleted = h('span.badge.deleted', { hidden: true }, 'deleted');
    this.fill = h('div.fill');
    this.bar = h('div.bar', { role: 'progressbar', 'aria-valuemin': '0', 'aria-valuemax': '100' }, this.fill);
    this.pct = h('span.pct');
    this.msg = h('p.msg');
    this.lastMsg = h('p.last-msg', { title: 'latest message below this node' });
    this.eta = h('span.eta');
    this.age = h('span.age');
    this.weight = h('span.weight');
    this.kids = h('span.kids');
    this.counts = h('span.counts');
    this.keyLine = focus ? h('code.key', null, node.key) : null;
    this.fields = focus ? h('dl.fields') : null;
    this.el = h(tag, { dataset: { key: node.key } },
      h('div.head', null, this.name, this.status, this.stalled, this.deleted),
      this.keyLine,
      h('div.progress', null, this.bar, this.pct),
      this.msg, this.lastMsg,
      h('div.meta', null, this.eta, this.age, this.weight, this.kids, this.counts),
      this.fields);
    this.update(node, Date.now());
  }

  update(node, receivedAt) {
    this.node = node;
    this.at = updatedAt(node, receivedAt);
    const status = node.status || '';
    setText(this.name, labelOf(node));
    setData(this.el, 'status', status);
    setText(this.status, status);
    setShown(this.status, !!status);
    setShown(this.stalled, node._stalled === true);
    const p = typeof node.progress === 'number' ? Math.max(0, Math.min(1, node.progress)) : 0;
    const t = `scaleX(${p})`;
    if (this.fill.style.transform !== t) this.fill.style.transform = t;
    const now = String(Math.round(p * 100));
    if (this.bar.getAttribute('aria-valuenow') !== now) this.bar.setAttribute('aria-valuenow', now);
    setText(this.pct, percent(node.progress));
    setText(this.msg, node.msg || '');
    setShown(this.msg, !!node.msg);
    const last = node._last_msg && node._last_msg !== node.msg ? `↳ ${node._last_msg}` : '';
    setText(this.lastMsg, last);
    setShown(this.lastMsg, !!last);
    setText(this.weight, typeof node.weight === 'number' && node.weight !== 1 ? `weight ${count(node.weight)}` : '');
    const n = node._child_count ?? (Array.isArray(node._children) ? node._children.length : 0);
    setText(this.kids, n ? `${count(n)} ${n === 1 ? 'child' : 'children'}` : '');
    const counts = node._counts && typeof node._counts === 'object'
      ? Object.entries(node._counts).filter(([, v]) => v > 0).map(([k, v]) => `${k} ${count(v)}`).join(' · ')
      : '';
    setText(this.counts, counts);
    if (this.fields) this.renderFields(node);
    this.tick(Date.now());
  }

  /** The time-dependent texts: ETA as a clock time and "in 3 min", age. */
  tick(now) {
    const node = this.node;
    const eta = typeof node._eta === 'number' && node.status !== 'finished' ? node._eta : null;
    setText(this.eta, eta ? `ETA ${clock(eta)} (${relative(eta, now)})` : '');
    setText(this.age, `updated ${duration(now - this.at)} ago`);
  }

  renderFields(node) {
    const rows = [];
    rows.push(['started', clock(node.start_time)]);
    rows.push(['updated', clock(node.update_time)]);
    if (typeof node.heartbeat_ms === 'number') rows.push(['heartbeat', clock(node.heartbeat_ms)]);
    for (const [k, v] of Object.entries(node)) {
      if (KNOWN.has(k) || k.startsWith('_') || k === 'heartbeat_ms') continue;
      rows.push([k, typeof v === 'string' ? v : JSON.stringify(v)]);
    }
    const sig = JSON.stringify(rows);
    if (this.fieldsSig === sig) return;
    this.fieldsSig = sig;
    clear(this.fields);
    for (const [k, v] of rows) this.fields.append(h('dt', null, k), h('dd', null, v));
  }

  markDeleted() {
    this.el.dataset.deleted = 'true';
    setShown(this.deleted, true);
  }
}

/**
 * Renders the tree of `key` into `container` and keeps it live. Options: `limit` children per
 * page, `after`/`from` (the page: cursor and the 1-based index of its first child), `base` (the
 * URL params kept by the pager links), `onNode(node)` called when the focused node changes.
 * Returns `close()`.
 */
export function treeView(container, key, { limit = DEFAULT_PAGE, after = '', from = 1, onNode, pageHref } = {}) {
  const state = {
    rows: new Map(), // key -> NodeRow (children)
    focus: null, // NodeRow of `key`
    pending: new Map(), // key -> [node, receivedAt]
    frame: 0,
    next: null, // cursor of the page after this one, null on the last page
    loaded: false,
    closed: false,
  };
  const status = h('p.notice', { role: 'status' }, 'Loading…');
  const focusSlot = h('div');
  const childHead = h('h3.children-head');
  const list = h('ul.children', { 'aria-label': 'Children' });
  const pager = h('nav.pager', { 'aria-label': 'Pages of children' });
  const childrenBox = h('div', { hidden: true }, childHead, list, pager);
  clear(container);
  container.append(status, focusSlot, childrenBox);

  const href = pageHref || ((params) => treeHref(key, params));

  function newer(old, node) {
    if (!old) return true;
    const a = old.update_time;
    const b = node.update_time;
    return typeof a !== 'number' || typeof b !== 'number' || b >= a;
  }

  function renderPager(total) {
    const shown = state.rows.size;
    const first = from;
    const lastIndex = from + shown - 1;
    setText(childHead, shown
      ? `Children ${count(first)}–${count(lastIndex)} of ${count(total ?? lastIndex)}`
      : 'No children');
    clear(pager);
    if (from > 1 || after) pager.append(h('a', { href: href({ limit: limit !== DEFAULT_PAGE ? limit : '' }), dataset: { nav: '' } }, '« First page'));
    if (state.next) {
      pager.append(h('a.next', {
        href: href({ after: state.next, from: from + shown, limit: limit !== DEFAULT_PAGE ? limit : '' }),
        dataset: { nav: '' }, rel: 'next',
      }, 'Next page »'));
    }
    const sizes = h('span.sizes', null, 'Per page: ');
    for (const size of PAGE_SIZES) {
      sizes.append(size === limit
        ? h('strong', { 'aria-current': 'true' }, String(size))
        : h('a', { href: href({ limit: size === DEFAULT_PAGE ? '' : size }), dataset: { nav: '' } }, String(size)), ' ');
    }
    pager.append(sizes);
  }

  /** Takes nodes (from REST, a snapshot or an update) into the page. */
  function take(nodes, receivedAt, { fromPage = false } = {}) {
    for (const node of nodes) {
      if (!node || typeof node.key !== 'string') continue;
      const [old] = state.pending.get(node.key) || [];
      const shown = node.key === key ? state.focus?.node : state.rows.get(node.key)?.node;
      if (!newer(old || shown, node)) continue;
      if (node.key === key || state.rows.has(node.key)) {
        state.pending.set(node.key, [node, receivedAt]);
      } else if (parentOf(node.key) === key && state.loaded && (fromPage || !state.next)) {
        // A child this page has not shown: appended at the end (children come by start time).
        addRow(node, receivedAt);
      }
    }
    schedule();
  }

  function addRow(node, receivedAt) {
    const row = new NodeRow(node);
    row.update(node, receivedAt);
    state.rows.set(node.key, row);
    list.append(row.el);
    childrenBox.hidden = false;
  }

  function schedule() {
    if (!state.frame && state.pending.size) state.frame = requestAnimationFrame(flush);
  }

  function flush() {
    state.frame = 0;
    for (const [k, [node, at]] of state.pending) {
      if (k === key) {
        const prev = state.focus.node;
        // Paging fields come with reads, not with every update: keep them.
        const merged = { ...node };
        for (const f of ['_children', '_child_count', '_next']) if (!(f in merged) && f in prev) merged[f] = prev[f];
        delete merged.tasks;
        state.focus.update(merged, at);
        if (merged._child_count !== prev._child_count) renderPager(merged._child_count);
        onNode?.(merged);
      } else {
        state.rows.get(k)?.update(node, at);
      }
    }
    state.pending.clear();
  }

  function showPage(root, children, receivedAt) {
    setShown(status, false);
    const node = { ...root };
    delete node.tasks;
    if (!state.focus) {
      state.focus = new NodeRow(node, { focus: true, link: false });
      state.focus.update(node, receivedAt);
      focusSlot.append(state.focus.el);
      onNode?.(node);
    } else {
      take([node], receivedAt);
    }
    state.next = root._next || null;
    for (const child of children) {
      if (state.rows.has(child.key)) take([child], receivedAt);
      else addRow(child, receivedAt);
    }
    state.loaded = true;
    childrenBox.hidden = !(state.rows.size || root._child_count);
    renderPager(root._child_count);
  }

  function showMissing() {
    if (state.focus) return;
    status.textContent = `No progress at ${key} yet: this page shows it as soon as it appears.`;
    setShown(status, true);
  }

  // The page over REST first: instant, and it covers pages past the first, which the SSE
  // snapshot does not carry.
  const params = new URLSearchParams({ depth: '2', limit: String(limit) });
  if (after) params.set('after', after);
  api(`${statusPath(key)}?${params}`)
    .then((root) => {
      if (!state.closed) showPage(root, root.tasks || [], Date.now());
    })
    .catch((e) => {
      if (state.closed) return;
      if (e.status === 404) showMissing();
      else {
        status.textContent = `Cannot read ${key}: ${e.message}`;
        status.classList.add('error');
      }
    });

  const close = watch(key, {
    depth: 2,
    limit,
    onSnapshot(root) {
      if (!root || root.missing) return showMissing();
      const now = Date.now();
      // Past the first page the snapshot's children are another page's: only the node counts.
      if (!state.focus && !after) showPage(root, root.tasks || [], now);
      else take([root, ...(after ? [] : root.tasks || [])], now);
    },
    onUpdate(nodes) {
      if (!state.focus) {
        const root = nodes.find((n) => n.key === key);
        if (root && !after) return showPage(root, nodes.filter((n) => parentOf(n.key) === key), Date.now());
      }
      take(nodes, Date.now());
    },
    onDelete(keys) {
      for (const k of keys) {
        if (k === key || key.startsWith(`${k}.`)) {
          state.focus?.markDeleted();
          status.textContent = 'This node was deleted.';
          setShown(status, true);
        } else {
          state.rows.get(k)?.markDeleted();
        }
      }
    },
  });

  const ticker = setInterval(() => {
    const now = Date.now();
    state.focus?.tick(now);
    for (const row of state.rows.values()) row.tick(now);
  }, 1000);

  return () => {
    state.closed = true;
    cancelAnimationFrame(state.frame);
    clearInterval(ticker);
    close();
  };
}

export function parentOf(key) {
  const i = key.lastIndexOf('.');
  return i < 0 ? null : key.slice(0, i);
}
