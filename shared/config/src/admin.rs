//! `[admin]`: the operators' listener ([`AdminSettings`]): `/metrics`,
//! `/v1/cluster`, `/healthz` and `/readyz`, kept off the public port.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The admin listener: metrics, the cluster view and the health probes, for
/// Prometheus, probes and operators. The public listener (`http.listen`)
/// answers these paths with 404, so what the internet reaches never shows
/// node ids, addresses or load.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Address of the admin listener. Default `127.0.0.1:9090` (loopback:
    /// only this machine can ask); `0.0.0.0:9090` in a container whose probes
    /// or Prometheus come from outside it, with the port kept off public load
    /// balancers. Several nodes on one machine each need their own port; port
    /// 0 picks a free one, logged in the node's `listening` line.
    pub listen: String,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            listen: "127.0.0.1:9090".into(),
        }
    }
}

impl AdminSettings {
    /// The listen address. Valid after [`Settings::validate`](crate::Settings::validate).
    pub fn listen_addr(&self) -> Result<SocketAddr, std::net::AddrParseError> {
        self.listen.parse()
    }

    /// The address, and that it is not the public listener's.
    pub(crate) fn validate(&self, http_listen: &str, problems: &mut Vec<String>) {
        match self.listen_addr() {
            Err(err) => problems.push(format!(
                "admin.listen: {:?} is not an address like 127.0.0.1:9090 ({err})",
                self.listen
            )),
            Ok(admin) => {
                let same = http_listen
                    .parse::<SocketAddr>()
                    .is_ok_and(|http| http == admin && admin.port() != 0);
                if same {
                    problems.push(format!(
                        "admin.listen: {admin} is http.listen too; the admin listener needs a port of its own"
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::load::testing::{SECRET, load};

    #[test]
    fn the_admin_listener_defaults_to_loopback() {
        let settings = load(&[("HERALD__AUTH__HS256_SECRET", SECRET)]).expect("valid");
        let admin = settings.admin.listen_addr().expect("an address");
        assert!(admin.ip().is_loopback(), "{admin}");
        assert_eq!(admin.port(), 9090);
        assert_ne!(settings.admin.listen, settings.http.listen);
    }

    #[test]
    fn the_admin_address_comes_from_the_environment_and_is_checked() {
        let settings = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__ADMIN__LISTEN", "0.0.0.0:9100"),
        ])
        .expect("valid");
        assert_eq!(settings.admin.listen, "0.0.0.0:9100");

        let err = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__ADMIN__LISTEN", "metrics-please"),
        ])
        .expect_err("invalid");
        assert!(err.to_string().contains("admin.listen"), "{err}");

        let err = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__HTTP__LISTEN", "0.0.0.0:8080"),
            ("HERALD__ADMIN__LISTEN", "0.0.0.0:8080"),
        ])
        .expect_err("one port for both");
        assert!(err.to_string().contains("port of its own"), "{err}");
    }

    #[test]
    fn both_listeners_may_pick_free_ports() {
        let settings = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__HTTP__LISTEN", "127.0.0.1:0"),
            ("HERALD__ADMIN__LISTEN", "127.0.0.1:0"),
        ])
        .expect("port 0 twice is two free ports");
        assert_eq!(settings.admin.listen, "127.0.0.1:0");
    }
}
