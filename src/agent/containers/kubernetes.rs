//! The `kubernetes` attestor: the pod UID and container ID a caller's cgroup names
//! ([`super::locate`]), looked up in the node's kubelet pod list (`GET /pods`, with the service
//! account token, the kubelet's certificate checked against `ca_path` unless `skip_verify`; on the
//! `read_only_port`, plain HTTP with no token, which would otherwise cross the network in the clear). The
//! pod must have that UID, and the container must be one of its containers (an init container only
//! as a native sidecar, `restartPolicy: Always`; never an ephemeral debug container).
//!
//! The kubelet lists a just-started container a moment after it runs, so a pod or container not
//! listed yet is asked again every 500 ms for up to `pod_wait` (10 s by default). A caller in no
//! pod's container, or in a container its pod does not run as a container, gets
//! `workload.kubernetes.attested = false`; a kubelet that cannot be asked or refuses (401, 403,
//! 5xx), or a container still not listed, leaves every `workload.kubernetes.*` unset, with a WARN
//! that says what to check.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::{Findings, Location, locate};
use crate::resource::agent::KubernetesAttestor;
use crate::resource::template::Attribute;

const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// How long one request to the kubelet may take.
const TIMEOUT: Duration = Duration::from_secs(10);
const POLL_EVERY: Duration = Duration::from_millis(500);
const DEFAULT_POD_WAIT: Duration = Duration::from_secs(10);

/// How a service asks its kubelet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletSettings {
    pub url: String,
    pub token_path: Option<PathBuf>,
    pub ca_path: PathBuf,
    pub skip_verify: bool,
    pub pod_wait: Duration,
}

impl KubeletSettings {
    pub fn of(k: &KubernetesAttestor) -> KubeletSettings {
        KubeletSettings {
            url: k.pods_url(),
            // The read-only port is plain HTTP and unauthenticated: no token crosses it.
            token_path: (!k.kubelet.anonymous && k.kubelet.read_only_port.is_none()).then(|| {
                k.kubelet
                    .token_path
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(format!("{SERVICE_ACCOUNT}/token")))
            }),
            ca_path: k
                .kubelet
                .ca_path
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("{SERVICE_ACCOUNT}/ca.crt"))),
            skip_verify: k.kubelet.skip_verify,
            pod_wait: k.pod_wait.map_or(DEFAULT_POD_WAIT, |d| d.as_std()),
        }
    }
}

/// A verifier that accepts any certificate (`skip_verify: true`): the kubelet's answer is then
/// only as good as the network between this host and itself (loopback, usually).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The TLS configuration for the kubelet: its CA from `ca_path`, or no check with `skip_verify`.
fn tls(settings: &KubeletSettings) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    if settings.skip_verify {
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth());
    }
    let pem = std::fs::read(&settings.ca_path)
        .map_err(|e| format!("cannot read the kubelet's CA {}: {e}", settings.ca_path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{} is not a PEM certificate file: {e}", settings.ca_path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", settings.ca_path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{} holds no certificate", settings.ca_path.display()));
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// The kubelet's pod list, or what to tell the operator.
async fn pods(settings: &KubeletSettings) -> Result<Value, String> {
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = if settings.url.starts_with("https://") {
        builder.with_tls_config(tls(settings)?).https_only()
    } else {
        // The read-only port: plain HTTP, so there is no certificate to check (nor a CA to read).
        builder
            .with_tls_config(
                rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
            )
            .https_or_http()
    };
    let connector = builder.enable_http1().build();
    let client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    let mut request = http::Request::get(&settings.url);
    if let Some(path) = &settings.token_path {
        let token = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the service account token {}: {e}", path.display()))?;
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {}", token.trim()));
    }
    let request = request.body(Empty::new()).map_err(|e| e.to_string())?;
    let url = &settings.url;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("cannot reach the kubelet at {url}: {}", crate::error_chain(&e)))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the kubelet's answer: {e}"))?
            .to_bytes();
        match status.as_u16() {
            200 => serde_json::from_slice(&body)
                .map_err(|e| format!("the kubelet at {url} answered what is not JSON: {e}")),
            401 => Err(format!(
                "the kubelet at {url} refused the token (401): is it run with `--authentication-token-webhook`, and is the token current?"
            )),
            403 => Err(format!(
                "the kubelet at {url} denied GET /pods (403): grant the service account `get` on `nodes/proxy`"
            )),
            code => Err(format!(
                "the kubelet at {url} answered {code}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)]).escape_debug()
            )),
        }
    };
    tokio::time::timeout(TIMEOUT, exchange).await.unwrap_or_else(|_| {
        Err(format!(
            "the kubelet at {url} did not answer within {} s",
            TIMEOUT.as_secs()
        ))
    })
}

