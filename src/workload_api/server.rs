//! The `SpiffeWorkloadAPI` service: the security header, who the caller is, and the five calls.
//! Streams send the complete state at once, then a complete message on every change.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::{StreamExt, StreamMap};
use tonic::{Request, Response, Status};

use super::denial::{check_header, status};
use super::follow::{Follow, Turns, Woke, resolve_for};
use super::listener::{Attested, attested};
use super::metrics::WorkloadApiMetrics;
use super::proto::spiffe_workload_api_server::SpiffeWorkloadApi;
use super::proto::*;
use crate::agent::{Agent, Slot, X509Material};
use crate::issuer::{Bundles, IdentitySelector, Resolved};

/// What a service decides by: its selector and the lifetime of the SVIDs it serves. Swapped live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    pub selector: IdentitySelector,
    pub ttl: Duration,
}

/// One `workload-identity-api` service.
#[derive(Clone)]
pub struct WorkloadApi {
    pub(super) agent: Arc<Agent>,
    pub(super) config: watch::Receiver<ServiceConfig>,
    /// What ends an open stream or makes it resolve its caller again, in one channel.
    pub(super) turns: watch::Receiver<Turns>,
    pub(super) metrics: WorkloadApiMetrics,
}

impl WorkloadApi {
    /// Spawns the task that forwards the agent's policy changes, `config`'s and `stop` into one
    /// channel for the open streams; it ends when the service stops.
    pub fn new(
        agent: Arc<Agent>,
        config: watch::Receiver<ServiceConfig>,
        stop: watch::Receiver<bool>,
        metrics: WorkloadApiMetrics,
    ) -> WorkloadApi {
        let turns = super::follow::start_turns(agent.policy_changes(), config.clone(), stop);
        WorkloadApi {
            agent,
            config,
            turns,
            metrics,
        }
    }
}

fn bundle_key(bundles: &Bundles) -> String {
    format!("spiffe://{}", bundles.trust_domain)
}

fn x509_bundle(bundles: &Bundles) -> Vec<u8> {
    bundles.x509_authorities.concat()
}

/// Every federated trust domain's CAs, keyed `spiffe://<td>` (`federated_bundles`).
fn federated_x509(bundles: &Bundles) -> HashMap<String, Vec<u8>> {
    bundles
        .federated
        .values()
        .map(|b| (format!("spiffe://{}", b.trust_domain), b.x509_authorities.concat()))
        .collect()
}

/// The caller's issued SVIDs, in slot order; `None` while one is still being issued; when none
/// could be, every reason: `Unavailable` when each failure is transient (the issuer could not be
/// asked: retry), so an outage never reads as a denial; else `PermissionDenied`.
pub(super) fn issued(slots: &[watch::Receiver<Slot>]) -> Option<Result<Vec<Arc<X509Material>>, Status>> {
    let mut ready = Vec::new();
    let mut failures = Vec::new();
    let mut transient = true;
    for slot in slots {
        match &*slot.borrow() {
            Slot::Pending => return None,
            Slot::Failed {
                error,
                transient: passing,
                ..
            } => {
                failures.push(error.clone());
                transient &= *passing;
            }
            Slot::Ready(m) => ready.push(m.clone()),
        }
    }
    if ready.is_empty() {
        let reasons = failures.join("; ");
        return Some(Err(if transient {
            Status::unavailable(reasons)
        } else {
            Status::permission_denied(reasons)
        }));
    }
    Some(Ok(ready))
}

