// A real browser's EventSource across edge faults: headless Chromium (Debian's
// /usr/bin/chromium, driven by playwright-core; no browser is downloaded)
// opens a stream through nginx on a page of the same origin, events are
// published through nginx while the fault happens, and the page must end with
// every event exactly once, in order, its EventSource never CLOSED (a non-200
// answer would close it for good).
//
// FAULT=edge-kill (default): half-way, the edge holding the stream (found with
// GET /v1/presence) is killed with SIGKILL and stays down.
// FAULT=rolling-restart: every edge in turn is stopped with SIGTERM (it drains:
// its streams end with `retry:`) and started again, events published all the
// while; the browser must have reconnected at least once.
//
// Env: BASE (nginx URL), USER_ID, SUB_TOKEN, PUB_TOKEN, EVENTS (default 40;
// the events published around the faults), KILL_EDGE and RESTART_EDGE
// (commands; "{n}" is replaced by the edge number, 1..3).
import { exec, execSync } from 'node:child_process';
import { promisify } from 'node:util';
import { chromium } from 'playwright-core';

const base = process.env.BASE;
const user = process.env.USER_ID ?? 'chromium';
const events = Number(process.env.EVENTS ?? 40);
const fault = process.env.FAULT ?? 'edge-kill';
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));
const run = promisify(exec);

// Publishes event k through nginx; while an edge restarts a publish may fail,
// so it is retried with the same Nats-Msg-Id (stored once whatever happens).
async function publish(k) {
  let last;
  for (let attempt = 0; attempt < 50; attempt++) {
    try {
      const response = await fetch(`${base}/v1/publish`, {
        method: 'POST',
        headers: { authorization: `Bearer ${process.env.PUB_TOKEN}`, 'content-type': 'application/json' },
        body: JSON.stringify({ user, data: String(k), msg_id: `chromium-${k}` }),
      });
      if (response.status === 200) return;
      last = `${response.status} ${await response.text()}`;
    } catch (err) {
      last = String(err);
    }
    await sleep(100);
  }
  throw new Error(`publish ${k}: ${last}`);
}

// Presence is not public (nginx routes only streams and publish): ask an edge
// directly (PRESENCE_BASE), any of them answers for the whole cluster.
async function edgeHoldingTheStream() {
  const response = await fetch(`${process.env.PRESENCE_BASE ?? base}/v1/presence/${encodeURIComponent(user)}`, {
    headers: { authorization: `Bearer ${process.env.PUB_TOKEN}` },
  });
  const body = await response.json();
  return body.nodes?.[0]?.node;
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
let verdict;
try {
  const page = await browser.newPage();
  await page.goto(`${base}/`);
  await page.evaluate(token => {
    window.received = [];
    window.closedForGood = false;
    window.errors = 0;
    window.opens = 0;
    const source = new EventSource(`/v1/stream?access_token=${encodeURIComponent(token)}`);
    source.onopen = () => { window.opens += 1; };
    source.onmessage = event => window.received.push({ id: event.lastEventId, data: event.data });
    source.onerror = () => {
      window.errors += 1;
      if (source.readyState === EventSource.CLOSED) window.closedForGood = true;
    };
  }, process.env.SUB_TOKEN);
  await page.waitForFunction(() => window.opens > 0, null, { timeout: 15000 });

  // Publishes event k, k+1, ... every 50 ms until `done` settles; returns the
  // next number.
  async function publishWhile(done, k) {
    let settled = false;
    const finished = done.finally(() => { settled = true; });
    while (!settled) {
      await publish(k++);
      await sleep(50);
    }
    await finished;
    return k;
  }

  let published = 0;
  let faulted;
  if (fault === 'edge-kill') {
    for (let k = 1; k <= events; k++) {
      await publish(k);
      if (k === Math.floor(events / 2)) {
        // Wait until the browser has what was sent so far, then kill its edge.
        await page.waitForFunction(n => window.received.length >= n, k, { timeout: 15000 });
        faulted = await edgeHoldingTheStream();
        const number = faulted?.replace(/^edge-/, '');
        if (!number) throw new Error(`no edge holds ${user}'s stream`);
        execSync(process.env.KILL_EDGE.replaceAll('{n}', number), { stdio: 'inherit' });
      }
      await sleep(50);
    }
    published = events;
  } else if (fault === 'rolling-restart') {
    const perEdge = Math.max(1, Math.floor(events / 4));
    let k = 1;
    faulted = [];
    for (const n of [1, 2, 3]) {
      for (const end = k + perEdge; k < end; k++) { await publish(k); await sleep(50); }
      faulted.push(`edge-${n}`);
      k = await publishWhile(run(process.env.RESTART_EDGE.replaceAll('{n}', String(n))), k);
    }
    for (const end = k + perEdge; k < end; k++) { await publish(k); await sleep(50); }
    published = k - 1;
  } else {
    throw new Error(`unknown FAULT ${fault} (edge-kill or rolling-restart)`);
  }
  await page.waitForFunction(n => window.received.length >= n || window.closedForGood, published, { timeout: 30000 })
    .catch(() => {});
  const state = await page.evaluate(() => ({
    data: window.received.map(e => e.data),
    closedForGood: window.closedForGood,
    errors: window.errors,
    opens: window.opens,
  }));
  const expected = Array.from({ length: published }, (_, i) => String(i + 1));
  const lost = expected.filter(k => !state.data.includes(k)).length;
  const duplicated = state.data.length - new Set(state.data).size;
  const ordered = state.data.every((d, i) => i === 0 || Number(d) > Number(state.data[i - 1]));
  verdict = {
    fault,
    faulted,
    published,
    received: state.data.length,
    lost,
    duplicated,
    ordered,
    reconnects: state.opens - 1,
    closed_for_good: state.closedForGood,
  };
  verdict.pass = lost === 0 && duplicated === 0 && ordered && !state.closedForGood && state.opens >= 2;
} finally {
  await browser.close();
}
console.log(JSON.stringify(verdict));
process.exit(verdict.pass ? 0 : 1);
