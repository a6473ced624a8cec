//! `tbot install systemd`: the unit file that runs `tbot start` under systemd (`Type=notify`,
//! reload by SIGHUP), printed or written.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::cli::args::{out, outln};
use clap::Args;

#[derive(Debug, Args)]
pub struct SystemdArgs {
    /// The documents: a directory (`--config-dir`) or one file (`-c`), as `tbot start` will read them.
    #[arg(long, value_name = "PATH")]
    pub config: PathBuf,
    /// Write the unit instead of printing it.
    #[arg(long)]
    pub write: bool,
    /// Overwrite a different unit of the same name.
    #[arg(long)]
    pub force: bool,
    /// The unit's name (`<name>.service`).
    #[arg(long, default_value = "tbot")]
    pub name: String,
    #[arg(long, default_value = "teleport")]
    pub user: String,
    #[arg(long, default_value = "teleport")]
    pub group: String,
    #[arg(long, default_value = "/etc/systemd/system", value_name = "DIR")]
    pub systemd_directory: PathBuf,
    /// Accepted for compatibility with Teleport's `tbot`; tbot sends no telemetry.
    #[arg(long)]
    pub anonymous_telemetry: bool,
}

/// The unit text.
pub fn unit(args: &SystemdArgs, exe: &Path) -> String {
    let config = if args.config.is_dir() {
        format!("--config-dir {}", args.config.display())
    } else {
        format!("-c {}", args.config.display())
    };
    format!(
        "[Unit]
Description=tbot: machine & workload identity ({name})
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
User={user}
Group={group}
ExecStart={exe} start {config}
ExecReload=/bin/kill -HUP $MAINPID
Restart=always
RestartSec=5
LimitNOFILE=524288

[Install]
WantedBy=multi-user.target
",
        name = args.name,
        user = args.user,
        group = args.group,
        exe = exe.display(),
    )
}

pub fn run(args: &SystemdArgs) -> ExitCode {
    if args.anonymous_telemetry {
        eprintln!("note: tbot collects no telemetry; --anonymous-telemetry has no effect");
    }
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/usr/local/bin/tbot"));
    let text = unit(args, &exe);
    if !args.write {
        out!("{text}");
        return ExitCode::SUCCESS;
    }
    let path = args.systemd_directory.join(format!("{}.service", args.name));
    match std::fs::read_to_string(&path) {
        Ok(existing) if existing == text => {
            outln!("{} is already up to date", path.display());
        }
        Ok(_) if !args.force => {
            eprintln!(
                "error: {} exists and differs from this unit\n  = hint: compare it with `tbot install systemd --config {}` (no --write), then pass --force to overwrite it",
                path.display(),
                args.config.display()
            );
            return ExitCode::from(1);
        }
        _ => {
            let temp = path.with_extension("service.tbot~");
            if let Err(e) = std::fs::write(&temp, &text).and_then(|()| std::fs::rename(&temp, &path)) {
                eprintln!(
                    "error: cannot write {}: {e}\n  = hint: run as root, or pass --systemd-directory",
                    path.display()
                );
                return ExitCode::from(1);
            }
            outln!("wrote {}", path.display());
        }
    }
    outln!(
        "next:\n  systemctl daemon-reload\n  systemctl enable --now {}.service",
        args.name
    );
    ExitCode::SUCCESS
}
