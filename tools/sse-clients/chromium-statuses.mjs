// What a real browser's EventSource does with each answer to GET /v1/stream,
// and that Herald's documented client behaviour (docs/api.md, "What a browser
// does with each answer") gets a page through them. Headless Chromium (Debian's
// /usr/bin/chromium, driven by playwright-core; no browser is downloaded)
// opens every stream directly on one edge (EDGE), from a page of that origin
// (the edge serves no HTML, so page.route fulfils a tiny document for
// ${EDGE}/chromium-page). Nothing goes through nginx's /v1/stream, whose
// access log must only ever show 200s.
//
// Proven, each from the page (requests counted with page.on('request'),
// readyState read in onerror):
//   - a real 401 from Herald (bad token) and a real 429 from Herald (the user
//     already holds stream.max_connections_per_user streams on the node, held
//     here by Node) leave the EventSource CLOSED after exactly one request: the
//     browser never retries, as the HTML spec says for any non-200 answer;
//   - so do a 503, a 204 and a 200 with the wrong content type, which Herald
//     never sends on /v1/stream; they are forced with page.route;
//   - by contrast, the bytes of Herald's 200 refusal (": node_full", a
//     "retry:" hint, end of stream; forced here, as a real one needs a full
//     node) keep the browser reconnecting by itself. The real draining refusal
//     is covered by the rolling-restart and chromium-edge-kill scenarios;
//   - the re-creating wrapper documented in docs/api.md recovers: after a 401
//     it opens with a new token; refused with 429 it keeps re-creating the
//     EventSource after a backoff, and once the user's streams are released it
//     resumes with ?last_event_id= from the last id it saw: the event published
//     while it was refused is replayed, the next arrives live, and nothing is
//     lost or received twice.
//
// Env: BASE (nginx URL, used to publish), EDGE (one edge's own URL), USER_ID,
// SUB_TOKEN (subscriber token for USER_ID), PUB_TOKEN, MAX_PER_USER (the
// edge's stream.max_connections_per_user, default 32).
// Prints one JSON line {"checks":[{name, expected, got, pass}, ...]}; exits 0
// only if every check passes.
import { chromium } from 'playwright-core';

const base = process.env.BASE;
const edge = process.env.EDGE;
const user = process.env.USER_ID ?? 'chromium-statuses';
const subToken = process.env.SUB_TOKEN;
const pubToken = process.env.PUB_TOKEN;
const maxPerUser = Number(process.env.MAX_PER_USER ?? 32);
// Longer than any reconnection delay the browser would use here: Herald's
// retry hints are 1-3 s, and Chromium's own default is 3 s.
const RETRY_WINDOW_MS = 3500;
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

const checks = [];
function check(name, expected, got) {
  checks.push({ name, expected, got, pass: expected === got });
  console.error(`${expected === got ? 'ok  ' : 'FAIL'} ${name}: expected ${expected}, got ${got}`);
}

async function publish(data) {
  const response = await fetch(`${base}/v1/publish`, {
    method: 'POST',
    headers: { authorization: `Bearer ${pubToken}`, 'content-type': 'application/json' },
    body: JSON.stringify({ user, data }),
  });
  if (response.status !== 200) throw new Error(`publish ${data}: ${response.status} ${await response.text()}`);
}

// The number of streams USER_ID holds on the cluster (they are all on EDGE).
async function streamsOfUser() {
  const response = await fetch(`${edge}/v1/presence/${encodeURIComponent(user)}`, {
    headers: { authorization: `Bearer ${pubToken}` },
  });
  return (await response.json()).connections;
}

async function waitUntil(what, condition, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await sleep(100);
  }
}