/// [`pods`], shared by the callers of the last second: a burst of connections from a node's pods
/// is one request to the kubelet. (A container not listed yet is asked for again after the second.)
async fn pods_cached(settings: &KubeletSettings) -> Result<Value, String> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    use std::time::Instant;
    type Lists = Mutex<HashMap<String, (Instant, Arc<Value>)>>;
    static LISTS: OnceLock<Lists> = OnceLock::new();
    let lists = LISTS.get_or_init(Default::default);
    if let Some((at, list)) = lists.lock().expect("pod lists poisoned").get(&settings.url)
        && at.elapsed() < Duration::from_secs(1)
    {
        return Ok((**list).clone());
    }
    let list = pods(settings).await?;
    lists
        .lock()
        .expect("pod lists poisoned")
        .insert(settings.url.clone(), (Instant::now(), Arc::new(list.clone())));
    Ok(list)
}

/// What the pod list says of a container.
enum Found {
    /// The container, with its pod.
    Container { pod: Value, status: Value },
    /// Listed, but not a container this attestor vouches for (a plain init container, an ephemeral one).
    Refused(String),
    /// Not (yet) listed.
    Missing,
}

fn container_id(status: &Value) -> Option<&str> {
    let id = status.get("containerID")?.as_str()?;
    Some(id.split_once("://").map_or(id, |(_, rest)| rest))
}