/// A complete `X509SVIDResponse` from the current slots, or `None` while one is still pending.
fn x509_response(
    slots: &[tokio::sync::watch::Receiver<Slot>],
    bundles: &Bundles,
) -> Option<Result<X509svidResponse, Status>> {
    let ready = match issued(slots)? {
        Ok(ready) => ready,
        Err(status) => return Some(Err(status)),
    };
    let mut svids = Vec::new();
    let mut hints = HashSet::new();
    let bundle = x509_bundle(bundles);
    for m in ready {
        let hint = m.svid.hint.clone().unwrap_or_default();
        if !hint.is_empty() && !hints.insert(hint.clone()) {
            tracing::warn!(hint, spiffe_id = %m.svid.spiffe_id, "two SVIDs share a hint; sending the first only");
            continue;
        }
        svids.push(X509svid {
            spiffe_id: m.svid.spiffe_id.clone(),
            x509_svid: m.svid.certificate.clone(),
            x509_svid_key: m.key.clone(),
            bundle: bundle.clone(),
            hint,
        });
    }
    Some(Ok(X509svidResponse {
        svids,
        crl: bundles.crls.to_vec(),
        federated_bundles: federated_x509(bundles),
    }))
}

/// An open stream's state: tonic polls it through [`into_stream`].
pub(super) trait Watch: Send + 'static {
    type Item: Send + 'static;

    /// The next message, or `None` when the stream is over.
    fn next(&mut self) -> impl std::future::Future<Output = Option<Result<Self::Item, Status>>> + Send;
}

/// A response stream as tonic takes it.
pub(super) type Stream<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// The stream tonic polls: no task or channel of its own (a client that goes away drops it); an
/// error is its last message.
pub(super) fn into_stream<W: Watch>(watch: W) -> Stream<W::Item> {
    Box::pin(futures_util::stream::unfold(Some(watch), |watch| async move {
        let mut watch = watch?;
        let item = watch.next().await?;
        let more = item.is_ok().then_some(watch);
        Some((item, more))
    }))
}

/// An open `FetchX509SVID` stream.
struct X509Watch {
    follow: Follow,
    /// The first resolution, made before the call was answered.
    first: Option<(Vec<Resolved>, Duration)>,
    /// The caller's SVIDs and the bundle (`None`: resolve first).
    svids: Option<Svids>,
    /// What the last message was made of: each distinct state is sent once.
    last_sent: Option<Made>,
    _open: OpenStream,
}

pub(super) type Changes = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = ()> + Send>>;

/// A caller's SVID slots and the trust bundle, subscribed to: `changes` yields on a change of any
/// after the subscription (what they hold when subscribed is read with [`Svids::made`]).
pub(super) struct Svids {
    pub slots: Vec<watch::Receiver<Slot>>,
    pub bundles: watch::Receiver<Arc<Bundles>>,
    pub changes: StreamMap<usize, Changes>,
}

impl Svids {
    /// Subscribes to the slots of the caller's identities, resolving them unless `first` holds them.
    pub(super) async fn subscribe(follow: &Follow, first: Option<(Vec<Resolved>, Duration)>) -> Result<Svids, Status> {
        let (resolved, ttl) = match first {
            Some(first) => first,
            None => follow.resolve().await?,
        };
        let (agent, workload) = (&follow.agent, &follow.workload);
        let slots: Vec<_> = resolved
            .iter()
            .map(|r| agent.cache.x509(r, &workload.attributes, ttl))
            .collect();
        let bundles = agent.bundles();
        let mut changes: StreamMap<usize, Changes> = StreamMap::new();
        for (i, slot) in slots.iter().enumerate() {
            changes.insert(i, Box::pin(WatchStream::from_changes(slot.clone()).map(|_| ())));
        }
        changes.insert(
            usize::MAX,
            Box::pin(WatchStream::from_changes(bundles.clone()).map(|_| ())),
        );
        Ok(Svids {
            slots,
            bundles,
            changes,
        })
    }

    /// What a message would be made of now.
    pub(super) fn made(&self) -> Made {
        Made {
            slots: self
                .slots
                .iter()
                .map(|s| match &*s.borrow() {
                    Slot::Ready(m) => Some(m.clone()),
                    Slot::Pending | Slot::Failed { .. } => None,
                })
                .collect(),
            bundles: self.bundles.borrow().clone(),
        }
    }
}

