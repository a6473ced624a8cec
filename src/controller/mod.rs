//! The pure reconciler parts: the plan, status conditions and reasons, persistence of the records,
//! the inventory, file watching, the service manager's protocol, and retry (back off or wait for an
//! edit). The daemon (`crate::daemon`) composes them.

pub mod inventory;
pub mod notify;
pub mod persist;
pub mod plan;
pub mod retry;
mod sorted;
pub mod status;
pub mod watch;

pub use plan::{Action, Change, Plan, Step, plan};
