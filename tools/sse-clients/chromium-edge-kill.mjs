// A real browser's EventSource across an edge kill: headless Chromium (Debian's
// /usr/bin/chromium, driven by playwright-core; no browser is downloaded)
// opens a stream through nginx on a page of the same origin, events are
// published through nginx, the edge holding the stream (found with
// GET /v1/presence) is killed with SIGKILL half-way, and the page must end with
// every event exactly once, in order, its EventSource never CLOSED (a non-200
// answer would close it for good).
//
// Env: BASE (nginx URL), USER_ID, SUB_TOKEN, PUB_TOKEN, EVENTS (default 40),
// KILL_EDGE (a command; "{n}" is replaced by the edge number, 1..3).
import { execSync } from 'node:child_process';
import { chromium } from 'playwright-core';

const base = process.env.BASE;
const user = process.env.USER_ID ?? 'chromium';
const events = Number(process.env.EVENTS ?? 40);
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

async function publish(k) {
  const response = await fetch(`${base}/v1/publish`, {
    method: 'POST',
    headers: { authorization: `Bearer ${process.env.PUB_TOKEN}`, 'content-type': 'application/json' },
    body: JSON.stringify({ user, data: String(k), msg_id: `chromium-${k}` }),
  });
  if (response.status !== 200) throw new Error(`publish ${k}: ${response.status} ${await response.text()}`);
}

async function edgeHoldingTheStream() {
  const response = await fetch(`${base}/v1/presence/${encodeURIComponent(user)}`, {
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

  let killed;
  for (let k = 1; k <= events; k++) {
    await publish(k);
    if (k === Math.floor(events / 2)) {
      // Wait until the browser has what was sent so far, then kill its edge.
      await page.waitForFunction(n => window.received.length >= n, k, { timeout: 15000 });
      killed = await edgeHoldingTheStream();
      const number = killed?.replace(/^edge-/, '');
      if (!number) throw new Error(`no edge holds ${user}'s stream`);
      execSync(process.env.KILL_EDGE.replaceAll('{n}', number), { stdio: 'inherit' });
    }
    await sleep(50);
  }
  await page.waitForFunction(n => window.received.length >= n || window.closedForGood, events, { timeout: 30000 })
    .catch(() => {});
  const state = await page.evaluate(() => ({
    data: window.received.map(e => e.data),
    closedForGood: window.closedForGood,
    errors: window.errors,
    opens: window.opens,
  }));
  const expected = Array.from({ length: events }, (_, i) => String(i + 1));
  const lost = expected.filter(k => !state.data.includes(k)).length;
  const duplicated = state.data.length - new Set(state.data).size;
  const ordered = state.data.every((d, i) => i === 0 || Number(d) > Number(state.data[i - 1]));
  verdict = {
    killed,
    published: events,
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
