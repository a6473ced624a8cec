//! `tbotctl lock BOT/INSTANCE --reason TEXT` and `tbotctl unlock BOT/INSTANCE`: a bot instance whose
//! key leaked is refused (issuance, renewal, its `Watch` stream) until unlocked.

use std::process::ExitCode;

use clap::Args;

use crate::admin::proto::LockRequest;
use crate::cli::args::{DaemonArgs, explain, fail, outln};

#[derive(Debug, Args)]
pub struct LockArgs {
    /// `BOT/INSTANCE`, as `tbotctl get bot/BOT` lists its instances.
    #[arg(value_name = "BOT/INSTANCE")]
    pub which: String,
    /// Why (required to lock), for whoever unlocks it.
    #[arg(long, default_value = "")]
    pub reason: String,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// `BOT/INSTANCE` split, or the error to print.
pub(super) fn bot_instance(which: &str) -> Result<(String, String), ExitCode> {
    match which.split_once('/') {
        Some((bot, instance)) if !bot.is_empty() && !instance.is_empty() => Ok((bot.to_owned(), instance.to_owned())),
        _ => Err(fail(
            format!("`{which}` is not BOT/INSTANCE"),
            "copy it from `tbotctl get bot/BOT` (its instances) or `tbotctl get svids`",
        )),
    }
}

/// Sends the lock (or unlock) to the daemon; prints its answer.
pub(super) async fn send(daemon: &DaemonArgs, bot: String, instance: String, reason: String, unlock: bool) -> ExitCode {
    let mut client = match daemon.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let request = LockRequest {
        bot,
        instance,
        reason,
        unlock,
    };
    match client.lock(request).await {
        Ok(r) => {
            outln!("{}", r.into_inner().message);
            ExitCode::SUCCESS
        }
        Err(status) => explain(status),
    }
}

pub async fn lock(args: &LockArgs, unlock: bool) -> ExitCode {
    let (bot, instance) = match bot_instance(&args.which) {
        Ok(v) => v,
        Err(code) => return code,
    };
    if !unlock && args.reason.trim().is_empty() {
        return fail("a lock needs `--reason`", "say why, for whoever unlocks it");
    }
    send(&args.daemon, bot, instance, args.reason.clone(), unlock).await
}
