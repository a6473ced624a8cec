//! The admin API: gRPC on a unix socket (`0600`; callers must be root or the daemon's own uid, by
//! peer credentials) through which `tbotctl` reads status and asks for a convergence.

pub mod diag;
pub mod server;

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

/// Where the admin socket of a daemon running these documents is: the `issuer` document's when
/// there is one (an issuer host), else the agent config's.
pub fn socket_for(state: &DesiredState) -> Option<PathBuf> {
    let issuer = state.objects.values().find_map(|o| match &o.document {
        Document::Issuer(i) => Some(i.admin_socket()),
        _ => None,
    });
    issuer.or_else(|| {
        state.objects.values().find_map(|o| match &o.document {
            Document::AgentConfig(a) => Some(socket_path(a)),
            _ => None,
        })
    })
}
