// Drives the npm `eventsource` package (a WHATWG-conformant EventSource) against
// a Herald stream and reports what it sees, one JSON object per line:
//   {"status":"open"}                      on every (re)connection
//   {"status":"error","readyState":n}      on every error
//   {"type":..., "id":..., "data":...}     for every event
// Usage: node eventsource-client.mjs URL COUNT TIMEOUT_MS [EVENT_TYPE ...]
// Exits 0 after COUNT events, 1 on timeout.
import { EventSource } from "eventsource";

const [url, count, timeoutMs, ...types] = process.argv.slice(2);
const wanted = Number(count);
let received = 0;

const print = (object) => process.stdout.write(JSON.stringify(object) + "\n");
const source = new EventSource(url);

const onEvent = (event) => {
  print({ type: event.type, id: event.lastEventId, data: event.data });
  received += 1;
  if (received >= wanted) {
    source.close();
    process.exit(0);
  }
};

source.addEventListener("open", () => print({ status: "open" }));
source.addEventListener("error", () => print({ status: "error", readyState: source.readyState }));
source.addEventListener("message", onEvent);
for (const type of types) source.addEventListener(type, onEvent);

setTimeout(() => {
  print({ status: "timeout", received });
  process.exit(1);
}, Number(timeoutMs));
