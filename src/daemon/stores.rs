//! The host's stores: the issuer's (an issuer host's `issuer.spec.storage`), the agent's
//! (`storage` of the agent config), and where the controller keeps its records (the issuer's on an
//! issuer host). One directory is opened, and locked, once.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::error::Explain;
use crate::manifest::{DesiredState, Location};
use crate::resource::agent::{AgentConfig, StorageType};
use crate::resource::issuer::IssuerStorageType;
use crate::resource::{Document, Kind};
use crate::store::{Store, StoreError};

/// The stores opened at start.
pub(super) struct Opened {
    /// The issuer host's store.
    pub issuer: Option<Store>,
    /// The agent's store, when there is an agent config.
    pub agent: Option<Store>,
    /// Where the controller's records go.
    pub records: Store,
}

impl Opened {
    pub fn open(
        config: Option<&AgentConfig>,
        issuer: Option<&crate::resource::issuer::Issuer>,
    ) -> Result<Opened, StoreError> {
        let issuer_store = issuer.map(open_issuer_store).transpose()?;
        let issuer_path = issuer.and_then(|doc| doc.spec.storage.path.clone());
        let agent = config
            .map(|config| open_agent_store(config, issuer_path.as_deref(), issuer_store.as_ref()))
            .transpose()?;
        let records = issuer_store
            .clone()
            .or(agent.clone())
            .expect("an agent config or an issuer");
        Ok(Opened {
            issuer: issuer_store,
            agent,
            records,
        })
    }
}

fn open_store(config: &AgentConfig) -> Result<Store, StoreError> {
    match config.storage.kind {
        StorageType::Memory => Ok(Store::memory()),
        StorageType::Directory => Store::open(
            &config
                .storage
                .path
                .clone()
                .unwrap_or_else(|| crate::resource::agent::Storage::DEFAULT_PATH.into()),
        ),
    }
}

/// Opens the agent's storage; the issuer's store when both name the same directory (a directory is
/// opened, and locked, once).
pub(super) fn open_agent_store(
    config: &AgentConfig,
    issuer_path: Option<&Path>,
    issuer_store: Option<&Store>,
) -> Result<Store, StoreError> {
    let same_dir = config.storage.kind == StorageType::Directory
        && issuer_path.is_some()
        && config.storage.path.as_deref() == issuer_path;
    match (same_dir, issuer_store) {
        (true, Some(store)) => Ok(store.clone()),
        _ => open_store(config),
    }
}

/// Opens the storage of the issuer host (`issuer.spec.storage`).
fn open_issuer_store(doc: &crate::resource::issuer::Issuer) -> Result<Store, StoreError> {
    match (doc.spec.storage.kind, &doc.spec.storage.path) {
        (IssuerStorageType::Directory, Some(path)) => Store::open(path),
        _ => Ok(Store::memory()),
    }
}

/// Why the issuer's store cannot be opened. Each names the `issuer` document's file, line and field.
#[derive(Debug, thiserror::Error)]
pub(super) enum BackingError {
    #[error(transparent)]
    Local(#[from] StoreError),
    #[error("{location}: spec.storage.key_encryption_key_file: {why}")]
    Kek { location: Location, why: String },
    #[error("{location}: spec.storage: {source}")]
    Etcd { location: Location, source: StoreError },
}

impl Explain for BackingError {
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        match self {
            BackingError::Local(e) | BackingError::Etcd { source: e, .. } => e.hint(),
            BackingError::Kek { .. } => {
                "every replica needs the same 32-byte file, mode 0600; fix the file or the path, then start again"
                    .into()
            }
        }
    }
}

/// The issuer's store: the local store (a directory, or memory), or etcd with the key encryption
/// key.
pub(super) async fn issuer_backing(
    state: &DesiredState,
    local: &Store,
) -> Result<crate::issuer::state::backing::Backing, BackingError> {
    use crate::issuer::state::backing::Backing;
    let etcd = state.objects.values().find_map(|o| match &o.document {
        Document::Issuer(doc) if doc.spec.storage.kind == IssuerStorageType::Etcd => Some((doc, &o.location)),
        _ => None,
    });
    let Some((doc, location)) = etcd else {
        return Ok(Backing::local(local.clone())?);
    };
    let storage = &doc.spec.storage;
    let kek_path = storage
        .key_encryption_key_file
        .as_deref()
        .expect("validation requires key_encryption_key_file for etcd");
    let kek = crate::kv::Kek::load(kek_path).map_err(|why| BackingError::Kek {
        location: location.clone(),
        why,
    })?;
    tracing::info!(kek_id = %kek.id(), file = %kek_path.display(), "key encryption key loaded");
    let kv = crate::kv::connect_etcd(&crate::kv::EtcdSettings::of(storage))
        .await
        .map_err(|source| BackingError::Etcd {
            location: location.clone(),
            source,
        })?;
    Ok(Backing::new(Arc::new(kv), Some(kek)))
}

/// `kind/name` → canonical hash of the cluster-side documents (not the agent config nor the `issuer`
/// document, which differ per host by design), as a replica records them.
pub(super) fn cluster_documents(state: &DesiredState) -> BTreeMap<String, String> {
    state
        .objects
        .iter()
        .filter(|(r, _)| !matches!(r.kind, Kind::AgentConfig | Kind::Issuer))
        .map(|(r, o)| (r.to_string(), o.hash.clone()))
        .collect()
}
