//! Cluster-wide presence: which nodes hold streams of a user, and how many.
//!
//! Per-user state does not belong in gossip (it would not scale), so the
//! answer is asked for when needed: the node publishes one NATS request on
//! `<nats.live_prefix>.presence` and every node answers with its own count
//! (zero included). Gossip tells how many alive members to wait for, so the
//! answer is complete as soon as they all replied; otherwise it is what
//! arrived within `nats.presence_timeout_ms`, marked incomplete.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use herald_protocol::Target;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;

/// One node's part of a presence answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct NodePresence {
    /// Node id.
    pub(crate) node: String,
    /// The user's open streams there.
    pub(crate) connections: usize,
}

/// The body of `GET /v1/presence/{user}`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PresenceAnswer {
    /// The user asked about.
    pub(crate) user: String,
    /// At least one stream open somewhere.
    pub(crate) online: bool,
    /// Streams over all nodes that answered.
    pub(crate) connections: usize,
    /// Nodes holding at least one stream of the user, by id.
    pub(crate) nodes: Vec<NodePresence>,
    /// Nodes that answered (those with no stream too).
    pub(crate) answered: usize,
    /// Alive members gossip knows of (a complete answer has all of theirs);
    /// `null` without gossip.
    pub(crate) expected: Option<usize>,
    /// Every expected node answered before the timeout.
    pub(crate) complete: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    user: String,
}

/// Asks and answers presence questions over NATS (or locally on the memory bus).
#[derive(Debug, Clone)]
pub(crate) struct Presence {
    client: Option<async_nats::Client>,
    subject: String,
    node_id: String,
    registry: Arc<Registry>,
    timeout: Duration,
}

impl Presence {
    /// Presence over `client` (`None`: this node alone, memory bus).
    pub(crate) fn new(
        client: Option<async_nats::Client>,
        live_prefix: &str,
        node_id: &str,
        registry: Arc<Registry>,
        timeout: Duration,
    ) -> Self {
        Presence {
            client,
            subject: format!("{live_prefix}.presence"),
            node_id: node_id.to_string(),
            registry,
            timeout,
        }
    }

    /// This node's part for `user`.
    fn local(&self, user: &Target) -> NodePresence {
        NodePresence {
            node: self.node_id.clone(),
            connections: self.registry.connections_of(user),
        }
    }

    /// Answers other nodes' questions until `shutdown`.
    pub(crate) async fn serve(self, shutdown: CancellationToken) {
        let Some(client) = &self.client else {
            return;
        };
        let mut requests = match client.subscribe(self.subject.clone()).await {
            Ok(subscriber) => subscriber,
            Err(err) => {
                tracing::error!(subject = %self.subject, error = %err, "cannot answer presence requests");
                return;
            }
        };
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return,
                message = requests.next() => match message {
                    Some(message) => message,
                    None => return,
                },
            };
            let Some(reply) = message.reply else {
                continue;
            };
            let user = match serde_json::from_slice::<Request>(&message.payload)
                .ok()
                .and_then(|request| Target::user(request.user).ok())
            {
                Some(user) => user,
                None => {
                    tracing::debug!(subject = %message.subject, "ignoring a malformed presence request");
                    continue;
                }
            };
            let answer = serde_json::to_vec(&self.local(&user)).unwrap_or_default();
            if let Err(err) = client.publish(reply, Bytes::from(answer)).await {
                tracing::debug!(error = %err, "cannot answer a presence request");
            }
        }
    }

    /// Asks every node about `user`; `expected` are the ids of the alive
    /// members whose answers make it complete, when gossip knows them.
    pub(crate) async fn ask(&self, user: &Target, expected: Option<Vec<String>>) -> PresenceAnswer {
        let parts = match &self.client {
            None => vec![self.local(user)],
            Some(client) => self.ask_nats(client, user, expected.as_deref()).await,
        };
        let answered = parts.len();
        let complete = match (&self.client, &expected) {
            (None, _) => true,
            (Some(_), Some(expected)) => all_answered(expected, &parts),
            (Some(_), None) => false,
        };
        let mut nodes: Vec<NodePresence> =
            parts.into_iter().filter(|p| p.connections > 0).collect();
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        let connections = nodes.iter().map(|n| n.connections).sum();
        PresenceAnswer {
            user: user.name().to_string(),
            online: connections > 0,
            connections,
            nodes,
            answered,
            expected: expected.map(|ids| ids.len()),
            complete,
        }
    }

    async fn ask_nats(
        &self,
        client: &async_nats::Client,
        user: &Target,
        expected: Option<&[String]>,
    ) -> Vec<NodePresence> {
        let inbox = client.new_inbox();
        let mut replies = match client.subscribe(inbox.clone()).await {
            Ok(subscriber) => subscriber,
            Err(err) => {
                tracing::warn!(error = %err, "presence: cannot subscribe to the reply inbox");
                return vec![self.local(user)];
            }
        };
        let request = serde_json::to_vec(&Request {
            user: user.name().to_string(),
        })
        .unwrap_or_default();
        if let Err(err) = client
            .publish_with_reply(self.subject.clone(), inbox, Bytes::from(request))
            .await
        {
            tracing::warn!(error = %err, "presence: cannot publish the request");
            return vec![self.local(user)];
        }
        let mut parts: Vec<NodePresence> = Vec::new();
        let deadline = tokio::time::Instant::now() + self.timeout;
        while expected.is_none_or(|expected| !all_answered(expected, &parts)) {
            match tokio::time::timeout_at(deadline, replies.next()).await {
                Ok(Some(reply)) => match serde_json::from_slice::<NodePresence>(&reply.payload) {
                    // One answer per node, even if a reply is delivered twice.
                    Ok(part) if !parts.iter().any(|p| p.node == part.node) => parts.push(part),
                    Ok(_) => {}
                    Err(err) => tracing::debug!(error = %err, "presence: malformed reply"),
                },
                Ok(None) | Err(_) => break,
            }
        }
        let _ = replies.unsubscribe().await;
        parts
    }
}

fn all_answered(expected: &[String], parts: &[NodePresence]) -> bool {
    expected
        .iter()
        .all(|id| parts.iter().any(|part| part.node == *id))
}
