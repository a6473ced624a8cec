//! A Workload API client over a unix socket (for `tbot spiffe-inspect`), adding the security header.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use super::SECURITY_HEADER;

/// Connects to `unix:///path` (or `unix:/path`, or a bare absolute path).
pub async fn connect(address: &str) -> Result<Channel, String> {
    let path: PathBuf = address
        .strip_prefix("unix://")
        .or_else(|| address.strip_prefix("unix:"))
        .unwrap_or(address)
        .into();
    if !path.is_absolute() {
        return Err(format!(
            "`{address}` is not a unix socket address; write unix:///absolute/path.sock"
        ));
    }
    Endpoint::from_static("http://workload.api")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|e| format!("cannot connect to {address}: {}", crate::error_chain(&e)))
}

/// A request with the security header set.
pub fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert(SECURITY_HEADER, MetadataValue::from_static("true"));
    request
}
