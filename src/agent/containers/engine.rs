//! The `docker` and `podman` attestors: the container a caller's cgroup names ([`super::locate`]),
//! asked of its engine on the engine's unix socket, and cross-checked before any attribute is set:
//! the inspected container's `Id` is the ID asked for (a container may be *named* like another's
//! ID), it is running, and its init process's cgroup names that same container. Podman is asked
//! on its libpod API (`/v4.0.0/libpod/…`, with the pod); Docker on the Engine API version the engine
//! announces (`GET /_ping`), never a pinned old one that current engines refuse.
//!
//! Outcomes: a caller in no container, or in a container the engine does not know or that fails a
//! check, gets `workload.<engine>.attested = false` (a check that fails is logged: someone may be
//! imitating a container). An engine that cannot be asked leaves every `workload.<engine>.*` unset
//! (logged, at most every 10 s per engine), so only identities that read them are denied, naming the
//! attribute. Answers are kept 2 s per container, so a burst of connections is one inspect.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::{Findings, Location, locate};
use crate::issuer::Attributes;
use crate::resource::agent::Engine;
use crate::resource::template::Attribute;

/// How long one engine request may take.
const TIMEOUT: Duration = Duration::from_secs(2);
/// How long an engine's answer about a container is used again.
const CACHE_FOR: Duration = Duration::from_secs(2);
/// How often an unreachable engine is logged at most.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// One engine a service asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineSettings {
    pub engine: Engine,
    pub socket: PathBuf,
    pub allow_rootless: bool,
}

/// What the engine says of a container, after the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Facts {
    name: String,
    image: String,
    image_digest: Option<String>,
    labels: BTreeMap<String, String>,
    pod: Option<(String, BTreeMap<String, String>)>,
}

/// Why a container was not attested.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refusal {
    /// The engine does not know it, or a check failed: `attested = false`.
    NotThis(String),
    /// The engine could not be asked: nothing is set.
    Unreachable(String),
}

/// GETs `path` on the engine's unix socket: the status, the headers and the body.
async fn get(socket: &Path, path: &str) -> Result<(http::StatusCode, http::HeaderMap, Bytes), String> {
    let ask = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("no HTTP: {e}"))?;
        tokio::spawn(connection);
        let request = http::Request::get(path)
            .header(http::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("no answer: {e}"))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok((parts.status, parts.headers, body))
    };
    tokio::time::timeout(TIMEOUT, ask)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} s", TIMEOUT.as_secs())))
}

/// GETs a JSON document; `None` for a 404 (no such object).
async fn get_json(socket: &Path, path: &str) -> Result<Option<Value>, String> {
    let (status, _, body) = get(socket, path).await?;
    if status == http::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        return Err(format!("{path} answered {status}: {}", text.escape_debug()));
    }
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| format!("{path} answered what is not JSON: {e}"))
}

