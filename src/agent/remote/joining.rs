//! Joining a remote issuer: the `Join` stream (`token` in one message, `iam` answering the
//! challenge the issuer made inside the stream), and whether the join's connection stays.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::RemoteIssuer;
use super::proto::{self, join_service_client::JoinServiceClient};
use crate::issuer::wire;
use crate::issuer::{BotCertificate, IssuerError, JoinProof, JoinRequest};

/// Pending `iam` join streams older than this are dropped (the issuer gives up after a minute).
const PENDING_TTL: Duration = Duration::from_secs(60);
const MAX_PENDING: usize = 16;

/// An `iam` join stream waiting for the signed answer to its challenge.
pub(super) struct PendingJoin {
    challenge: String,
    tx: mpsc::Sender<proto::JoinRequest>,
    responses: tonic::Streaming<proto::JoinResponse>,
    /// The epoch of the channel the stream is on.
    epoch: u64,
    started: std::time::Instant,
}

/// A join stream: what to send (if more is to be sent), what comes back, and the epoch of the
/// channel it is on.
pub(super) type JoinStream = (
    Option<mpsc::Sender<proto::JoinRequest>>,
    tonic::Streaming<proto::JoinResponse>,
    u64,
);

impl RemoteIssuer {
    /// Opens an `iam` join stream and returns the challenge the issuer made inside it; the stream
    /// waits for [`RemoteIssuer::join_over`] with that challenge.
    pub(super) async fn start_iam_join(&self) -> Result<String, IssuerError> {
        let init = proto::JoinRequest {
            request: Some(proto::join_request::Request::Init(proto::ClientInit {
                join_method: "iam".into(),
                ..Default::default()
            })),
        };
        let (tx, mut responses, epoch) = self.open_join(init, true).await?;
        let tx = tx.expect("an `iam` join stream stays open");
        let message = responses
            .message()
            .await
            .map_err(|s| self.unreachable(&s))?
            .ok_or_else(|| IssuerError::Unavailable("the issuer ended the join without a challenge".into()))?;
        let Some(proto::join_response::Response::Challenge(c)) = message.response else {
            return Err(IssuerError::Unavailable(
                "the issuer did not answer with a challenge".into(),
            ));
        };
        let mut pending = self.pending.lock().expect("pending poisoned");
        pending.retain(|p| p.started.elapsed() < PENDING_TTL);
        if pending.len() >= MAX_PENDING {
            pending.remove(0);
        }
        pending.push(PendingJoin {
            challenge: c.challenge.clone(),
            tx,
            responses,
            epoch,
            started: std::time::Instant::now(),
        });
        Ok(c.challenge)
    }

    /// A join: `token` on a new stream, `iam` on the stream its challenge came on.
    pub(super) async fn join_over(&self, request: JoinRequest) -> Result<BotCertificate, IssuerError> {
        match request.proof {
            JoinProof::Token => {
                let init = proto::JoinRequest {
                    request: Some(proto::join_request::Request::Init(proto::ClientInit {
                        token_name: request.token,
                        join_method: "token".into(),
                        public_key: request.public_key,
                        ttl_seconds: wire::seconds(request.ttl),
                    })),
                };
                // `init` is all a `token` join sends: the request stream ends with it, so that
                // the call closes with the answer, and neither side resets the stream.
                let (tx, mut responses, epoch) = self.open_join(init, false).await?;
                debug_assert!(tx.is_none());
                self.join_result(&mut responses, epoch).await
            }
            JoinProof::Iam {
                challenge,
                request: signed,
            } => {
                let found = {
                    let mut pending = self.pending.lock().expect("pending poisoned");
                    pending
                        .iter()
                        .position(|p| p.challenge == challenge)
                        .map(|i| pending.remove(i))
                };
                let Some(mut join) = found else {
                    return Err(IssuerError::JoinRefused(
                        "challenge: its join stream is gone (older than a minute); join again".into(),
                    ));
                };
                let solution = proto::JoinRequest {
                    request: Some(proto::join_request::Request::Solution(proto::IamSolution {
                        method: signed.method,
                        url: signed.url,
                        headers: signed.headers.into_iter().collect(),
                        body: signed.body.into_bytes(),
                        token_name: request.token,
                        public_key: request.public_key,
                        ttl_seconds: wire::seconds(request.ttl),
                    })),
                };
                join.tx
                    .send(solution)
                    .await
                    .map_err(|_| IssuerError::Unavailable("the join stream closed".into()))?;
                self.join_result(&mut join.responses, join.epoch).await
            }
        }
    }

    /// A join stream that starts with `first` (queued before the call, so that it goes out with
    /// the request's headers), and the epoch of the channel it is on. Unless `more` is to be
    /// sent, the request stream ends with `first`, and no sender is returned.
    async fn open_join(&self, first: proto::JoinRequest, more: bool) -> Result<JoinStream, IssuerError> {
        let (tx, rx) = mpsc::channel(2);
        tx.try_send(first).expect("a new channel has room");
        let tx = more.then_some(tx);
        let (epoch, channel) = self.channel_at()?;
        let mut client = JoinServiceClient::new(channel);
        let responses = client
            .join(ReceiverStream::new(rx))
            .await
            .map_err(|s| self.unreachable(&s))?
            .into_inner();
        Ok((tx, responses, epoch))
    }

    /// The certificate a join was answered with. When the issuer says it bound the connection to
    /// it, and that connection is the channel's own, presenting it keeps the connection.
    async fn join_result(
        &self,
        responses: &mut tonic::Streaming<proto::JoinResponse>,
        epoch: u64,
    ) -> Result<BotCertificate, IssuerError> {
        let message = responses
            .message()
            .await
            .map_err(|s| self.unreachable(&s))?
            .ok_or_else(|| IssuerError::Unavailable("the issuer ended the join without an answer".into()))?;
        match message.response {
            Some(proto::join_response::Response::Result(cert)) => {
                let bound = cert.connection_bound;
                let cert = self.accept_bot(cert)?;
                let made = *self.connection.lock().expect("connection note poisoned");
                let kept = bound && made.epoch == epoch && !made.presented;
                *self.bound.lock().expect("bound poisoned") = kept.then(|| (made, cert.der.clone()));
                Ok(cert)
            }
            _ => Err(IssuerError::Unavailable(
                "the issuer answered the join with something else than a certificate".into(),
            )),
        }
    }
}
