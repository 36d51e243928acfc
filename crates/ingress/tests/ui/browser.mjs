// Shared by the browser tests: Debian's headless Chromium through playwright-core (no browser
// download), a page that records every request it makes, and small assertion helpers.

import { chromium } from 'playwright-core';

export const CHROMIUM = process.env.CAIRN_CHROMIUM || '/usr/bin/chromium';

export async function launch() {
  return chromium.launch({
    executablePath: CHROMIUM,
    args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu'],
  });
}

/** A page whose requests are all recorded (`page.requests`), and whose errors fail the test. */
export async function newPage(browser, base, viewport = { width: 1100, height: 900 }) {
  const context = await browser.newContext({ viewport, baseURL: base });
  const page = await context.newPage();
  page.requests = [];
  page.errors = [];
  page.on('request', (r) => {
    const entry = { url: r.url(), method: r.method(), at: Date.now(), status: 'pending' };
    page.requests.push(entry);
    r.response().then((res) => { entry.status = res ? res.status() : 'failed'; }, () => { entry.status = 'failed'; });
  });
  page.on('pageerror', (e) => page.errors.push(e.message));
  page.on('dialog', (d) => d.accept());
  return page;
}

export function check(condition, message) {
  if (!condition) throw new Error(`assertion failed: ${message}`);
}

export async function api(base, path, { method = 'GET', body, headers = {} } = {}) {
  const response = await fetch(base + path, {
    method,
    headers: { 'content-type': 'application/json', ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let json = null;
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  if (response.status >= 400) throw new Error(`${method} ${path}: ${response.status} ${text}`);
  return json;
}

export function post(base, key, update) {
  return api(base, `/status/${key}`, { method: 'POST', body: update });
}

/** Runs one named check; `CAIRN_UI_ONLY=<text>` runs only the checks whose name contains it. */
export async function step(name, fn) {
  const only = process.env.CAIRN_UI_ONLY;
  if (only && !name.includes(only)) {
    console.log(`skip - ${name}`);
    return;
  }
  const started = Date.now();
  await fn();
  console.log(`ok - ${name} (${Date.now() - started} ms)`);
}
