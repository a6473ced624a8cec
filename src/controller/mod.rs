//! The loop: watch the directories, reload, plan against what was last applied, converge, and keep
//! each object's status.

pub mod plan;

pub use plan::{Action, Change, Plan, Step, plan};
