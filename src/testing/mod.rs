//! Code for tests, fuzzing and benches only, behind the `testing` feature (the test suite and the
//! benches turn it on; the production library exports none of it): the fuzz targets' bodies, example
//! documents, and hooks such as a remote issuer client's local address.

pub mod examples;
pub mod fuzz;
