//! Keys and signing: the trust domain's CA ([`ca`]) and JWT key ([`jwt`]), their rotation phases
//! ([`rotation`]), minting X509-SVIDs, JWT-SVIDs and serving certificates ([`mint`]), and what a
//! public key must be to be signed for ([`public`]).

pub mod ca;
pub mod crl;
pub mod jwt;
pub mod mint;
pub mod public;
pub mod rotation;