fn text(v: &Value, pointer: &str) -> String {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn labels(v: &Value, pointer: &str) -> BTreeMap<String, String> {
    v.pointer(pointer)
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// The path of the engine's inspect endpoint for container `id`.
async fn inspect_path(engine: Engine, socket: &Path, id: &str) -> Result<String, String> {
    Ok(match engine {
        Engine::Podman => format!("/v4.0.0/libpod/containers/{id}/json"),
        Engine::Docker => {
            // The API version the engine speaks, from its ping; unversioned if it does not say.
            let (_, headers, _) = get(socket, "/_ping").await?;
            match headers.get("api-version").and_then(|v| v.to_str().ok()) {
                Some(version) if version.bytes().all(|b| b.is_ascii_digit() || b == b'.') => {
                    format!("/v{version}/containers/{id}/json")
                }
                _ => format!("/containers/{id}/json"),
            }
        }
    })
}

/// Asks the engine about container `id` and checks the answer against the caller's view.
async fn inspect(settings: &EngineSettings, id: &str, proc_root: &Path) -> Result<Facts, Refusal> {
    let socket = &settings.socket;
    let unreachable = |e: String| Refusal::Unreachable(format!("unix://{}: {e}", socket.display()));
    let path = inspect_path(settings.engine, socket, id).await.map_err(unreachable)?;
    let Some(found) = get_json(socket, &path).await.map_err(unreachable)? else {
        return Err(Refusal::NotThis(format!(
            "the engine does not know container {}",
            &id[..12]
        )));
    };
    // Looked up by a string that may be another container's *name*: the ID must be the one asked.
    let found_id = text(&found, "/Id");
    if found_id != id {
        return Err(Refusal::NotThis(format!(
            "asked for container {}, the engine answered with container {} (a container named like the ID?)",
            &id[..12],
            found_id.get(..12).unwrap_or(&found_id)
        )));
    }
    let running = found.pointer("/State/Running").and_then(Value::as_bool) == Some(true);
    let pid = found.pointer("/State/Pid").and_then(Value::as_i64).unwrap_or(0);
    if !running || pid <= 0 {
        return Err(Refusal::NotThis(format!("container {} is not running", &id[..12])));
    }
    // Its init process's cgroup must name the same container.
    let init = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).unwrap_or_default();
    match locate(&init) {
        Ok(Location::Container(c)) if c.id == id => {}
        other => {
            return Err(Refusal::NotThis(format!(
                "container {}'s init process (pid {pid}) is not in its cgroup ({other:?})",
                &id[..12]
            )));
        }
    }
    let name = text(&found, "/Name");
    let mut facts = Facts {
        name: name.strip_prefix('/').unwrap_or(&name).to_owned(),
        image: text(&found, "/Config/Image"),
        image_digest: None,
        labels: labels(&found, "/Config/Labels"),
        pod: None,
    };
    match settings.engine {
        Engine::Docker => {
            facts.image_digest = Some(text(&found, "/Image")).filter(|d| d.starts_with("sha256:"));
        }
        Engine::Podman => {
            facts.image_digest = Some(text(&found, "/ImageDigest")).filter(|d| !d.is_empty());
            let pod = text(&found, "/Pod");
            if !pod.is_empty() {
                let pod_path = format!("/v4.0.0/libpod/pods/{pod}/json");
                if let Some(p) = get_json(socket, &pod_path).await.map_err(unreachable)? {
                    facts.pod = Some((text(&p, "/Name"), labels(&p, "/Labels")));
                }
            }
        }
    }
    Ok(facts)
}

type Cache = Mutex<HashMap<(PathBuf, String), (Instant, Result<Facts, Refusal>)>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(Cache::default)
}

/// [`inspect`], answered from the last 2 s when it can be.
async fn inspect_cached(settings: &EngineSettings, id: &str, proc_root: &Path) -> Result<Facts, Refusal> {
    let key = (settings.socket.clone(), id.to_owned());
    if let Some((at, answer)) = cache().lock().expect("engine cache poisoned").get(&key)
        && at.elapsed() < CACHE_FOR
    {
        return answer.clone();
    }
    let answer = inspect(settings, id, proc_root).await;
    let mut cache = cache().lock().expect("engine cache poisoned");
    cache.retain(|_, (at, _)| at.elapsed() < CACHE_FOR);
    cache.insert(key, (Instant::now(), answer.clone()));
    answer
}

/// Logs that an engine cannot be asked, at most every [`LOG_EVERY`] per socket.
fn log_unreachable(settings: &EngineSettings, why: &str) {
    static LAST: OnceLock<Mutex<HashMap<PathBuf, Instant>>> = OnceLock::new();
    let mut last = LAST.get_or_init(Default::default).lock().expect("log table poisoned");
    if last.get(&settings.socket).is_some_and(|at| at.elapsed() < LOG_EVERY) {
        return;
    }
    last.insert(settings.socket.clone(), Instant::now());
    tracing::warn!(engine = settings.engine.name(), error = %why,
        "the container engine cannot be asked; workload.{}.* stay unset: is it running, and may tbot use its socket?",
        settings.engine.name());
}

