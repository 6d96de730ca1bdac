// Clients and a publisher we did not write, across edge faults: CLIENTS npm
// `eventsource` clients (one user each) stream through nginx while the Node
// `nats` client publishes straight into JetStream, as an application in
// another language would (Herald's subject rule and headers, a Nats-Msg-Id per
// event, retried with the same id until acknowledged). Half-way through the
// first third edge-1 is killed with SIGKILL (back 2 s later); in the second,
// edge-2 is stopped with SIGTERM (it drains) and started again. Every client
// must end with each of its user's events exactly once, in order, and never
// reach readyState CLOSED (a non-200 answer would close it for good).
//
// Env: BASE (nginx URL), NATS_URL (comma-separated), TOKENS (JSON object:
// user -> subscriber token), EVENTS (per user, default 30), KILL_EDGE,
// START_EDGE, RESTART_EDGE (commands; "{n}" is the edge number).
// Prints one JSON verdict; exits 0 when it passes.
import { exec } from 'node:child_process';
import { promisify } from 'node:util';
import { EventSource } from 'eventsource';
import { connect, headers } from 'nats';

const base = process.env.BASE;
const tokens = JSON.parse(process.env.TOKENS);
const users = Object.keys(tokens);
const perUser = Number(process.env.EVENTS ?? 30);
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));
const run = promisify(exec);
const command = (name, n) => run(process.env[name].replaceAll('{n}', String(n)));

// Herald's subject rule: plain [A-Za-z0-9_-] names are their own token,
// anything else is "~" + unpadded base64url of the UTF-8 bytes.
const subjectToken = name =>
  /^[A-Za-z0-9_-]+$/.test(name) ? name : '~' + Buffer.from(name, 'utf8').toString('base64url');

const clients = users.map(user => {
  const client = { user, data: [], opens: 0, closedForGood: false };
  client.source = new EventSource(`${base}/v1/stream?access_token=${encodeURIComponent(tokens[user])}`);
  client.source.addEventListener('open', () => { client.opens += 1; });
  client.source.addEventListener('error', () => {
    if (client.source.readyState === EventSource.CLOSED) client.closedForGood = true;
  });
  client.source.addEventListener('message', event => client.data.push(Number(event.data)));
  return client;
});

async function until(condition, limitMs) {
  const deadline = Date.now() + limitMs;
  while (!condition() && Date.now() < deadline) await sleep(20);
  return condition();
}

const nc = await connect({ servers: process.env.NATS_URL.split(','), maxReconnectAttempts: -1 });
const js = nc.jetstream();
async function publish(user, k) {
  const h = headers();
  h.set('Herald-Event', 'message');
  for (let attempt = 0; ; attempt++) {
    try {
      await js.publish(`herald.user.${subjectToken(user)}`, new TextEncoder().encode(String(k)),
        { headers: h, msgID: `npm-${user}-${k}`, timeout: 2000 });
      return;
    } catch (err) {
      if (attempt >= 30) throw new Error(`publish ${user}/${k}: ${err}`);
      await sleep(100);
    }
  }
}

// One round: event k to every user, then a pause.
let k = 0;
async function rounds(count) {
  for (let i = 0; i < count; i++) {
    k += 1;
    await Promise.all(users.map(user => publish(user, k)));
    await sleep(50);
  }
}
// Rounds until `done` settles.
async function roundsWhile(done) {
  let settled = false;
  const finished = done.finally(() => { settled = true; });
  while (!settled) await rounds(1);
  await finished;
}

let verdict;
try {
  if (!await until(() => clients.every(c => c.opens > 0), 15000)) throw new Error('not every client opened');
  const third = Math.max(1, Math.floor(perUser / 3));
  await rounds(Math.floor(third / 2));
  await command('KILL_EDGE', 1);
  await rounds(third - Math.floor(third / 2));
  await roundsWhile(sleep(2000).then(() => command('START_EDGE', 1)));
  await roundsWhile(command('RESTART_EDGE', 2));
  while (k < perUser) await rounds(1);
  await until(() => clients.every(c => c.data.length >= k || c.closedForGood), 30000);

  let lost = 0, duplicated = 0, reordered = 0;
  for (const c of clients) {
    lost += Array.from({ length: k }, (_, i) => i + 1).filter(n => !c.data.includes(n)).length;
    duplicated += c.data.length - new Set(c.data).size;
    reordered += c.data.filter((n, i) => i > 0 && n <= c.data[i - 1]).length;
  }
  const reconnects = clients.reduce((sum, c) => sum + c.opens - 1, 0);
  const closedForGood = clients.filter(c => c.closedForGood).length;
  verdict = {
    clients: clients.length,
    published: k * users.length,
    received: clients.reduce((sum, c) => sum + c.data.length, 0),
    lost, duplicated, reordered, reconnects, closed_for_good: closedForGood,
  };
  verdict.pass = lost === 0 && duplicated === 0 && reordered === 0 && closedForGood === 0 && reconnects > 0;
} finally {
  for (const c of clients) c.source.close();
  await nc.close();
}
console.log(JSON.stringify(verdict));
process.exit(verdict.pass ? 0 : 1);
