//! `tbotctl rotate ca|jwt`: a rotation by hand on the issuer's admin socket.

use std::process::ExitCode;

use clap::{Args, ValueEnum};

use super::status::print_keys;
use crate::cli::args::outln;
use crate::cli::args::{DaemonArgs, explain};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RotatedKey {
    /// The X.509 CA.
    Ca,
    /// The JWT-SVID signing key.
    Jwt,
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    /// `ca` or `jwt`.
    #[arg(value_enum)]
    pub key: RotatedKey,
    /// How long the successor is published before it signs (every agent gets it first).
    #[arg(long, default_value = "10m", value_parser = crate::resource::Duration::parse)]
    pub grace: crate::resource::Duration,
    /// While a rotation is in progress: take its next step now (activate the successor, or retire
    /// the old key). With `--revoke-old`: revoke although agents still hold what the key signed.
    #[arg(long)]
    pub force: bool,
    /// Key compromise, step one: activate the prepared successor now (if there is one) and taint
    /// every replaced key: every agent issues again at once what it signed (SVIDs, bot
    /// certificates, outputs), while it stays published so nothing fails to verify meanwhile.
    #[arg(long, conflicts_with_all = ["revoke_old", "strand"])]
    pub taint_old: bool,
    /// Key compromise, step two: withdraw every tainted key from every bundle (agents, replicas, the
    /// bundle endpoint). Refused while an agent still holds something it signed (named), unless
    /// `--force`.
    #[arg(long, conflicts_with = "strand")]
    pub revoke_old: bool,
    /// With `--force` on a retiring CA: withdraw it even though connected agents still hold bot
    /// certificates it signed (they are refused from then on, and a `token` agent needs a new token).
    /// Without it, the retire waits a few seconds for them to renew and otherwise refuses, naming them.
    #[arg(long, requires = "force")]
    pub strand: bool,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// `tbotctl rotate ca|jwt`.
pub async fn rotate(args: &RotateArgs) -> ExitCode {
    let mut client = match args.daemon.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let request = crate::admin::proto::RotateRequest {
        key: match args.key {
            RotatedKey::Ca => "ca".into(),
            RotatedKey::Jwt => "jwt".into(),
        },
        grace_seconds: args.grace.as_std().as_secs().min(u64::from(u32::MAX)) as u32,
        force: args.force,
        strand: args.strand,
        taint_old: args.taint_old,
        revoke_old: args.revoke_old,
    };
    match client.rotate(request).await {
        Ok(r) => {
            let r = r.into_inner();
            outln!("{}", r.message);
            print_keys(&r.keys);
            ExitCode::SUCCESS
        }
        Err(status) => explain(status),
    }
}
