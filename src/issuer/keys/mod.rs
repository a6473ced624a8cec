//! Keys and signing: the trust domain's CA ([`ca`]) and JWT key ([`jwt`]), their rotation phases
//! ([`rotation`]), and minting X509-SVIDs, JWT-SVIDs and serving certificates ([`mint`]).

pub mod ca;
pub mod jwt;
pub mod mint;
pub mod rotation;
