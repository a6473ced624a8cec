//! Command-line definitions and rendering for both binaries; `src/bin/*` stay thin.

pub mod diff;
pub mod inspect;
pub mod render;
pub mod tbot;
pub mod tbotctl;
