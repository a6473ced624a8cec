//! Command-line definitions and rendering for both binaries; `src/bin/*` stay thin.

pub mod admin_cmds;
pub mod diff;
pub mod inspect;
pub mod install;
pub mod tbot;
pub mod tbotctl;
