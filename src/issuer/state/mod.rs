//! The issuer's state over the kv store: the store with its key encryption key ([`backing`]) and the
//! replicas' heartbeat records and document drift ([`replicas`]), and the issuance log ([`issued`]). `issuer::local` follows it into
//! memory.

pub mod backing;
pub mod issued;
pub mod replicas;
