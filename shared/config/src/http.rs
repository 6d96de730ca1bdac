//! `[http]`: the public HTTP listener and its limits ([`HttpSettings`]).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The HTTP listener and its limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Address of the public listener: streams, publish and presence (the
    /// operators' endpoints are on `admin.listen`). Default `127.0.0.1:8080`;
    /// use `0.0.0.0:8080` in containers. Port 0 picks a free port (tests).
    pub listen: String,
    /// Connections the kernel may hold completed but not yet accepted, on
    /// both listeners. A burst larger than this (every client of a node
    /// coming back at once) has its extra connection attempts dropped, and
    /// each one waits for its SYN to be sent again, a second later. Linux caps
    /// it at `net.core.somaxconn` (4096 by default since 5.4). Default 4096,
    /// like nchan's benchmark configuration; tokio's own default is 1024.
    pub listen_backlog: u32,
    /// Largest accepted request body (`POST /v1/publish`), bytes. Default 65536.
    pub max_body_bytes: u64,
    /// Time a client has to send its complete request headers, milliseconds.
    /// Closes slowloris connections. Default 10000.
    pub header_read_timeout_ms: u64,
    /// Largest request head (request line plus headers), bytes; larger requests
    /// get 431. Default 16384, minimum 8192.
    pub max_header_bytes: usize,
    /// On shutdown, how long open requests may take to finish before they are
    /// cut, milliseconds. Default 10000.
    pub shutdown_grace_ms: u64,
    /// Browser origins allowed to call Herald from another origin (CORS), e.g.
    /// `https://app.example.com`; `*` allows any origin. Credentials (the token
    /// cookie) are allowed for listed origins. Comma-separated in the
    /// environment. Default: none (no CORS headers).
    pub cors_allowed_origins: Vec<String>,
    /// Publishes accepted per second from one publisher credential over HTTP
    /// (a token bucket allowing bursts of the same size); more get 429 with
    /// `Retry-After`. Default 1000.
    pub publish_rate_per_sec: u32,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            listen: "127.0.0.1:8080".into(),
            listen_backlog: 4096,
            max_body_bytes: 64 * 1024,
            header_read_timeout_ms: 10_000,
            max_header_bytes: 16 * 1024,
            shutdown_grace_ms: 10_000,
            cors_allowed_origins: Vec::new(),
            publish_rate_per_sec: 1000,
        }
    }
}

impl HttpSettings {
    /// The listen address. Valid after [`Settings::validate`](crate::Settings::validate).
    pub fn listen_addr(&self) -> Result<SocketAddr, std::net::AddrParseError> {
        self.listen.parse()
    }

    /// The listen address, the CORS origins and the header limit. (The zero
    /// checks of `max_body_bytes` and `header_read_timeout_ms` run first, in
    /// [`Settings::validate`](crate::Settings::validate).)
    pub(crate) fn validate(&self, problems: &mut Vec<String>) {
        if let Err(err) = self.listen_addr() {
            problems.push(format!(
                "http.listen: {:?} is not an address like 127.0.0.1:8080 ({err})",
                self.listen
            ));
        }
        for origin in &self.cors_allowed_origins {
            let valid = origin == "*"
                || ((origin.starts_with("http://") || origin.starts_with("https://"))
                    && !origin.ends_with('/'));
            if !valid {
                problems.push(format!(
                    "http.cors_allowed_origins: {origin:?} is not an origin like https://app.example.com (or *)"
                ));
            }
        }
        if self.listen_backlog == 0 {
            problems.push("http.listen_backlog must be at least 1".into());
        }
        if self.max_header_bytes < 8192 {
            problems.push("http.max_header_bytes must be at least 8192".into());
        }
    }
}
