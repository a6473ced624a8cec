//! tbot: a declarative machine & workload identity agent (see `../shared/DESIGN.md` for the map).
#![forbid(unsafe_code)]

pub mod agent;
pub mod aws;
pub mod cli;
pub mod issuer;
pub mod manifest;
pub mod resource;
pub mod store;
pub mod workload_api;
