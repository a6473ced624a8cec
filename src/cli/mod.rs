//! Command-line definitions and rendering for both binaries; `src/bin/*` stay thin.

pub mod args;
pub mod inspect;
pub mod install;
pub mod tbot;
pub mod tbotctl;
