// Browser tests of the web UI in headless Chromium, against a running stack (ingress with an
// aggregator and a processor whose handlers are `echo`, `block` (runs until canceled), `flaky`
// (fails for good once, then succeeds) and `fail` (fails for good)), started by crates/ingress/tests/ui.rs, which
// also seeds `_uitest.big` with 10 000 children. Any failed assertion exits non-zero.
//
//   node ui.test.mjs <base-url> [--screenshots <dir>]

import net from 'node:net';

import { api, check, launch, newPage, post, step } from './browser.mjs';

const [base, flag, shotsDir] = process.argv.slice(2);
if (!base) throw new Error('usage: node ui.test.mjs <base-url> [--screenshots <dir>]');
const screenshots = flag === '--screenshots' ? shotsDir : null;
const origin = new URL(base).origin;
const digits = (s) => s.replace(/\D+/g, ' ').trim();

/** A TCP proxy to `target` on 127.0.0.1: `start(port)` listens (0: any port), `stop()` refuses
 * new connections and drops the open ones. */
function tcpProxy(target) {
  const sockets = new Set();
  let server = null;
  return {
    start(port) {
      server = net.createServer((client) => {
        const upstream = net.connect(Number(target.port), target.hostname);
        for (const s of [client, upstream]) {
          sockets.add(s);
          s.on('error', () => s.destroy());
          s.on('close', () => { sockets.delete(s); client.destroy(); upstream.destroy(); });
        }
        client.pipe(upstream);
        upstream.pipe(client);
      });
      return new Promise((resolve) => server.listen(port, '127.0.0.1', () => resolve(server.address().port)));
    },
    stop() {
      if (!server) return Promise.resolve();
      const closing = server;
      server = null;
      for (const s of sockets) s.destroy();
      return new Promise((resolve) => closing.close(() => resolve()));
    },
  };
}

const browser = await launch();
const pages = [];
async function open(viewport) {
  const page = await newPage(browser, base, viewport);
  pages.push(page);
  return page;
}

