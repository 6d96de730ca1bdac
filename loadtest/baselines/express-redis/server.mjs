// The reference design from the seed article, as a baseline for Herald's load
// tests: Express writes SSE frames, Redis pub/sub carries events between
// publishers and the server, one Redis subscription per connection. It speaks
// Herald's two endpoints so the same load generator drives both. Like the
// article, it has no replay, no ids and no authentication (the token's `sub` is
// read, not verified).
import express from "express";
import { createClient } from "redis";

const port = Number(process.env.PORT ?? 18090);
const publisher = createClient({ url: process.env.REDIS_URL ?? "redis://127.0.0.1:6379" });
const subscriber = publisher.duplicate();
await publisher.connect();
await subscriber.connect();

function userOf(token) {
  try {
    return JSON.parse(Buffer.from(token.split(".")[1], "base64url").toString()).sub ?? null;
  } catch {
    return null;
  }
}

const app = express();

app.get("/v1/stream", async (req, res) => {
  const user = userOf(String(req.query.access_token ?? ""));
  if (!user) return res.status(401).end();
  res.setHeader("Content-Type", "text/event-stream");
  res.setHeader("Cache-Control", "no-cache");
  res.setHeader("Connection", "keep-alive");
  res.write(": connected\n\n");
  const channels = [`events:${user}`, ...[].concat(req.query.topic ?? []).map((t) => `topic:${t}`)];
  const listener = (message) => res.write(`data: ${message}\n\n`);
  for (const channel of channels) await subscriber.subscribe(channel, listener);
  req.on("close", () => {
    for (const channel of channels) subscriber.unsubscribe(channel, listener);
  });
});

app.post("/v1/publish", express.json({ limit: "64kb" }), async (req, res) => {
  const { user, topic, data } = req.body ?? {};
  const channel = user ? `events:${user}` : `topic:${topic}`;
  await publisher.publish(channel, typeof data === "string" ? data : JSON.stringify(data));
  res.json({ ok: true });
});

app.get("/readyz", (_req, res) => res.json({ status: "ready" }));

app.listen(port, "127.0.0.1");
