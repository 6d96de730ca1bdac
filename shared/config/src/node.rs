//! `[node]`: this node's identity ([`NodeSettings`]).

use serde::{Deserialize, Serialize};

/// This node's identity.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSettings {
    /// Node id shown in logs and cluster views. Default: the `HOSTNAME`
    /// environment variable, else `herald-<process id>`.
    pub id: Option<String>,
    /// The URL other nodes and operators use to reach this node's HTTP
    /// listener, shown in `/v1/cluster`, e.g. `http://edge-1:8080`. Default:
    /// `http://<gossip.advertise host>:<http.listen port>`.
    pub http_advertise: Option<String>,
}

impl NodeSettings {
    /// The configured id, or the documented fallback.
    pub fn resolved_id(&self) -> String {
        self.id
            .clone()
            .filter(|id| !id.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| format!("herald-{}", std::process::id()))
    }

    /// `node.http_advertise` must be an http(s) URL.
    pub(crate) fn validate(&self, problems: &mut Vec<String>) {
        if let Some(url) = &self.http_advertise {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                problems.push(format!(
                    "node.http_advertise: {url:?} is not a URL like http://edge-1:8080"
                ));
            }
        }
    }
}
