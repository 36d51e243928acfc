// Dead letters: the list (newest first, paged), each inspectable on its request's page and
// retryable from here.

import { api } from '../api.js';
import { h } from '../dom.js';
import { clock, isoTime, relative } from '../format.js';

/** `/dead-letters?after=` */
export function deadLettersPage(main, params) {
  const after = params.get('after') || '';
  document.title = 'Dead letters · Cairn';
  const status = h('p.notice', { role: 'status' }, 'Loading…');
  const body = h('tbody');
  const table = h('table.list', { hidden: true },
    h('caption.sr', null, 'Dead letters, newest first'),
    h('thead', null, h('tr', null, ['Request', 'Died', 'Error', ''].map((t) => h('th', { scope: 'col' }, t)))),
    body);
  const pager = h('nav.pager', { 'aria-label': 'Pages of dead letters' });
  main.append(h('h1', null, 'Dead letters'),
    h('p.lede', null, 'Requests that ran out of attempts or failed for good. Retry runs one again with fresh attempts.'),
    status, h('div.scroll', null, table), pager);

  const controller = new AbortController();
  const { signal } = controller;
  api(`/v1/dead-letters?limit=50${after ? `&after=${encodeURIComponent(after)}` : ''}`, { signal })
    .then(({ items, next }) => {
      status.hidden = items.length > 0;
      status.textContent = after ? 'No more dead letters.' : 'No dead letters.';
      table.hidden = items.length === 0;
      // Newest first within the page, whichever order the API pages in.
      const rows = [...items].sort((a, b) => (b.time ?? 0) - (a.time ?? 0));
      for (const letter of rows) body.append(row(letter, signal));
      if (after) pager.append(h('a', { href: '/dead-letters', dataset: { nav: '' } }, '« First page'));
      if (next) pager.append(h('a.next', { href: `/dead-letters?after=${encodeURIComponent(next)}`, dataset: { nav: '' }, rel: 'next' }, 'Next page »'));
    })
    .catch((e) => {
      if (e.name === 'AbortError') return;
      status.textContent = `Cannot list dead letters: ${e.message}`;
      status.classList.add('error');
    });
  return () => controller.abort();
}

function row(letter, signal) {
  const cell = h('td.act');
  const button = h('button', {
    type: 'button',
    'aria-label': `Retry request ${letter.id}`,
    async onclick() {
      button.disabled = true;
      try {
        const r = await api(`/v1/dead-letters/${letter.id}/retry`, { method: 'POST', signal });
        cell.replaceChildren(h('span.badge', { dataset: { status: r.state } }, `${r.state} again`));
      } catch (e) {
        if (e.name === 'AbortError') return;
        button.disabled = false;
        cell.append(h('span.error', { role: 'alert' }, ` ${e.message}`));
      }
    },
  }, 'Retry');
  cell.append(button);
  return h('tr', { dataset: { id: letter.id } },
    h('td', null, h('a.id', { href: `/requests/${letter.id}`, dataset: { nav: '' }, title: letter.id }, letter.id.slice(0, 8))),
    h('td', null, h('time', { datetime: isoTime(letter.time), title: clock(letter.time) }, relative(letter.time))),
    h('td.err', null, letter.error),
    cell);
}
