//! A Workload API client over a unix socket (for `tbot spiffe-inspect`), adding the security header.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use super::SECURITY_HEADER;

/// Why a Workload API socket could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("`{0}` is not a unix socket address; write unix:///absolute/path.sock")]
    NotUnix(String),
    /// The cause chain is kept whole (the socket's path and the OS error).
    #[error("cannot connect to {address}: {chain}")]
    Connect { address: String, chain: String },
}

/// Connects to `unix:///path` (or `unix:/path`, or a bare absolute path).
pub async fn connect(address: &str) -> Result<Channel, ConnectError> {
    let path: PathBuf = address
        .strip_prefix("unix://")
        .or_else(|| address.strip_prefix("unix:"))
        .unwrap_or(address)
        .into();
    if !path.is_absolute() {
        return Err(ConnectError::NotUnix(address.to_owned()));
    }
    Endpoint::from_static("http://workload.api")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|e| ConnectError::Connect {
            address: address.to_owned(),
            chain: crate::error_chain(&e),
        })
}

/// A request with the security header set.
pub fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert(SECURITY_HEADER, MetadataValue::from_static("true"));
    request
}

impl crate::error::Explain for ConnectError {
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        match self {
            ConnectError::NotUnix(_) => "".into(),
            ConnectError::Connect { .. } => "is `tbot start` running and serving this socket?".into(),
        }
    }

    fn is_transient(&self) -> bool {
        matches!(self, ConnectError::Connect { .. })
    }
}