/// The SVIDs (`None`: pending or failed) and the bundle a message was made of. Holding them keeps
/// their allocations alive, so comparing by pointer cannot mistake a new SVID for an old one.
pub(super) struct Made {
    pub slots: Vec<Option<Arc<X509Material>>>,
    pub bundles: Arc<Bundles>,
}

impl Made {
    pub(super) fn same_as(&self, other: &Made) -> bool {
        let same = |a: &Option<Arc<X509Material>>, b: &Option<Arc<X509Material>>| match (a, b) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        Arc::ptr_eq(&self.bundles, &other.bundles)
            && self.slots.len() == other.slots.len()
            && self.slots.iter().zip(&other.slots).all(|(a, b)| same(a, b))
    }
}

/// Counts an open stream for `/metrics` while it lives.
pub(super) struct OpenStream(pub(super) WorkloadApiMetrics);

impl OpenStream {
    pub(super) fn new(metrics: &WorkloadApiMetrics) -> OpenStream {
        metrics.streams.inc();
        OpenStream(metrics.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.streams.dec();
    }
}

impl Watch for X509Watch {
    type Item = X509svidResponse;

    /// At once on open, then on every change.
    async fn next(&mut self) -> Option<Result<X509svidResponse, Status>> {
        loop {
            match self.svids.as_mut() {
                // (Re-)resolve: at open, and whenever the documents or the service's config change;
                // what the new subscription holds is answered at once.
                None => match Svids::subscribe(&self.follow, self.first.take()).await {
                    Ok(svids) => self.svids = Some(svids),
                    Err(status) => return Some(Err(status)),
                },
                Some(svids) => match self.follow.wake(svids.changes.next()).await {
                    Woke::Data(_) => {}
                    Woke::Resolve => {
                        self.svids = None;
                        continue;
                    }
                    Woke::Stop => return None,
                },
            }
            let svids = self.svids.as_ref().expect("subscribed");
            // Several watches may fire for one change: send each distinct state once.
            let made = svids.made();
            if self.last_sent.as_ref().is_some_and(|last| last.same_as(&made)) {
                continue;
            }
            match x509_response(&svids.slots, &made.bundles) {
                // A slot is still being issued: its change wakes us again.
                None => continue,
                Some(Ok(message)) => {
                    self.last_sent = Some(made);
                    return Some(Ok(message));
                }
                Some(Err(status)) => return Some(Err(status)),
            }
        }
    }
}

/// An open bundle stream (`FetchX509Bundles`, `FetchJWTBundles`): the bundle on open and on every
/// change, while the caller is entitled to an identity; when an edit takes that away, the stream
/// ends with `PermissionDenied` (the Workload API's state machine, Appendix A).
struct BundleWatch<T> {
    follow: Follow,
    bundles: WatchStream<Arc<Bundles>>,
    build: fn(&Bundles) -> T,
}

impl<T: Send + 'static> Watch for BundleWatch<T> {
    type Item = T;

    async fn next(&mut self) -> Option<Result<T, Status>> {
        loop {
            match self.follow.wake(self.bundles.next()).await {
                Woke::Data(bundles) => return Some(Ok((self.build)(&bundles))),
                Woke::Resolve => {
                    if let Err(status) = self.follow.resolve().await {
                        return Some(Err(status));
                    }
                }
                Woke::Stop => return None,
            }
        }
    }
}

