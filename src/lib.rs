//! tbot: a declarative machine & workload identity agent (see `../shared/DESIGN.md` for the map).
#![forbid(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod aws;
pub mod cli;
pub mod controller;
pub mod issuer;
pub mod manifest;
pub mod resource;
pub mod store;
pub mod workload_api;

/// An error with its sources, `outer: inner: innermost`, for messages.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
