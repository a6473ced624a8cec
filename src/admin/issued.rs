//! The admin API's `Issued`: the issuer's issuance log, filtered, for `tbotctl get svids`.

use tonic::{Response, Status};

use super::proto::{IssuedRequest, IssuedResponse};
use crate::error::Explain;
use crate::issuer::LocalIssuer;
use crate::issuer::state::issued::Filter;

pub(super) async fn answer(
    issuer: Option<&LocalIssuer>,
    request: IssuedRequest,
) -> Result<Response<IssuedResponse>, Status> {
    let Some(issuer) = issuer else {
        return Err(Status::failed_precondition(
            "this daemon is an agent of a remote issuer: the issuance log is on the issuer host; run `tbotctl get svids` against its admin socket",
        ));
    };
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
    Ok(Response::new(IssuedResponse {
        records: records
            .iter()
            .map(|r| serde_json::to_string(r).expect("a record serializes"))
            .collect(),
    }))
}
