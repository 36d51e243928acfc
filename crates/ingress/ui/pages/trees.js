// The start page (open a key; recent trees, most recently updated first) and a tree's page.

import { api } from '../api.js';
import { h } from '../dom.js';
import { count, duration, percent } from '../format.js';
import { navigate } from '../nav.js';
import { DEFAULT_PAGE, PAGE_SIZES, breadcrumbs, isNodeKey, treeHref, treeView } from '../tree.js';

const KEY_RE = /^[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,15}$/;

/** `/`: a form to open any key and the list of recent trees. */
export function treesPage(main, params) {
  const input = h('input', {
    id: 'open-key', name: 'key', required: true, autocomplete: 'off', spellcheck: false,
    placeholder: '_portal.job123', 'aria-describedby': 'open-key-help',
  });
  const error = h('p.error', { id: 'open-key-help', role: 'alert' });
  const form = h('form.open', {
    onsubmit(e) {
      e.preventDefault();
      const key = input.value.trim();
      if (!KEY_RE.test(key) || key.length > 512) {
        error.textContent = 'A key is 1–16 dot-separated segments of A–Z a–z 0–9 _ -, each at most 64 characters.';
      } else if (!isNodeKey(key)) {
        error.textContent = `${key} ends in a namespace (a segment starting with _), which names no node.`;
      } else {
        navigate(treeHref(key));
      }
    },
  }, h('label', { for: 'open-key' }, 'Open a key'), h('div.row', null, input, h('button', { type: 'submit' }, 'Open')), error);

  const offset = Number(params.get('offset')) || 0;
  const list = h('ol.roots', { 'aria-label': 'Recent trees' });
  const status = h('p.notice', { role: 'status' }, 'Loading…');
  const pager = h('nav.pager', { 'aria-label': 'Pages of trees' });
  main.append(h('h1', null, 'Progress trees'), form, h('h2', null, 'Recent trees'), status, list, pager);

  const controller = new AbortController();
  api(`/v1/trees?limit=50${offset ? `&offset=${offset}` : ''}`, { signal: controller.signal })
    .then(({ items, next }) => {
      status.hidden = items.length > 0;
      status.textContent = 'No progress trees yet. Post one: curl -d \'{"progress":0.5}\' <this host>/status/_demo.job';
      for (const { key, update_time, node } of items) {
        const p = node?.progress;
        const fill = h('div.fill');
        fill.style.transform = `scaleX(${typeof p === 'number' ? p : 0})`;
        list.append(h('li.root', { dataset: { status: node?.status || '' } },
          h('a.name', { href: treeHref(key), dataset: { nav: '' } }, key),
          node?.status ? h('span.badge', null, node.status) : h('span'),
          h('div.progress', null, h('div.bar', { role: 'progressbar', 'aria-valuemin': '0', 'aria-valuemax': '100', 'aria-valuenow': String(Math.round((p || 0) * 100)) }, fill), h('span.pct', null, percent(p))),
          h('span.age', null, `updated ${duration(Date.now() - update_time)} ago`),
          node?._child_count ? h('span.kids', null, `${count(node._child_count)} children`) : null));
      }
      if (offset) pager.append(h('a', { href: '/', dataset: { nav: '' } }, '« Newest'));
      if (next) pager.append(h('a.next', { href: `/?offset=${next}`, dataset: { nav: '' }, rel: 'next' }, 'Older »'));
    })
    .catch((e) => {
      if (e.name === 'AbortError') return;
      status.textContent = `Cannot list trees: ${e.message}`;
      status.classList.add('error');
    });
  return () => controller.abort();
}

/** `/trees/{key}?limit=&after=&from=`: one node and a page of its children, live. */
export function treePage(main, key, params) {
  if (!KEY_RE.test(key) || !isNodeKey(key)) {
    main.append(h('p.notice.error', { role: 'alert' }, `${key} is not a progress key that names a node.`));
    return null;
  }
  let limit = Number(params.get('limit')) || DEFAULT_PAGE;
  if (!PAGE_SIZES.includes(limit)) limit = DEFAULT_PAGE;
  const from = Math.max(1, Number(params.get('from')) || 1);
  document.title = `${key} · Cairn`;
  const box = h('div.tree');
  main.append(breadcrumbs(key), box);
  return treeView(box, key, { limit, after: params.get('after') || '', from });
}