// Opens a stream for USER_ID on EDGE from Node. A 200's body is read and
// discarded until release() aborts it; any other answer is returned as is.
async function holdStream() {
  const controller = new AbortController();
  const response = await fetch(`${edge}/v1/stream`, {
    headers: { authorization: `Bearer ${subToken}` },
    signal: controller.signal,
  });
  if (response.status !== 200) {
    return { status: response.status, retryAfter: response.headers.get('retry-after'), body: await response.text() };
  }
  const reader = response.body.getReader();
  const stream = { status: 200, endedEarly: false, release: () => controller.abort() };
  (async () => {
    while (!(await reader.read()).done);
    stream.endedEarly = true; // the edge ended it (e.g. a rebalancing move)
  })().catch(() => {});
  return stream;
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const held = [];
let page;
const requests = {};
try {
  page = await browser.newPage();
  page.on('console', message => console.error(`page: ${message.text()}`));

  // Stream requests the page made, by their case= parameter (Herald ignores
  // parameters it does not know).
  page.on('request', request => {
    const url = new URL(request.url());
    if (url.pathname === '/v1/stream') {
      const name = url.searchParams.get('case');
      requests[name] = (requests[name] ?? 0) + 1;
    }
  });
  await page.route(`${edge}/chromium-page`, route =>
    route.fulfill({ status: 200, contentType: 'text/html', body: '<!doctype html><title>herald</title>' }));
  // Answers Herald never gives on /v1/stream, forced.
  const forced = {
    503: { status: 503, contentType: 'application/json', body: '{"error":"unavailable","message":"forced"}' },
    204: { status: 204, body: '' },
    'text-plain': { status: 200, contentType: 'text/plain', body: 'not a stream\n' },
    // Byte for byte what a full node answers (docs/api.md, "Refusals that pass").
    'node-full': { status: 200, contentType: 'text/event-stream; charset=utf-8', body: ': node_full\n\nretry: 500\n\n' },
  };
  await page.route(url => url.pathname === '/v1/stream' && url.searchParams.has('forced'),
    route => route.fulfill(forced[new URL(route.request().url()).searchParams.get('forced')]));

  await page.goto(`${edge}/chromium-page`);
  await page.evaluate(() => {
    const names = ['CONNECTING', 'OPEN', 'CLOSED'];
    window.sources = {};
    // A bare EventSource, observed.
    window.probe = (name, url) => {
      const seen = { errors: 0, stateAfterError: null, everClosed: false };
      const source = new EventSource(url);
      source.onerror = () => {
        seen.errors += 1;
        seen.stateAfterError = names[source.readyState];
        if (source.readyState === EventSource.CLOSED) seen.everClosed = true;
      };
      window.sources[name] = { source, seen };
    };
    window.stateOf = name => ({ ...window.sources[name].seen, now: names[window.sources[name].source.readyState] });

    // The re-creating wrapper of docs/api.md ("What a browser does with each
    // answer"), with counters for the test. A CLOSED EventSource was refused
    // for good (the page cannot see the status: 401, 429 or anything else), so
    // it is re-created after a backoff, with a fresh token and the last id seen.
    window.subscribe = (name, getToken, onEvent, lastId) => {
      const state = { attempts: 0, opens: 0, closedForGood: 0, stopped: false };
      let delay = 1000;
      let es;
      async function connect() {
        if (state.stopped) return;
        const q = new URLSearchParams({ access_token: await getToken(), case: name });
        if (lastId) q.set('last_event_id', lastId);
        state.attempts += 1;
        es = new EventSource(`/v1/stream?${q}`);
        es.onopen = () => { state.opens += 1; delay = 1000; };
        es.onmessage = e => { lastId = e.lastEventId; onEvent(e); };
        es.onerror = () => {
          if (es.readyState !== EventSource.CLOSED) return; // the browser reconnects by itself
          state.closedForGood += 1;
          setTimeout(connect, delay);
          delay = Math.min(delay * 2, 30000);
        };
      }
      connect();
      state.stop = () => { state.stopped = true; es.close(); return lastId; };
      return state;
    };
    window.received = [];
    window.wrappers = {};
    window.statsOf = name => {
      const { attempts, opens, closedForGood } = window.wrappers[name];
      return { attempts, opens, closedForGood };
    };
  });

  // A bare EventSource refused for good: CLOSED after its error, and still
  // one request after RETRY_WINDOW_MS. Waiting a fixed time is acceptable
  // only because the claim is an absence (no second request).
  async function noRetry(name, url) {
    await page.evaluate(([name, url]) => window.probe(name, url), [name, url]);
    await page.waitForFunction(name => window.sources[name].seen.errors > 0, name, { timeout: 10000 });
    await sleep(RETRY_WINDOW_MS);
    const seen = await page.evaluate(name => window.stateOf(name), name);
    await page.evaluate(name => window.sources[name].source.close(), name);
    const count = requests[name] ?? 0;
    return `${seen.stateAfterError} after ${count} request${count === 1 ? '' : 's'}` +
      (seen.now !== seen.stateAfterError ? ` (then ${seen.now})` : '');
  }
  const closedAfterOne = 'CLOSED after 1 request';

  check('401 from Herald (bad token)', closedAfterOne,
    await noRetry('401', '/v1/stream?access_token=garbage&case=401'));
  check('503 (forced)', closedAfterOne, await noRetry('503', '/v1/stream?forced=503&case=503'));
  check('204 (forced)', closedAfterOne, await noRetry('204', '/v1/stream?forced=204&case=204'));
  check('200 text/plain (forced)', closedAfterOne,
    await noRetry('text-plain', '/v1/stream?forced=text-plain&case=text-plain'));

  // Contrast: Herald's 200 refusal. The browser reconnects by itself, after
  // the hint, and never closes.
  await page.evaluate(() => window.probe('node-full', '/v1/stream?forced=node-full&case=node-full'));
  await page.waitForFunction(() => window.sources['node-full'].seen.errors >= 3, null, { timeout: 10000 })
    .catch(() => {});
  {
    const seen = await page.evaluate(() => window.stateOf('node-full'));
    await page.evaluate(() => window.sources['node-full'].source.close());
    const count = requests['node-full'] ?? 0;
    check("Herald's 200 refusal (': node_full' + retry: 500, forced)", 'CONNECTING after each end, 3+ requests',
      `${seen.everClosed ? 'CLOSED once' : 'CONNECTING'} after each end, ${count >= 3 ? '3+' : count} requests`);
  }

  // The wrapper after a 401: the first token is bad, the next one works.
  await page.evaluate(([good]) => {
    const tokens = ['garbage', good];
    window.wrappers['401-then-token'] = window.subscribe('401-then-token', async () => tokens.shift() ?? good,
      e => window.received.push({ id: e.lastEventId, data: e.data }));
  }, [subToken]);
  await page.waitForFunction(() => window.wrappers['401-then-token'].opens > 0, null, { timeout: 10000 });
  await publish('s1');
  await page.waitForFunction(() => window.received.some(e => e.data === 's1'), null, { timeout: 10000 });
  {
    const w = await page.evaluate(() => window.statsOf('401-then-token'));
    check('wrapper: 401, then a new token', 'open on attempt 2 (1 CLOSED), s1 received',
      `open on attempt ${w.attempts} (${w.closedForGood} CLOSED), s1 received`);
  }
  // The page stops that stream and keeps its last id, as an app would across
  // a page of its own; the edge must have let go of it before Node fills up.
  const lastId = await page.evaluate(() => window.wrappers['401-then-token'].stop());
  await waitUntil('the page\'s stream is released', async () => (await streamsOfUser()) === 0, 20000);

  // Node takes every stream the user may hold on EDGE; the next one is a 429.
  let refusal;
  for (let n = 0; n < maxPerUser + 10 && !refusal; n++) {
    const answer = await holdStream();
    if (answer.status === 200) held.push(answer);
    else refusal = answer;
  }
  check('Node: the stream after the per-user limit',
    `429 too_many_streams, Retry-After 5, after ${maxPerUser} streams`,
    refusal ? `${refusal.status} ${JSON.parse(refusal.body).error}, Retry-After ${refusal.retryAfter}, after ${held.length} streams`
      : `no refusal after ${held.length} streams`);

  check('429 from Herald (user full)', closedAfterOne, await noRetry('429', '/v1/stream?access_token=' +
    encodeURIComponent(subToken) + '&case=429'));

  // Refused, the wrapper keeps re-creating with the last id it saw (s1's);
  // s2 is published meanwhile.
  await publish('s2');
  await page.evaluate(([token, lastId]) => {
    window.wrappers['429-recovery'] = window.subscribe('429-recovery', async () => token,
      e => window.received.push({ id: e.lastEventId, data: e.data }), lastId);
  }, [subToken, lastId]);
  await page.waitForFunction(() => window.wrappers['429-recovery'].closedForGood >= 2 ||
    window.wrappers['429-recovery'].opens > 0, null, { timeout: 15000 });
  const whileFull = await page.evaluate(() => window.statsOf('429-recovery'));
  const stillOpen = held.filter(stream => !stream.endedEarly).length;
  check('Node: its streams stay open while the page is refused', `${maxPerUser} of ${maxPerUser} open`,
    `${stillOpen} of ${held.length} open`);
  for (const stream of held.splice(0)) stream.release();
  await page.waitForFunction(() => window.wrappers['429-recovery'].opens > 0, null, { timeout: 20000 });
  await publish('s3');
  await page.waitForFunction(() => window.received.some(e => e.data === 's3'), null, { timeout: 10000 });
  // Anything late or doubled would show up in this time.
  await sleep(500);
  const after = await page.evaluate(() => ({ ...window.statsOf('429-recovery'), received: window.received }));
  check('wrapper: refused with 429, re-created after backoff', 'CLOSED each time, no open while full; opens once released',
    `${whileFull.closedForGood === whileFull.attempts ? 'CLOSED each time' : `${whileFull.closedForGood} CLOSED of ${whileFull.attempts}`}` +
    `, ${whileFull.opens === 0 ? 'no open' : `${whileFull.opens} opens`} while full; ` +
    `${after.opens > 0 ? 'opens once released' : 'never opens'}`);
  check('wrapper: resumes with last_event_id across the refusal', 's1 s2 s3, each once',
    `${after.received.map(e => e.data).join(' ')}` +
    `${new Set(after.received.map(e => e.id)).size === after.received.length ? ', each once' : ', an id twice'}`);
  console.error(`429 wrapper: ${whileFull.attempts} attempts while full, ${after.attempts} in all; ` +
    `requests ${JSON.stringify(requests)}`);
  await page.evaluate(() => window.wrappers['429-recovery'].stop());
} catch (err) {
  checks.push({ name: 'the run', expected: 'completes', got: String(err.message ?? err).split('\n')[0], pass: false });
  console.error(err);
  console.error(`requests ${JSON.stringify(requests)}; wrappers ` +
    JSON.stringify(await page?.evaluate(() => Object.fromEntries(
      Object.keys(window.wrappers ?? {}).map(name => [name, window.statsOf(name)]))).catch(e => String(e))));
} finally {
  for (const stream of held) stream.release();
  await browser.close();
}
console.log(JSON.stringify({ checks }));
process.exit(checks.every(c => c.pass) ? 0 : 1);
