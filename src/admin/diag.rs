//! The diagnostics HTTP endpoint on `diag_addr`: `/livez`, `/readyz` (JSON, per service; 503 until
//! every service is ready), `/readyz/<service>`, and `/metrics` (Prometheus text 0.0.4, or OpenMetrics
//! when the caller accepts `application/openmetrics-text`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;

use crate::controller::status::{Status, StatusReader};
use crate::telemetry::Metrics;

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

/// What to answer for `path`; `openmetrics` when the caller accepts OpenMetrics.
fn route(
    path: &str,
    status: &Status,
    expected: &[String],
    metrics: &Metrics,
    openmetrics: bool,
) -> Response<Full<Bytes>> {
    let info = &status.host;
    let serving: Vec<&str> = info.serving().collect();
    let state = |name: &str| if serving.contains(&name) { "ready" } else { "not ready" };
    match path {
        "/livez" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            let all = !info.bot.is_empty() && expected.iter().all(|n| serving.contains(&n.as_str()));
            let services: serde_json::Map<String, serde_json::Value> = expected
                .iter()
                .map(|n| (n.clone(), json!({"status": state(n)})))
                .collect();
            // A file that fails to load does not make the daemon unready (it serves the last good
            // state), but it is counted here so that a probe's log shows it.
            let failing = status.table.file_errors.len();
            let body = json!({
                "status": if all { "ready" } else { "not ready" },
                "services": services,
                "config_files_failing": failing,
            });
            let code = if all {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            reply(code, "application/json", format!("{body}\n"))
        }
        "/metrics" if openmetrics => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.openmetrics(),
        ),
        "/metrics" => reply(StatusCode::OK, "text/plain; version=0.0.4", metrics.prometheus_text()),
        other => match other.strip_prefix("/readyz/") {
            Some(name) if expected.iter().any(|n| n == name) => {
                let ready = serving.contains(&name);
                let code = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                reply(
                    code,
                    "application/json",
                    format!("{}\n", json!({"status": state(name)})),
                )
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /livez, /readyz, /readyz/<service> or /metrics\n".into(),
            ),
        },
    }
}

/// Serves diagnostics on `addr` in the background.
pub async fn serve(
    addr: SocketAddr,
    status: StatusReader,
    expected: Vec<String>,
    metrics: Arc<Metrics>,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot serve diagnostics on {addr}: {e}"))?;
    let expected = Arc::new(expected);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let status = status.clone();
            let expected = expected.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let openmetrics = request
                        .headers()
                        .get_all(hyper::header::ACCEPT)
                        .iter()
                        .any(|v| v.to_str().is_ok_and(|v| v.contains("application/openmetrics-text")));
                    let response = route(request.uri().path(), &status.get(), &expected, &metrics, openmetrics);
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(())
}
