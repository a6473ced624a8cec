//! The admin API: gRPC on a unix socket (`0600`; callers must be root or the daemon's own uid, by
//! peer credentials) through which `tbotctl` reads status and asks for a convergence.

pub mod diag;
pub(crate) mod issued;
pub mod server;
mod strand;

/// The generated protobuf messages and gRPC service (from `proto/admin.proto`).
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("tbot.admin.v1");
}

use std::path::PathBuf;

use crate::manifest::DesiredState;
use crate::resource::Document;
use crate::resource::agent::{AgentConfig, StorageType};

/// Where the admin socket of a daemon with this config is: `admin_socket`, else
/// `<storage path>/admin.sock`, else (memory storage) `/run/tbot/admin.sock`.
pub fn socket_path(config: &AgentConfig) -> PathBuf {
    if let Some(path) = &config.admin_socket {
        return path.clone();
    }
    match config.storage.kind {
        StorageType::Directory => config
            .storage
            .path
            .clone()
            .unwrap_or_else(|| crate::resource::agent::Storage::DEFAULT_PATH.into())
            .join("admin.sock"),
        StorageType::Memory => PathBuf::from("/run/tbot/admin.sock"),
    }
}

/// Where the admin socket of a daemon running these documents is: the one a document sets (the
/// `issuer` document's `admin_socket`, else the agent config's), else the `issuer` document's
/// default (an issuer host), else the agent config's default. So an issuer host whose agent config
/// names its own socket uses it, and two daemons on one host do not meet at a default.
pub fn socket_for(state: &DesiredState) -> Option<PathBuf> {
    let issuer = state.objects.values().find_map(|o| match &o.document {
        Document::Issuer(i) => Some(i),
        _ => None,
    });
    let agent = state.objects.values().find_map(|o| match &o.document {
        Document::AgentConfig(a) => Some(a),
        _ => None,
    });
    let explicit = issuer
        .and_then(|i| i.spec.admin_socket.clone())
        .or_else(|| agent.and_then(|a| a.admin_socket.clone()));
    explicit
        .or_else(|| issuer.map(|i| i.admin_socket()))
        .or_else(|| agent.map(socket_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(text: &str) -> DesiredState {
        let loaded = crate::manifest::load_bytes(std::path::Path::new("docs.yaml"), text.as_bytes().to_vec());
        assert!(!loaded.has_errors(), "{:#?}", loaded.diagnostics);
        loaded.state
    }

    const ISSUER: &str = "kind: issuer\nversion: v1\nmetadata: {name: issuer}\nspec:\n  listen: 127.0.0.1:3025\n  \
                          storage: {type: directory, path: /var/lib/tbot/issuer}\n";
    const AGENT: &str = "version: v2\nproxy_server: example.org:443\nonboarding: {join_method: token, token: t}\n\
                         storage: {type: directory, path: /var/lib/tbot/agent}\n";

    #[test]
    fn an_admin_socket_a_document_names_wins_over_every_default() {
        let both = |issuer_extra: &str, agent_extra: &str| {
            socket_for(&state(&format!("{ISSUER}{issuer_extra}---\n{AGENT}{agent_extra}"))).unwrap()
        };
        assert_eq!(both("", ""), PathBuf::from("/var/lib/tbot/issuer/admin.sock"));
        // Two daemons on one host: the agent config's own socket is used, not the issuer default.
        assert_eq!(
            both("", "admin_socket: /run/tbot/mine.sock\n"),
            PathBuf::from("/run/tbot/mine.sock")
        );
        assert_eq!(
            both(
                "  admin_socket: /run/tbot/issuer.sock\n",
                "admin_socket: /run/tbot/mine.sock\n"
            ),
            PathBuf::from("/run/tbot/issuer.sock")
        );
        assert_eq!(
            socket_for(&state(AGENT)).unwrap(),
            PathBuf::from("/var/lib/tbot/agent/admin.sock")
        );
    }
}
