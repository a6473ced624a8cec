//! The loop: watch the directories, reload, plan against what was last applied, converge.

pub mod daemon;
pub mod inventory;
pub mod notify;
pub mod persist;
pub mod plan;
pub mod status;
pub mod watch;

pub use plan::{Action, Change, Plan, Step, plan};