/// The bundle stream for a caller found entitled (an error, `PermissionDenied`, otherwise).
async fn bundle_stream<T: Send + 'static>(
    api: &WorkloadApi,
    workload: Arc<Attested>,
    build: fn(&Bundles) -> T,
) -> Result<Stream<T>, Status> {
    let follow = Follow::new(api, workload);
    // Bundles only for a caller entitled to an identity (the spec's SHOULD; SPIRE does so too).
    follow.resolve().await?;
    Ok(into_stream(BundleWatch {
        bundles: WatchStream::new(api.agent.bundles()),
        follow,
        build,
    }))
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Stream<X509svidResponse>;
    type FetchX509BundlesStream = Stream<X509BundlesResponse>;
    type FetchJWTBundlesStream = Stream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&request)?;
        let workload = attested(&request)?;
        let follow = Follow::new(self, workload);
        let first = follow.resolve().await?;
        Ok(Response::new(into_stream(X509Watch {
            follow,
            first: Some(first),
            svids: None,
            last_sent: None,
            _open: OpenStream::new(&self.metrics),
        })))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&request)?;
        let workload = attested(&request)?;
        let stream = bundle_stream(self, workload, |b| {
            let mut bundles = federated_x509(b);
            bundles.insert(bundle_key(b), x509_bundle(b));
            X509BundlesResponse {
                crl: b.crls.to_vec(),
                bundles,
            }
        });
        Ok(Response::new(stream.await?))
    }

    async fn fetch_jwtsvid(&self, request: Request<JwtsvidRequest>) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(&request)?;
        let workload = attested(&request)?;
        let wanted = request.get_ref().spiffe_id.clone();
        if !wanted.is_empty()
            && let Err(why) = crate::resource::spiffe_id::SpiffeId::parse(&wanted)
        {
            return Err(Status::invalid_argument(format!(
                "spiffe_id is not a SPIFFE ID: {why}; ask for one such as `spiffe://<trust domain>/<path>`, \
                 or leave it empty for every SVID this caller may have"
            )));
        }
        let audience = request.get_ref().audience.clone();
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument(
                "audience must be set: name at least one, none empty",
            ));
        }
        let mut svids = Vec::new();
        let mut hints = HashSet::new();
        let (resolved, ttl) = resolve_for(&self.agent, &self.config, &workload).await?;
        for resolved in resolved {
            let svid = self
                .agent
                .cache
                .jwt(&resolved, &workload.attributes, &audience, ttl)
                .await
                .map_err(status)?;
            if !wanted.is_empty() && svid.spiffe_id != wanted {
                continue;
            }
            let hint = svid.hint.unwrap_or_default();
            if !hint.is_empty() && !hints.insert(hint.clone()) {
                continue;
            }
            svids.push(Jwtsvid {
                spiffe_id: svid.spiffe_id,
                svid: svid.token,
                hint,
            });
        }
        if svids.is_empty() {
            return Err(Status::permission_denied(format!(
                "this caller may not have the SPIFFE ID `{wanted}`"
            )));
        }
        Ok(Response::new(JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&request)?;
        let workload = attested(&request)?;
        let stream = bundle_stream(self, workload, |b| {
            let jwks = |keys: &[Value]| serde_json::to_vec(&serde_json::json!({ "keys": keys })).expect("json");
            let mut bundles: HashMap<String, Vec<u8>> = b
                .federated
                .values()
                .map(|f| (format!("spiffe://{}", f.trust_domain), jwks(&f.jwt_keys)))
                .collect();
            bundles.insert(bundle_key(b), jwks(&b.jwt_keys));
            JwtBundlesResponse { bundles }
        });
        Ok(Response::new(stream.await?))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&request)?;
        attested(&request)?;
        let ValidateJwtsvidRequest { audience, svid } = request.into_inner();
        if audience.is_empty() {
            return Err(Status::invalid_argument("audience must be set"));
        }
        if svid.is_empty() {
            return Err(Status::invalid_argument("svid must be set"));
        }
        let bundles = self.agent.bundles().borrow().clone();
        let claims = super::jwt::validate_jwt(&svid, &audience, &bundles)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let spiffe_id = claims.get("sub").and_then(Value::as_str).unwrap_or_default().to_owned();
        let Value::Object(map) = claims else {
            unreachable!("checked to be an object")
        };
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id,
            claims: Some(prost_types::Struct {
                fields: map.into_iter().map(|(k, v)| (k, to_prost(v))).collect(),
            }),
        }))
    }
}

fn to_prost(value: Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(to_prost).collect(),
        }),
        Value::Object(map) => Kind::StructValue(prost_types::Struct {
            fields: map.into_iter().map(|(k, v)| (k, to_prost(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}