/// The `workload.<engine>.*` attributes of the caller whose `/proc/<pid>/cgroup` reads `cgroup`.
pub async fn attest(cgroup: &str, engines: &[EngineSettings], proc_root: &Path) -> Findings {
    let mut found = Findings::default();
    if engines.is_empty() {
        return found;
    }
    let located = match locate(cgroup) {
        Ok(Location::Container(c)) => Some(c),
        // Not "no container": tbot cannot see. Nothing is set, and the log says why.
        Ok(Location::HiddenByCgroupNamespace) => {
            super::warn_hidden();
            for settings in engines {
                found.unasked(settings.engine.name(), super::HIDDEN);
            }
            return found;
        }
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "a caller's cgroup names two containers; it is attested as in none");
            None
        }
    };
    let out = &mut found.attributes;
    let mut unasked = Vec::new();
    for settings in engines {
        let prefix = format!("workload.{}", settings.engine.name());
        let set_false = |out: &mut Attributes| {
            out.set(format!("{prefix}.attested"), false);
        };
        let Some(container) = &located else {
            set_false(out);
            continue;
        };
        if container.delegated && !settings.allow_rootless {
            tracing::debug!(path = %container.path, "a container in a user-delegated cgroup is not attested (allow_rootless)");
            set_false(out);
            continue;
        }
        match inspect_cached(settings, &container.id, proc_root).await {
            Ok(facts) => {
                out.set(format!("{prefix}.attested"), true)
                    .set(format!("{prefix}.container.name"), &facts.name)
                    .set(format!("{prefix}.container.image"), &facts.image);
                if let Some(digest) = &facts.image_digest {
                    out.set(format!("{prefix}.container.image_digest"), digest);
                }
                set_map(out, &prefix, "container.labels", &facts.labels);
                if let Some((pod, labels)) = &facts.pod {
                    out.set(format!("{prefix}.pod.name"), pod);
                    set_map(out, &prefix, "pod.labels", labels);
                }
            }
            Err(Refusal::NotThis(why)) => {
                tracing::warn!(engine = settings.engine.name(), container = &container.id[..12], %why,
                    "a caller's container is not attested");
                set_false(out);
            }
            Err(Refusal::Unreachable(why)) => {
                log_unreachable(settings, &why);
                unasked.push((settings.engine.name(), why));
            }
        }
    }
    for (engine, why) in unasked {
        found.unasked(engine, why);
    }
    found
}

/// Sets each entry of a map attribute under the name templates read it by.
fn set_map(out: &mut Attributes, prefix: &str, map: &str, entries: &BTreeMap<String, String>) {
    let base = format!("{prefix}.{map}");
    let Some(&(base, _)) = crate::resource::template::CATALOGUE.iter().find(|(n, _)| *n == base) else {
        return;
    };
    for (key, value) in entries {
        let name = Attribute {
            base,
            key: Some(key.clone()),
        };
        out.set(name.to_string(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_caller_tbot_cannot_see_is_neither_attested_nor_refused() {
        let engines = [EngineSettings {
            engine: Engine::Podman,
            socket: PathBuf::from("/nonexistent/podman.sock"),
            allow_rootless: false,
        }];
        let hidden = attest("0::/\n1:name=systemd:/", &engines, Path::new("/proc")).await;
        assert_eq!(hidden.attributes.iter().count(), 0, "nothing set");
        assert_eq!(
            hidden.unasked,
            ["podman: not asked (tbot runs in a private cgroup namespace and cannot see the caller's container)"]
        );
        let host = attest("0::/system.slice/nginx.service", &engines, Path::new("/proc")).await;
        assert!(host.unasked.is_empty());
        let attested: Vec<_> = host.attributes.iter().collect();
        assert_eq!(attested, [("workload.podman.attested", &["false".to_owned()][..])]);
    }
}
