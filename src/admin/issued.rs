//! The admin API's answers for a leaked key: `Issued` (the issuer's issuance log, filtered, for
//! `tbotctl get svids` and `tbotctl revoke`) and `Lock` (`tbotctl lock`/`unlock`).

use tonic::{Response, Status};

use super::proto::{IssuedRequest, IssuedResponse, LockRequest, LockResponse};
use crate::error::Explain;
use crate::issuer::LocalIssuer;
use crate::issuer::state::issued::Filter;

/// The issuer in this process, or the refusal an agent of a remote issuer gives.
fn local<'a>(issuer: Option<&'a LocalIssuer>, what: &str) -> Result<&'a LocalIssuer, Status> {
    issuer.ok_or_else(|| {
        Status::failed_precondition(format!(
            "this daemon is an agent of a remote issuer: {what} is on the issuer host; run tbotctl against its admin socket"
        ))
    })
}

pub(super) async fn lock(issuer: Option<&LocalIssuer>, request: LockRequest) -> Result<Response<LockResponse>, Status> {
    let issuer = local(issuer, "the bot instances' ledger")?;
    let reason = if request.unlock {
        None
    } else if request.reason.trim().is_empty() {
        return Err(Status::invalid_argument(
            "a lock needs a reason: say why, for whoever unlocks it",
        ));
    } else {
        Some(request.reason.trim().to_owned())
    };
    issuer
        .set_lock(&request.bot, &request.instance, reason.clone())
        .await
        .map_err(|e| match e {
            crate::issuer::IssuerError::Invalid(why) => Status::not_found(why),
            e => Status::unavailable(e.explain()),
        })?;
    let message = match reason {
        Some(_) => format!(
            "bot/{}/{} locked: its issuance, renewals and Watch stream are refused on every replica (`tbotctl unlock` reverses it)",
            request.bot, request.instance
        ),
        None => format!("bot/{}/{} unlocked", request.bot, request.instance),
    };
    Ok(Response::new(LockResponse { message }))
}

/// Records per message of the `Issued` stream: each message stays far below the 4 MiB a gRPC client
/// takes by default (a record is a few hundred bytes).
const RECORDS_PER_MESSAGE: usize = 1000;

pub(super) type IssuedStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<IssuedResponse, Status>> + Send>>;

/// The log's records the request selects, streamed in parts of [`RECORDS_PER_MESSAGE`] (an empty
/// log is one empty part).
pub(super) async fn answer(
    issuer: Option<&LocalIssuer>,
    request: IssuedRequest,
) -> Result<Response<IssuedStream>, Status> {
    let issuer = local(issuer, "the issuance log")?;
    let since = match request.since.as_str() {
        "" => None,
        text => Some(
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).map_err(|e| {
                Status::invalid_argument(format!(
                    "`since` must be an RFC 3339 time such as 2026-12-05T03:00:00Z: {e}"
                ))
            })?,
        ),
    };
    let nonempty = |s: String| (!s.is_empty()).then_some(s);
    let filter = Filter {
        bot: nonempty(request.bot),
        spiffe_id: nonempty(request.spiffe_id),
        since,
    };
    let records = issuer
        .issued(&filter)
        .await
        .map_err(|e| Status::unavailable(e.explain()))?;
    let mut parts: Vec<Result<IssuedResponse, Status>> = records
        .chunks(RECORDS_PER_MESSAGE)
        .map(|chunk| {
            Ok(IssuedResponse {
                records: chunk
                    .iter()
                    .map(|r| serde_json::to_string(r).expect("a record serializes"))
                    .collect(),
            })
        })
        .collect();
    if parts.is_empty() {
        parts.push(Ok(IssuedResponse::default()));
    }
    Ok(Response::new(Box::pin(futures_util::stream::iter(parts))))
}

/// Every record of an `Issued` stream, as JSON lines (for `tbotctl`).
pub async fn collect(stream: tonic::Streaming<IssuedResponse>) -> Result<Vec<String>, Status> {
    use futures_util::TryStreamExt;
    let parts: Vec<IssuedResponse> = stream.try_collect().await?;
    Ok(parts.into_iter().flat_map(|p| p.records).collect())
}
