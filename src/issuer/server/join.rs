//! The issuer API's `Join`: a `token` join in one message, an `iam` join answering a challenge on
//! the same stream. Refusals are logged by source (`limits::RefusalLog`), joins at INFO.

use super::*;
use futures_util::StreamExt;

#[tonic::async_trait]
impl JoinService for IssuerApi {
    type JoinStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<proto::JoinResponse, Status>> + Send>>;

    async fn join(
        &self,
        request: Request<Streaming<proto::JoinRequest>>,
    ) -> Result<Response<Self::JoinStream>, Status> {
        let peer = peer(&request)?;
        if let Err(e) = self.joins.take(&peer.address.ip()) {
            self.refusals.refused(peer.address, &e);
            return Err(status(e));
        }
        let mut inbound = request.into_inner();
        let (tx, mut rx) = mpsc::channel(2);
        let issuer = self.issuer.clone();
        let refusals = self.refusals.clone();
        tokio::spawn(async move {
            let answer = match run_join(&issuer, &mut inbound, &tx, &peer).await {
                Ok((cert, bindable)) => {
                    let method = cert
                        .join
                        .iter()
                        .find(|(k, _)| *k == "join.meta.join_method")
                        .map(|(_, v)| v.join(","));
                    tracing::info!(bot = %cert.bot, instance = %cert.instance, method = method.unwrap_or_default(),
                        address = %peer.address, generation = cert.generation, "bot joined");
                    let mut answer = wire::bot_to_wire(&cert, &issuer.current_bundles());
                    answer.connection_bound = bindable && peer.bind(&cert.der);
                    Ok(proto::JoinResponse {
                        response: Some(proto::join_response::Response::Result(answer)),
                    })
                }
                Err(e) => {
                    refusals.refused(peer.address, &e);
                    Err(status(e))
                }
            };
            let _ = tx.send(answer).await;
        });
        // The response starts with its first message (a `token` join's answer, an `iam` join's
        // challenge), so that the headers, the message and, for a `token` join, the end of the
        // stream go out together; a refusal is the call's status. A certificate is always the
        // join's last message: the stream then ends with it, without waiting for the join task to
        // let go of its sender (which would put the end of the stream in a write of its own).
        let first = match rx.recv().await {
            Some(Ok(first)) => first,
            Some(Err(refused)) => return Err(refused),
            None => {
                return Err(Status::internal(
                    "the issuer's join task ended without an answer; join again, and report it if it repeats",
                ));
            }
        };
        let last = matches!(first.response, Some(proto::join_response::Response::Result(_)));
        let first = futures_util::stream::once(std::future::ready(Ok(first)));
        if last {
            return Ok(Response::new(Box::pin(first)));
        }
        Ok(Response::new(Box::pin(first.chain(ReceiverStream::new(rx)))))
    }
}

async fn next_message(inbound: &mut Streaming<proto::JoinRequest>) -> Result<proto::JoinRequest, IssuerError> {
    match tokio::time::timeout(JOIN_STEP_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => Err(IssuerError::Invalid("the join stream ended before the join".into())),
        Ok(Err(s)) => Err(IssuerError::Invalid(format!("the join stream failed: {}", s.message()))),
        Err(_) => Err(IssuerError::Invalid(format!(
            "no answer within {JOIN_STEP_TIMEOUT:?} on the join stream"
        ))),
    }
}

/// A `token` join's `init` as the issuer's request, after the size limits.
pub fn token_join_request(init: proto::ClientInit, peer: &PeerInfo) -> Result<JoinRequest, IssuerError> {
    check_len("token_name", init.token_name.len(), limits::MAX_NAME_BYTES)?;
    check_len("public_key", init.public_key.len(), limits::MAX_PUBLIC_KEY_BYTES)?;
    Ok(JoinRequest {
        token: init.token_name,
        public_key: init.public_key,
        proof: JoinProof::Token,
        ttl: ttl(init.ttl_seconds),
        current: peer.certificate().map(|c| c.to_vec()),
        address: peer.address.to_string(),
    })
}

/// One join: `token` in one step; `iam` with a challenge made here, never stored anywhere else.
/// Says whether the connection may be bound to the certificate: not for a `token` join's retry,
/// which proves no more than knowing the token and the public key. An `iam` join makes a new
/// instance, or keeps the one of the certificate this connection already authenticates as.
async fn run_join(
    issuer: &LocalIssuer,
    inbound: &mut Streaming<proto::JoinRequest>,
    tx: &mpsc::Sender<Result<proto::JoinResponse, Status>>,
    peer: &PeerInfo,
) -> Result<(crate::issuer::BotCertificate, bool), IssuerError> {
    use proto::join_request::Request as R;
    let Some(R::Init(init)) = next_message(inbound).await?.request else {
        return Err(IssuerError::Invalid("a join starts with `init`".into()));
    };
    let current = peer.certificate().map(|c| c.to_vec());
    let address = peer.address.to_string();
    match init.join_method.as_str() {
        "token" => issuer.join_token(&token_join_request(init, peer)?).await,
        "iam" => {
            let mut bytes = [0u8; 32];
            crate::issuer::keys::random(&mut bytes)?;
            let challenge = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes);
            let sent = tx
                .send(Ok(proto::JoinResponse {
                    response: Some(proto::join_response::Response::Challenge(proto::IamChallenge {
                        challenge: challenge.clone(),
                    })),
                }))
                .await;
            if sent.is_err() {
                return Err(IssuerError::Invalid("the joiner went away".into()));
            }
            let Some(R::Solution(solution)) = next_message(inbound).await?.request else {
                return Err(IssuerError::Invalid(
                    "an `iam` join answers the challenge with `solution`".into(),
                ));
            };
            check_len("token_name", solution.token_name.len(), limits::MAX_NAME_BYTES)?;
            check_len("public_key", solution.public_key.len(), limits::MAX_PUBLIC_KEY_BYTES)?;
            check_len("body", solution.body.len(), 8192)?;
            if solution.headers.len() > 64 {
                return Err(IssuerError::Invalid(
                    "more than 64 headers in the signed request".into(),
                ));
            }
            let signed = SignedRequest {
                method: solution.method,
                url: solution.url,
                headers: solution.headers.into_iter().collect(),
                body: String::from_utf8(solution.body)
                    .map_err(|_| IssuerError::Invalid("the signed request's body is not UTF-8".into()))?,
            };
            let request = JoinRequest {
                token: solution.token_name,
                public_key: solution.public_key,
                proof: JoinProof::Iam {
                    challenge: challenge.clone(),
                    request: signed.clone(),
                },
                ttl: ttl(solution.ttl_seconds),
                current,
                address,
            };
            issuer
                .join_iam(&request, &challenge, &signed, false)
                .await
                .map(|cert| (cert, true))
        }
        other => Err(IssuerError::Invalid(format!(
            "join method {:?} is not one of `token`, `iam`",
            other.chars().take(64).collect::<String>()
        ))),
    }
}
