//! The control plane the guide's Teleport cluster plays, in rooms: [`api`] (the [`Issuer`] trait, its
//! requests, answers and errors), [`keys`] (the CA, the JWT key, rotation, minting), [`policy`]
//! (the documents as a policy: RBAC, rules, templates), [`bots`] (bot certificates, instances and
//! joins), [`state`] (the issuer's store and the replicas' records), [`federation`] (foreign trust
//! domains' bundles, and this one's bundle endpoint), [`local`] (the in-process issuer over them),
//! and [`server`] (the network API). [`tls`] and [`wire`] are shared by the server and the client in
//! `agent::remote`. The agent talks to the issuer only through the [`Issuer`] trait.

pub mod api;
pub mod bots;
pub mod federation;
pub mod keys;
mod local;
pub mod metrics;
pub mod policy;
pub mod server;
pub mod state;
pub mod tls;
pub mod wire;

pub use api::*;
pub use local::{Authenticated, LocalIssuer, PolicyEvent};
pub use policy::Policy;
pub use policy::decide::{Attributes, Decision};
