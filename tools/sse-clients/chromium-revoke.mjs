// What a real browser's EventSource does when its user is disconnected or
// revoked with POST /v1/disconnect (docs/api.md). Headless Chromium (Debian's
// /usr/bin/chromium, driven by playwright-core; no browser is downloaded)
// opens streams directly on one edge (EDGE), from a page of that origin
// (page.route fulfils a tiny document for ${EDGE}/chromium-page); the
// disconnect requests go to another edge (EDGE2), so the order crosses NATS.
//
// Proven, from the page (stream requests and their statuses counted with
// page.on('request') / page.on('response'), readyState read in onerror):
//   - disconnect with a reason, no revoke: the page receives the reason event,
//     then the EventSource reconnects by itself (CONNECTING, then OPEN again
//     with the same token);
//   - disconnect with "revoke": true: the page receives the reason event, the
//     browser's reconnect is answered 204 and the EventSource is CLOSED
//     (readyState 2), and it stays so: exactly two stream requests (the
//     stream, the refused reconnect), none after RETRY_WINDOW_MS;
//   - EDGE counted exactly one revoked refusal (METRICS, its /metrics);
//   - the old token gets 204 on the other edge too (asked from Node);
//   - a token minted after the revocation opens a stream in the page and
//     receives an event published to the user.
//
// Env: EDGE, EDGE2 (two edges' own URLs), METRICS (EDGE's /metrics URL,
// default ${EDGE}/metrics), USER_ID, USER_ID_2 (a second user,
// for the plain disconnect), SUB_TOKEN, SUB_TOKEN_2 (subscriber tokens for
// them, issued before the run), PUB_TOKEN, MINT_TOKEN (a shell command printing
// a fresh subscriber token for USER_ID; run after the revocation).
// Prints one JSON line {"checks":[{name, expected, got, pass}, ...]}; exits 0
// only if every check passes.
import { execSync } from 'node:child_process';
import { chromium } from 'playwright-core';

const edge = process.env.EDGE;
const edge2 = process.env.EDGE2 ?? edge;
// EDGE's Prometheus metrics (its admin listener when it has one).
const metrics = process.env.METRICS ?? `${edge}/metrics`;
const user = process.env.USER_ID ?? 'chromium-revoke';
const user2 = process.env.USER_ID_2 ?? 'chromium-disconnect';
const subToken = process.env.SUB_TOKEN;
const subToken2 = process.env.SUB_TOKEN_2;
const pubToken = process.env.PUB_TOKEN;
const mintToken = process.env.MINT_TOKEN;
// Longer than any reconnection delay the browser would use here: Herald's
// retry hints are 1-3 s, and Chromium's own default is 3 s.
const RETRY_WINDOW_MS = 3500;
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

const checks = [];
function check(name, expected, got) {
  checks.push({ name, expected, got, pass: expected === got });
  console.error(`${expected === got ? 'ok  ' : 'FAIL'} ${name}: expected ${expected}, got ${got}`);
}