fn find(list: &Value, pod_uid: &str, id: &str) -> Found {
    let Some(pod) = list.get("items").and_then(Value::as_array).and_then(|items| {
        items
            .iter()
            .find(|p| p.pointer("/metadata/uid").and_then(Value::as_str) == Some(pod_uid))
    }) else {
        return Found::Missing;
    };
    let statuses = |field: &str| {
        pod.pointer(&format!("/status/{field}"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    if let Some(status) = statuses("containerStatuses")
        .into_iter()
        .find(|s| container_id(s) == Some(id))
    {
        return Found::Container {
            pod: pod.clone(),
            status,
        };
    }
    if let Some(status) = statuses("initContainerStatuses")
        .into_iter()
        .find(|s| container_id(s) == Some(id))
    {
        let name = status.get("name").and_then(Value::as_str).unwrap_or_default();
        let sidecar = pod
            .pointer("/spec/initContainers")
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find(|c| c.get("name").and_then(Value::as_str) == Some(name)))
            .and_then(|c| c.get("restartPolicy"))
            .and_then(Value::as_str)
            == Some("Always");
        return if sidecar {
            Found::Container {
                pod: pod.clone(),
                status,
            }
        } else {
            Found::Refused(format!("container `{name}` is an init container, not a native sidecar"))
        };
    }
    if statuses("ephemeralContainerStatuses")
        .iter()
        .any(|s| container_id(s) == Some(id))
    {
        return Found::Refused("an ephemeral (debug) container is never attested".into());
    }
    Found::Missing
}

/// The `sha256:<64 hex>` digest in a kubelet `imageID` (`docker-pullable://x@sha256:…`, `sha256:…`).
fn digest(image_id: &str) -> Option<String> {
    let at = image_id.rfind("sha256:")?;
    let hex = image_id.get(at + 7..at + 7 + 64)?;
    hex.bytes()
        .all(|b| b.is_ascii_hexdigit())
        .then(|| format!("sha256:{hex}"))
}

/// Logs that the kubelet cannot be asked: each distinct reason at most every 10 s, so a kubelet
/// that is down does not log once per connection, and a new reason is not held back.
fn warn_once(why: &str) {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    use std::time::Instant;
    static LAST: OnceLock<Mutex<HashMap<String, Instant>>> = OnceLock::new();
    let mut last = LAST.get_or_init(Default::default).lock().expect("log table poisoned");
    last.retain(|_, at| at.elapsed() < Duration::from_secs(10));
    if last.contains_key(why) {
        return;
    }
    last.insert(why.to_owned(), Instant::now());
    tracing::warn!(error = %why, "the kubelet cannot be asked; workload.kubernetes.* stay unset");
}

/// The `workload.kubernetes.*` attributes of the caller whose `/proc/<pid>/cgroup` reads `cgroup`.
pub async fn attest(cgroup: &str, settings: &KubeletSettings) -> Findings {
    let mut found = Findings::default();
    let (pod_uid, id) = match locate(cgroup) {
        Ok(Location::HiddenByCgroupNamespace) => {
            super::warn_hidden();
            found.unasked("kubernetes", super::HIDDEN);
            return found;
        }
        Ok(Location::Container(c)) => match c.pod_uid {
            Some(pod) => (pod, c.id),
            None => {
                found.attributes.set("workload.kubernetes.attested", false);
                return found;
            }
        },
        _ => {
            found.attributes.set("workload.kubernetes.attested", false);
            return found;
        }
    };
    let deadline = tokio::time::Instant::now() + settings.pod_wait;
    let (pod, status) = loop {
        let list = match pods_cached(settings).await {
            Ok(list) => list,
            Err(why) => {
                warn_once(&why);
                found.unasked("kubernetes", why);
                return found;
            }
        };
        match find(&list, &pod_uid, &id) {
            Found::Container { pod, status } => break (pod, status),
            Found::Refused(why) => {
                tracing::warn!(pod = %pod_uid, container = &id[..12], %why, "a caller's container is not attested");
                found.attributes.set("workload.kubernetes.attested", false);
                return found;
            }
            Found::Missing if tokio::time::Instant::now() + POLL_EVERY < deadline => {
                tokio::time::sleep(POLL_EVERY).await;
            }
            Found::Missing => {
                tracing::warn!(pod = %pod_uid, container = &id[..12], url = %settings.url,
                    "the kubelet does not list the caller's pod and container after {} s; workload.kubernetes.* stay unset (retry)",
                    settings.pod_wait.as_secs());
                found.unasked(
                    "kubernetes",
                    format_args!(
                        "the kubelet at {} did not list pod {pod_uid} with this container within {} s",
                        settings.url,
                        settings.pod_wait.as_secs()
                    ),
                );
                return found;
            }
        }
    };
    let text = |v: &Value, pointer: &str| {
        v.pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let out = &mut found.attributes;
    out.set("workload.kubernetes.attested", true)
        .set("workload.kubernetes.namespace", text(&pod, "/metadata/namespace"))
        .set("workload.kubernetes.pod_name", text(&pod, "/metadata/name"))
        .set(
            "workload.kubernetes.service_account",
            text(&pod, "/spec/serviceAccountName"),
        )
        .set("workload.kubernetes.pod_uid", &pod_uid)
        .set("workload.kubernetes.container.name", text(&status, "/name"))
        .set("workload.kubernetes.container.image", text(&status, "/image"));
    if let Some(d) = digest(&text(&status, "/imageID")) {
        out.set("workload.kubernetes.container.image_digest", d);
    }
    if let Some(labels) = pod.pointer("/metadata/labels").and_then(Value::as_object) {
        for (key, value) in labels {
            if let Some(value) = value.as_str() {
                let name = Attribute {
                    base: "workload.kubernetes.labels",
                    key: Some(key.clone()),
                };
                out.set(name.to_string(), value);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_digests_come_out_of_every_image_id_shape() {
        let hex = "a".repeat(64);
        for id in [
            format!("docker-pullable://nginx@sha256:{hex}"),
            format!("sha256:{hex}"),
            format!("docker.io/library/nginx@sha256:{hex}"),
        ] {
            assert_eq!(digest(&id), Some(format!("sha256:{hex}")), "{id}");
        }
        assert_eq!(digest("nginx:latest"), None);
    }

    #[test]
    fn only_a_pods_own_containers_and_native_sidecars_are_found() {
        let id = "b".repeat(64);
        let list = |field: &str, restart: &str| {
            serde_json::json!({"items": [{
                "metadata": {"uid": "u1", "name": "web", "namespace": "shop"},
                "spec": {"initContainers": [{"name": "c", "restartPolicy": restart}]},
                "status": {field: [{"name": "c", "containerID": format!("containerd://{id}")}]},
            }]})
        };
        assert!(matches!(
            find(&list("containerStatuses", ""), "u1", &id),
            Found::Container { .. }
        ));
        assert!(matches!(
            find(&list("initContainerStatuses", "Always"), "u1", &id),
            Found::Container { .. }
        ));
        assert!(matches!(
            find(&list("initContainerStatuses", ""), "u1", &id),
            Found::Refused(_)
        ));
        assert!(matches!(
            find(&list("ephemeralContainerStatuses", ""), "u1", &id),
            Found::Refused(_)
        ));
        // Another pod's UID, or another container: not listed (yet).
        assert!(matches!(
            find(&list("containerStatuses", ""), "u2", &id),
            Found::Missing
        ));
        assert!(matches!(
            find(&list("containerStatuses", ""), "u1", &"c".repeat(64)),
            Found::Missing
        ));
    }
}
