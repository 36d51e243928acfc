// How busy the browser's main thread is while a page shows 1 000 live nodes that change at
// 10 Hz (crates/ingress/tests/ui.rs updates them while this runs). Prints one line
// `PERF {json}`: the main thread's busy share over 10 s (Chromium's TaskDuration through the
// DevTools protocol, and its CPU time, ThreadTime, which other processes on the machine do not
// inflate), and how many update events and node states the page received meanwhile.
//
//   node perf.mjs <base-url> <key>

import { check, launch, newPage } from './browser.mjs';

const [base, key] = process.argv.slice(2);
if (!base || !key) throw new Error('usage: node perf.mjs <base-url> <key>');
const WINDOW_MS = 10000;

const browser = await launch();
try {
  // A usual window (a few rows on screen), then a very tall one (dozens of rows on screen).
  for (const height of [900, 6000]) console.log(`PERF ${JSON.stringify(await measure(height))}`);
} finally {
  await browser.close();
}

async function measure(height) {
  const page = await newPage(browser, base, { width: 1280, height });
  // Counts what the server pushes, without changing what the page does with it.
  await page.addInitScript(() => {
    window.received = { events: 0, nodes: 0 };
    const add = EventSource.prototype.addEventListener;
    EventSource.prototype.addEventListener = function (type, listener, options) {
      if (type !== 'update') return add.call(this, type, listener, options);
      return add.call(this, type, (e) => {
        window.received.events += 1;
        try { window.received.nodes += JSON.parse(e.data).length || 0; } catch { /* counted by the page */ }
        listener(e);
      }, options);
    };
  });
  await page.goto(`/trees/${key}?limit=1000`);
  await page.waitForFunction(() => document.querySelectorAll('li.node').length === 1000, null, { timeout: 30000 });
  await page.waitForFunction(() => window.received.nodes > 1000, null, { timeout: 30000 });
  // The reader is halfway down the list: what they look at must not move while values change.
  await page.evaluate(() => document.querySelectorAll('li.node')[500].scrollIntoView());
  await page.waitForTimeout(500);
  const firstInView = () => page.evaluate(() => [...document.querySelectorAll('li.node')]
    .find((el) => el.getBoundingClientRect().bottom > 0)?.dataset.key);
  const where0 = [await page.evaluate(() => scrollY), await firstInView()];
  const cdp = await page.context().newCDPSession(page);
  await cdp.send('Performance.enable', { timeDomain: 'timeTicks' });
  const metrics = async () => Object.fromEntries((await cdp.send('Performance.getMetrics')).metrics.map((m) => [m.name, m.value]));
  const m0 = await metrics();
  const r0 = await page.evaluate(() => ({ ...window.received }));
  const t0 = Date.now();
  await page.waitForTimeout(WINDOW_MS);
  const m1 = await metrics();
  const r1 = await page.evaluate(() => ({ ...window.received }));
  const wall = (Date.now() - t0) / 1000;
  const where1 = [await page.evaluate(() => scrollY), await firstInView()];
  check(JSON.stringify(where1) === JSON.stringify(where0), `the view moved: ${where0} -> ${where1}`);
  const inView = await page.evaluate(() => [...document.querySelectorAll('li.node')]
    .filter((el) => { const r = el.getBoundingClientRect(); return r.bottom > 0 && r.top < innerHeight; }).length);
  const result = {
    viewport: `1280x${height}`,
    // Wall time the main thread spent in tasks: inflated when other processes hold the cores.
    busy_share: +((m1.TaskDuration - m0.TaskDuration) / wall).toFixed(3),
    // CPU time of the main thread: what the page itself costs, whatever else runs.
    cpu_share: +((m1.ThreadTime - m0.ThreadTime) / wall).toFixed(3),
    script_share: +((m1.ScriptDuration - m0.ScriptDuration) / wall).toFixed(3),
    layout_share: +((m1.LayoutDuration - m0.LayoutDuration + m1.RecalcStyleDuration - m0.RecalcStyleDuration) / wall).toFixed(3),
    window_s: +wall.toFixed(2),
    rows: await page.locator('li.node').count(),
    rows_in_viewport: inView,
    first_row_in_view: where0[1],
    update_events_per_s: +((r1.events - r0.events) / wall).toFixed(1),
    node_updates_per_s: +((r1.nodes - r0.nodes) / wall).toFixed(0),
  };
  check(result.rows === 1000, 'the page shows 1 000 nodes');
  check(r1.events > r0.events, 'updates arrived during the measurement');
  check(page.errors.length === 0, `page errors: ${page.errors}`);
  await page.context().close();
  return result;
}