async function post(path, body) {
  const response = await fetch(`${edge2}${path}`, {
    method: 'POST',
    headers: { authorization: `Bearer ${pubToken}`, 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  return { status: response.status, body: await response.json() };
}

// EDGE's count of stream requests refused as revoked.
async function revokedRefusals() {
  const text = await (await fetch(metrics)).text();
  return Number(text.match(/^herald_revoked_refusals_total (\d+)$/m)?.[1] ?? NaN);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
let page;
// Stream requests by their case= parameter (Herald ignores parameters it does
// not know), and the statuses answered, in order.
const requests = {};
const statuses = {};
try {
  page = await browser.newPage();
  page.on('console', message => console.error(`page: ${message.text()}`));
  page.on('request', request => {
    const url = new URL(request.url());
    if (url.pathname === '/v1/stream') {
      const name = url.searchParams.get('case');
      requests[name] = (requests[name] ?? 0) + 1;
    }
  });
  page.on('response', response => {
    const url = new URL(response.url());
    if (url.pathname === '/v1/stream') {
      const name = url.searchParams.get('case');
      (statuses[name] ??= []).push(response.status());
    }
  });
  await page.route(`${edge}/chromium-page`, route =>
    route.fulfill({ status: 200, contentType: 'text/html', body: '<!doctype html><title>herald</title>' }));
  await page.goto(`${edge}/chromium-page`);
  await page.evaluate(() => {
    const names = ['CONNECTING', 'OPEN', 'CLOSED'];
    window.sources = {};
    // A bare EventSource, observed: opens, errors with the readyState after
    // each, the reason events and messages it received.
    window.probe = (name, token) => {
      const seen = { opens: 0, errors: [], reasons: [], messages: [] };
      const q = new URLSearchParams({ access_token: token, case: name });
      const source = new EventSource(`/v1/stream?${q}`);
      source.onopen = () => { seen.opens += 1; };
      source.onerror = () => { seen.errors.push(names[source.readyState]); };
      source.onmessage = e => { seen.messages.push(e.data); };
      source.addEventListener('logged-out', e => { seen.reasons.push(e.data); });
      window.sources[name] = { source, seen };
    };
    window.stateOf = name => ({ ...window.sources[name].seen, now: names[window.sources[name].source.readyState] });
  });
  const stateOf = name => page.evaluate(name => window.stateOf(name), name);
  const waitFor = (what, name, predicate, timeout = 10000) =>
    page.waitForFunction(([name, source]) => (new Function('s', `return ${source}`))(window.stateOf(name)),
      [name, predicate], { timeout }).catch(() => { throw new Error(`timed out waiting until ${what}`); });

  // A plain disconnect: the reason event, then the browser comes back by itself.
  await page.evaluate(([token]) => window.probe('disconnect', token), [subToken2]);
  await waitFor('the plain stream opens', 'disconnect', 's.opens === 1');
  {
    const answer = await post('/v1/disconnect', { user: user2, reason: { type: 'logged-out', data: 'kicked' } });
    check('disconnect (no revoke) on the other edge', '202 revoked=false', `${answer.status} revoked=${answer.body.revoked}`);
  }
  await waitFor('the plain stream reopens', 'disconnect', 's.opens === 2', 15000);
  {
    const s = await stateOf('disconnect');
    check('disconnect: reason event, then the browser reconnects by itself',
      'reason kicked; error CONNECTING; open again (2 opens, statuses 200,200)',
      `reason ${s.reasons.join(',')}; error ${s.errors.join(',')}; ${s.now === 'OPEN' ? 'open again' : s.now} ` +
      `(${s.opens} opens, statuses ${(statuses.disconnect ?? []).join(',')})`);
    await page.evaluate(() => window.sources.disconnect.source.close());
  }

  // A revocation: the reason event, then CLOSED after the 204, for good.
  await page.evaluate(([token]) => window.probe('revoked', token), [subToken]);
  await waitFor('the stream to revoke opens', 'revoked', 's.opens === 1');
  let revokedBefore;
  const refusalsBefore = await revokedRefusals();
  {
    const answer = await post('/v1/disconnect', { user, revoke: true, reason: { type: 'logged-out', data: 'revoked' } });
    revokedBefore = answer.body.revoked_before;
    check('disconnect with revoke on the other edge', '202 revoked=true',
      `${answer.status} revoked=${answer.body.revoked}`);
  }
  await waitFor('the revoked EventSource is CLOSED', 'revoked', "s.now === 'CLOSED'", 15000);
  // The claim is an absence (no further request): a fixed wait is the test.
  await sleep(RETRY_WINDOW_MS);
  {
    const s = await stateOf('revoked');
    check('revoke: reason event, reconnect refused with 204, EventSource CLOSED for good',
      'reason revoked; errors CONNECTING,CLOSED; readyState 2 (CLOSED); 2 requests (200,204)',
      `reason ${s.reasons.join(',')}; errors ${s.errors.join(',')}; ` +
      `readyState ${['CONNECTING', 'OPEN', 'CLOSED'].indexOf(s.now)} (${s.now}); ` +
      `${requests.revoked ?? 0} requests (${(statuses.revoked ?? []).join(',')})`);
  }
  {
    // Counted at the node too: EDGE refused exactly one stream as revoked
    // (the browser's one reconnect).
    const refusals = (await revokedRefusals()) - refusalsBefore;
    check('revoke: stream requests EDGE refused as revoked (its herald_revoked_refusals_total)', '1', String(refusals));
  }
  {
    const response = await fetch(`${edge2}/v1/stream`, { headers: { authorization: `Bearer ${subToken}` } });
    check('the revoked token on the other edge', '204', String(response.status));
    await response.body?.cancel();
  }

  // A token issued after the revocation (iat > revoked_before) opens a stream.
  while (Math.floor(Date.now() / 1000) <= revokedBefore) await sleep(100);
  const newToken = execSync(mintToken, { encoding: 'utf8' }).trim();
  await page.evaluate(([token]) => window.probe('new-token', token), [newToken]);
  await waitFor('the new token opens', 'new-token', 's.opens === 1');
  {
    const published = await post('/v1/publish', { user, data: 'after-revoke' });
    if (published.status !== 200) throw new Error(`publish: ${published.status} ${JSON.stringify(published.body)}`);
  }
  await waitFor('the event arrives', 'new-token', "s.messages.includes('after-revoke')");
  {
    const s = await stateOf('new-token');
    check('a token minted after the revocation', 'OPEN, receives after-revoke (status 200)',
      `${s.now}, receives ${s.messages.join(',')} (status ${(statuses['new-token'] ?? []).join(',')})`);
    await page.evaluate(() => window.sources['new-token'].source.close());
  }
} catch (err) {
  checks.push({ name: 'the run', expected: 'completes', got: String(err.message ?? err).split('\n')[0], pass: false });
  console.error(err);
  console.error(`requests ${JSON.stringify(requests)} statuses ${JSON.stringify(statuses)}`);
} finally {
  await browser.close();
}
console.log(JSON.stringify({ checks }));
process.exit(checks.every(c => c.pass) ? 0 : 1);