async function waitRequest(id, states) {
  const deadline = Date.now() + 60000;
  while (Date.now() < deadline) {
    const r = await api(base, `/v1/requests/${id}`);
    if (states.includes(r.state)) return r;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error(`request ${id} never reached ${states}`);
}

try {
  const page = await open();

  await step('a tree updates live within a second of a REST update, without reload or polling', async () => {
    await post(base, '_uitest.live.a', { progress: 0.1, status: 'running', msg: 'first' });
    await post(base, '_uitest.live.b', { progress: 0.2, status: 'running' });
    await page.goto('/trees/_uitest.live');
    await page.locator('li.node[data-key="_uitest.live.a"] .pct', { hasText: '10 %' }).waitFor();
    await page.locator('#conn[data-state="live"]').waitFor({ timeout: 10000 });
    await page.evaluate(() => { window.notReloaded = true; });
    const order = await page.$$eval('li.node', (els) => els.map((e) => e.dataset.key));
    const before = page.requests.length;
    const sent = Date.now();
    await post(base, '_uitest.live.a', { progress: 0.6, msg: 'second' });
    await page.waitForFunction(
      () => document.querySelector('li.node[data-key="_uitest.live.a"] .pct')?.textContent === '60 %',
      null, { timeout: 1000, polling: 'raf' });
    const took = Date.now() - sent;
    check(took <= 1000, `the update showed after ${took} ms`);
    const msg = await page.textContent('li.node[data-key="_uitest.live.a"] .msg');
    check(msg === 'second', `msg is ${msg}`);
    await page.waitForFunction(() => document.querySelector('section.node.focus .pct')?.textContent === '40 %',
      null, { timeout: 1000 });
    check(await page.evaluate(() => window.notReloaded === true), 'the page was reloaded');
    const after = await page.$$eval('li.node', (els) => els.map((e) => e.dataset.key));
    check(JSON.stringify(after) === JSON.stringify(order), `rows moved: ${order} -> ${after}`);
    const extra = page.requests.slice(before);
    check(extra.length === 0, `the page made requests while updating: ${JSON.stringify(extra)}`);
    // A new child appears at the end, without a request either.
    await post(base, '_uitest.live.c', { progress: 1, status: 'finished' });
    await page.locator('li.node[data-key="_uitest.live.c"]').waitFor({ timeout: 2000 });
    const last = await page.$$eval('li.node', (els) => els.at(-1).dataset.key);
    check(last === '_uitest.live.c', `new child is not last: ${last}`);
    check(page.requests.length === before, 'a new child cost a request');
    console.log(`   update shown ${took} ms after the POST was sent`);
  });

  await step('a lost connection shows, and the stream resumes by itself without missing an update', async () => {
    // The page talks to ingress through a TCP proxy that the test cuts and restores.
    const proxy = tcpProxy(new URL(base));
    const port = await proxy.start(0);
    const cut = await newPage(browser, `http://127.0.0.1:${port}`);
    try {
      await cut.goto('/trees/_uitest.live');
      await cut.locator('#conn[data-state="live"]').waitFor({ timeout: 10000 });
      await proxy.stop();
      await cut.locator('#conn[data-state="lost"]').waitFor({ timeout: 10000 });
      // Changed while the page is cut off: it must arrive once the stream resumes.
      await post(base, '_uitest.live.b', { progress: 0.9, msg: 'while cut off' });
      await proxy.start(port);
      await cut.locator('#conn[data-state="live"]').waitFor({ timeout: 20000 });
      await cut.locator('li.node[data-key="_uitest.live.b"] .msg', { hasText: 'while cut off' }).waitFor({ timeout: 5000 });
      check((await cut.textContent('li.node[data-key="_uitest.live.b"] .pct')) === '90 %', 'resumed state');
      check(cut.errors.length === 0, `page errors: ${cut.errors}`);
    } finally {
      await cut.context().close();
      await proxy.stop();
    }
  });

  await step('a six-level tree drilled to its deepest leaf, by keyboard, with breadcrumbs and deep links', async () => {
    const keys = ['_uitest.six', '_uitest.six.l2', '_uitest.six.l2.l3', '_uitest.six.l2.l3.l4',
      '_uitest.six.l2.l3.l4.l5', '_uitest.six.l2.l3.l4.l5.l6'];
    await post(base, keys[5], { progress: 0.5, status: 'running', msg: 'deepest leaf' });
    await page.goto(`/trees/${keys[0]}`);
    await page.locator(`section.node.focus[data-key="${keys[0]}"]`).waitFor();
    for (const key of keys.slice(1)) {
      const link = page.locator(`li.node[data-key="${key}"] a.name`);
      await link.focus();
      await page.keyboard.press('Enter');
      await page.locator(`section.node.focus[data-key="${key}"]`).waitFor();
    }
    check(new URL(page.url()).pathname === `/trees/${keys[5]}`, `url ${page.url()}`);
    const crumbs = await page.$$eval('nav.crumbs li', (els) => els.map((e) => e.textContent));
    check(JSON.stringify(crumbs) === JSON.stringify(['Trees', '_uitest', 'six', 'l2', 'l3', 'l4', 'l5', 'l6']),
      `breadcrumbs ${crumbs}`);
    check((await page.textContent('section.node.focus .msg')) === 'deepest leaf', 'leaf message');
    await page.reload();
    await page.locator(`section.node.focus[data-key="${keys[5]}"] .msg`, { hasText: 'deepest leaf' }).waitFor();
    await page.click('nav.crumbs a:text-is("l3")');
    await page.locator(`section.node.focus[data-key="${keys[2]}"]`).waitFor();
    await page.goBack();
    await page.locator(`section.node.focus[data-key="${keys[5]}"]`).waitFor();
  });

  await step('a 10 000-child parent pages', async () => {
    await page.goto('/trees/_uitest.big');
    const head = page.locator('h3.children-head');
    await head.waitFor();
    check(digits(await head.textContent()) === '1 100 10 000', `heading ${await head.textContent()}`);
    check((await page.locator('li.node').count()) === 100, 'first page has 100 rows');
    check((await page.getAttribute('li.node >> nth=0', 'data-key')) === '_uitest.big.c00001', 'first child');
    await page.click('a.next');
    await page.waitForFunction(() => document.querySelector('h3.children-head')?.textContent.includes('101'));
    check(digits(await head.textContent()) === '101 200 10 000', `heading ${await head.textContent()}`);
    check((await page.locator('li.node').count()) === 100, 'second page has 100 rows');
    check((await page.getAttribute('li.node >> nth=0', 'data-key')) === '_uitest.big.c00101', 'second page starts at 101');
    check(new URL(page.url()).searchParams.get('after') === '_uitest.big.c00100', `url ${page.url()}`);
    await page.click('.pager a:text-is("1000")');
    await page.waitForFunction(() => document.querySelectorAll('li.node').length === 1000);
  });

  let echoId;
  await step('a request submitted over REST shows its result, and is listed newest first', async () => {
    const sub = await api(base, '/v1/requests', { method: 'POST', body: { handler: 'echo', payload: { hello: 'ui' } } });
    echoId = sub.id;
    await page.goto(`/requests/${sub.id}`);
    await page.locator('#request-state', { hasText: 'succeeded' }).waitFor({ timeout: 15000 });
    await page.locator('#request-result', { hasText: '"hello": "ui"' }).waitFor();
    await page.locator('#request-payload', { hasText: '"hello": "ui"' }).waitFor();
    await page.locator('section.node.focus').waitFor();
    await page.click('header nav a:text-is("Requests")');
    await page.locator('table.list tbody tr').first().waitFor();
    const first = await page.getAttribute('table.list tbody tr >> nth=0 >> a.id', 'title');
    check(first === sub.id, `newest request first: ${first}`);
    await page.selectOption('#filter-state', 'dead');
    await page.click('form.filters button');
    await page.waitForURL(/state=dead/);
    await page.locator('p.notice, table.list').first().waitFor();
    const ids = await page.$$eval('table.list tbody a.id', (els) => els.map((e) => e.title));
    check(!ids.includes(sub.id), 'the state filter keeps only dead requests');
  });

  await step('cancel through the UI cancels a running request', async () => {
    const sub = await api(base, '/v1/requests', { method: 'POST', body: { handler: 'block', payload: {} } });
    await waitRequest(sub.id, ['running']);
    await page.goto(`/requests/${sub.id}`);
    await page.locator('#request-state', { hasText: 'running' }).waitFor();
    await page.click('#cancel');
    await page.locator('#request-state', { hasText: 'canceled' }).waitFor({ timeout: 15000 });
    const r = await api(base, `/v1/requests/${sub.id}`);
    check(r.state === 'canceled', `state ${r.state}`);
  });

  await step('dead-letter retry through the UI runs the request again', async () => {
    const sub = await api(base, '/v1/requests', { method: 'POST', body: { handler: 'flaky', payload: { n: 1 } } });
    await waitRequest(sub.id, ['dead']);
    await page.goto('/dead-letters');
    const row = page.locator(`tr[data-id="${sub.id}"]`);
    await row.waitFor();
    check((await row.locator('td.err').textContent()).includes('flaky'), 'the error is shown');
    await row.locator('button', { hasText: 'Retry' }).click();
    await row.locator('.badge', { hasText: 'queued again' }).waitFor();
    const r = await waitRequest(sub.id, ['succeeded']);
    check(r.state === 'succeeded', `state ${r.state}`);
    await page.reload();
    await row.locator('.badge', { hasText: 'retried: succeeded' }).waitFor();
    await row.locator('a.id').click();
    await page.locator('#request-state', { hasText: 'succeeded' }).waitFor();
  });

  await step('no horizontal scroll at 360 px', async () => {
    const narrow = await open({ width: 360, height: 740 });
    const viewport = await (await narrow.goto('/')).text();
    check(viewport.includes('name="viewport" content="width=device-width'), 'viewport meta');
    for (const path of ['/', '/trees/_uitest.live', '/trees/_uitest.big', '/trees/_uitest.six.l2.l3.l4.l5.l6',
      '/requests', ...(echoId ? [`/requests/${echoId}`] : []), '/dead-letters']) {
      await narrow.goto(path);
      await narrow.locator('main h1, section.node.focus').first().waitFor();
      // Loaded: no "Loading…" left on the page.
      await narrow.waitForFunction(() => ![...document.querySelectorAll('p.notice')]
        .some((p) => !p.hidden && p.textContent === 'Loading…'));
      const [scroll, client] = await narrow.evaluate(() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]);
      check(scroll <= client, `${path} scrolls sideways at 360 px: ${scroll} > ${client}`);
    }
  });

  await step('no request leaves for another host, and no page error', async () => {
    const all = pages.flatMap((p) => p.requests.map((r) => r.url));
    check(all.length > 20, `only ${all.length} requests recorded`);
    const foreign = all.filter((u) => new URL(u).origin !== origin);
    check(foreign.length === 0, `requests to other hosts: ${foreign}`);
    const errors = pages.flatMap((p) => p.errors);
    check(errors.length === 0, `page errors: ${errors}`);
  });

  if (screenshots) {
    await step(`screenshots in ${screenshots}`, async () => {
      const shot = await open({ width: 1000, height: 760 });
      const t = Date.now();
      const demo = [
        ['_demo.render', { name: 'Render film', status: 'running', msg: 'rendering 4 of 6 scenes' }],
        ['_demo.render.fetch', { name: 'Fetch assets', status: 'finished', progress: 1, weight: 1, msg: '2.1 GiB fetched' }],
        ['_demo.render.scenes', { name: 'Render scenes', status: 'running', progress: 0.62, weight: 6, msg: 'scene 4: frame 812/1440' }],
        ['_demo.render.scenes.s4', { name: 'Scene 4', status: 'running', progress: 0.56, msg: 'frame 812/1440' }],
        ['_demo.render.encode', { name: 'Encode', status: 'waiting', progress: 0, weight: 2 }],
        ['_demo.render.thumbs', { name: 'Thumbnails', status: 'failed', progress: 0.3, weight: 0.5, msg: 'disk full on worker-3' }],
      ];
      for (const [key, update] of demo) await post(base, key, update);
      await shot.goto('/trees/_demo.render');
      await shot.locator('li.node[data-key="_demo.render.thumbs"]').waitFor();
      await shot.waitForTimeout(300 + Math.max(0, 500 - (Date.now() - t)));
      await shot.screenshot({ path: `${screenshots}/ui-tree.png`, fullPage: true });
      await shot.goto(`/requests/${echoId}`);
      await shot.locator('section.node.focus').waitFor();
      await shot.screenshot({ path: `${screenshots}/ui-request.png`, fullPage: true });
      for (const error of ['upstream answered 422: width must be at most 8192', 'no such bucket: renders-eu']) {
        const sub = await api(base, '/v1/requests', { method: 'POST', body: { handler: 'fail', payload: { error } } });
        await waitRequest(sub.id, ['dead']);
      }
      await shot.goto('/dead-letters');
      await shot.locator('table.list tbody tr').first().waitFor();
      await shot.screenshot({ path: `${screenshots}/ui-dead-letters.png`, fullPage: true });
    });
  }
} catch (e) {
  // What the pages did last, to tell a slow server from a broken page.
  for (const p of pages) {
    console.error(`page ${p.url()}: errors ${JSON.stringify(p.errors)}`);
    console.error((await p.locator('main').innerText().catch(() => '')).slice(0, 1500));
    for (const r of p.requests.slice(-8)) console.error(`  ${r.method} ${r.url} -> ${r.status}`);
  }
  throw e;
} finally {
  await browser.close();
}
