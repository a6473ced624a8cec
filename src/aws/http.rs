//! A small HTTP/1.1 client (hyper, rustls with the shared aws-lc-rs provider and the webpki roots)
//! for the few calls tbot makes to AWS: IMDSv2 and STS.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// How long one request may take, connection included.
pub const TIMEOUT: Duration = Duration::from_secs(10);

fn client() -> &'static Client<Https, Full<Bytes>> {
    static CLIENT: OnceLock<Client<Https, Full<Bytes>>> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls_provider())
            .expect("the aws-lc-rs provider supports TLS 1.2 and 1.3")
            .https_or_http()
            .enable_http1()
            .build();
        Client::builder(TokioExecutor::new()).build(connector)
    })
}

fn rustls_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

/// A reply: status, content type and body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: Bytes,
}

/// Sends one request. Errors are network failures (the caller treats them as transient), as text.
pub async fn send(method: &str, url: &str, headers: &[(String, String)], body: Bytes) -> Result<Reply, String> {
    let mut request = http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let request = request
        .body(Full::new(body))
        .map_err(|e| format!("bad request to {url}: {e}"))?;
    let exchange = async {
        let response = client()
            .request(request)
            .await
            .map_err(|e| format!("cannot reach {url}: {}", crate::error_chain(&e)))?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the reply of {url}: {e}"))?
            .to_bytes();
        Ok(Reply {
            status,
            content_type,
            body,
        })
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("{url} did not answer within {}s", TIMEOUT.as_secs())))
}
