//! Command-line definitions and rendering for both binaries; `src/bin/*` stay thin.

pub mod render;
pub mod tbotctl;
