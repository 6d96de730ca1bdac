// Publishes one Herald event with the Node `nats` client, exactly as a
// publisher in another language would, and prints the JetStream ack as JSON.
// Usage: node nats-publish.mjs NATS_URL USER_ID EVENT_TYPE DATA MSG_ID
import { connect, headers } from "nats";

// Herald's subject rule: plain [A-Za-z0-9_-] names are their own token,
// anything else is "~" + unpadded base64url of the UTF-8 bytes.
function subjectToken(name) {
  return /^[A-Za-z0-9_-]+$/.test(name) ? name : "~" + Buffer.from(name, "utf8").toString("base64url");
}

const [url, user, eventType, data, msgId] = process.argv.slice(2);
const nc = await connect({ servers: url });
const js = nc.jetstream();
const h = headers();
h.set("Herald-Event", eventType);
h.set("Nats-Msg-Id", msgId);
const ack = await js.publish(`herald.user.${subjectToken(user)}`, new TextEncoder().encode(data), { headers: h });
process.stdout.write(JSON.stringify({ seq: ack.seq, duplicate: ack.duplicate }) + "\n");
await nc.close();
