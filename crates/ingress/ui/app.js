// Cairn's web UI: a router over the History API. Every view is a URL (a deep link); links marked
// `data-nav` change the view without reloading the page. A view renders into <main> and returns
// a cleanup that closes its live subscriptions when the reader leaves.

import { treesPage, treePage } from './pages/trees.js';
import { requestsPage, requestPage } from './pages/requests.js';
import { deadLettersPage } from './pages/dead.js';
import { navigate } from './nav.js';

const routes = [
  [/^\/$/, treesPage, 'trees'],
  [/^\/trees\/?$/, treesPage, 'trees'],
  [/^\/trees\/([^/]+)$/, treePage, 'trees'],
  [/^\/requests\/?$/, requestsPage, 'requests'],
  [/^\/requests\/([^/]+)$/, requestPage, 'requests'],
  [/^\/dead-letters\/?$/, deadLettersPage, 'dead-letters'],
];

let cleanup = null;

function render({ focus = false } = {}) {
  cleanup?.();
  cleanup = null;
  const main = document.getElementById('main');
  main.replaceChildren();
  const url = new URL(location.href);
  for (const [pattern, page, section] of routes) {
    const m = url.pathname.match(pattern);
    if (!m) continue;
    for (const a of document.querySelectorAll('header nav a')) {
      if (a.dataset.section === section) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    const args = m.slice(1).map((s) => decodeURIComponent(s));
    cleanup = page(main, ...args, url.searchParams) || null;
    if (focus) main.focus({ preventScroll: true });
    return;
  }
  main.append(Object.assign(document.createElement('p'), { className: 'notice error', textContent: `No page at ${url.pathname}.` }));
}

window.addEventListener('cairn:navigate', () => {
  render({ focus: true });
  window.scrollTo(0, 0);
});

document.addEventListener('click', (e) => {
  if (e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  const a = e.target.closest('a[data-nav]');
  if (!a || a.origin !== location.origin) return;
  e.preventDefault();
  navigate(a.pathname + a.search);
});

window.addEventListener('popstate', () => render());
render();
