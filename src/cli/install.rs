//! `tbot install systemd`: the unit file that runs `tbot start` under systemd (`Type=notify`,
//! reload by SIGHUP), printed or written. It is the unit the Debian package ships
//! (`scripts/package.sh` prints it): the installed binary, a user that exists, `/run/<name>` and
//! `/var/lib/<name>` made by systemd for that user, and idle until the documents exist.

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
    /// The user the service runs as; `--write` refuses one that does not exist.
    #[arg(long, default_value = "tbot")]
    pub user: String,
    #[arg(long, default_value = "tbot")]
    pub group: String,
    /// The tbot binary the unit runs. Default: this one, unless it runs from a build tree
    /// (`target/debug`), then the installed one (`/usr/bin/tbot`, `/usr/local/bin/tbot`,
    /// `~/.cargo/bin/tbot`).
    #[arg(long, value_name = "PATH")]
    pub exe: Option<PathBuf>,
    #[arg(long, default_value = "/etc/systemd/system", value_name = "DIR")]
    pub systemd_directory: PathBuf,
    /// Accepted for compatibility with Teleport's `tbot`; tbot sends no telemetry.
    #[arg(long)]
    pub anonymous_telemetry: bool,
}

/// The unit text.
pub fn unit(args: &SystemdArgs, exe: &Path) -> String {
    // A directory (it need not exist yet where the unit is made: the package builder's), unless it
    // names a YAML file.
    let file = args.config.extension().is_some_and(|e| e == "yaml" || e == "yml") && !args.config.is_dir();
    let (config, condition) = if !file {
        let dir = args.config.display();
        (
            format!("--config-dir {dir}"),
            format!(
                "# Idle until the directory holds a document (a condition, not a crash loop).\n\
                 ConditionPathExistsGlob=|{dir}/*.yaml\nConditionPathExistsGlob=|{dir}/*.yml"
            ),
        )
    } else {
        let file = args.config.display();
        (format!("-c {file}"), format!("ConditionPathExists={file}"))
    };
    format!(
        "[Unit]
Description=tbot: machine & workload identity ({name})
After=network-online.target
Wants=network-online.target
{condition}

[Service]
Type=notify
User={user}
Group={group}
ExecStart={exe} start {config}
ExecReload=/bin/kill -HUP $MAINPID
Restart=always
RestartSec=5
LimitNOFILE={open_files}
# /run/{name} (sockets) and /var/lib/{name} (state, 0700), owned by the user.
RuntimeDirectory={name}
RuntimeDirectoryMode=0755
RuntimeDirectoryPreserve=yes
StateDirectory={name}
StateDirectoryMode=0700
# Reading /proc/<pid>/exe of callers of other users (workload.unix.binary_path and binary_hash)
# needs CAP_SYS_PTRACE; remove these two lines when no identity reads them.
AmbientCapabilities=CAP_SYS_PTRACE
CapabilityBoundingSet=CAP_SYS_PTRACE
NoNewPrivileges=yes

[Install]
WantedBy=multi-user.target
",
        name = args.name,
        user = args.user,
        group = args.group,
        exe = exe.display(),
        open_files = super::tbot::OPEN_FILES,
    )
}

/// Whether `path` is in a cargo build tree (`…/target/debug/tbot`), which is no place for a service.
fn in_build_tree(path: &Path) -> bool {
    let parent = path.parent();
    parent
        .and_then(Path::file_name)
        .is_some_and(|n| n == "debug" || n == "release")
        && parent
            .and_then(Path::parent)
            .and_then(Path::file_name)
            .is_some_and(|n| n == "target")
}

/// The binary the unit runs: `--exe`, else this one unless it runs from a build tree, else the
/// installed one.
fn exe_for(args: &SystemdArgs) -> Result<PathBuf, String> {
    if let Some(exe) = &args.exe {
        return Ok(exe.clone());
    }
    let this = std::env::current_exe().map_err(|e| format!("cannot tell where this tbot is: {e}"))?;
    if !in_build_tree(&this) {
        return Ok(this);
    }
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|c| c.join("bin/tbot"));
    [
        Some(PathBuf::from("/usr/bin/tbot")),
        Some(PathBuf::from("/usr/local/bin/tbot")),
        cargo_bin,
    ]
    .into_iter()
    .flatten()
    .find(|p| p.is_file())
    .ok_or_else(|| {
        format!(
            "this tbot runs from a build tree ({}), and no installed tbot was found\n  = hint: install it first \
                 (the Debian package from scripts/package.sh, or `cargo install --path .`), or pass --exe PATH",
            this.display()
        )
    })
}

/// Whether the user exists (`getent passwd`, so users of NSS sources count too).
fn user_exists(user: &str) -> bool {
    match std::process::Command::new("getent").args(["passwd", user]).output() {
        Ok(out) => out.status.success(),
        Err(_) => std::fs::read_to_string("/etc/passwd")
            .map(|p| p.lines().any(|l| l.split(':').next() == Some(user)))
            .unwrap_or(false),
    }
}

pub fn run(args: &SystemdArgs) -> ExitCode {
    if args.anonymous_telemetry {
        eprintln!("note: tbot collects no telemetry; --anonymous-telemetry has no effect");
    }
    let exe = match exe_for(args) {
        Ok(exe) => exe,
        Err(why) => {
            eprintln!("error: {why}");
            return ExitCode::from(1);
        }
    };
    let text = unit(args, &exe);
    let missing_user = (!user_exists(&args.user)).then(|| {
        format!(
            "the user `{user}` does not exist on this machine\n  = hint: create it (`adduser --system --group {user}`; the \
             Debian package creates `tbot`), or pass --user and --group",
            user = args.user
        )
    });
    if !args.write {
        if let Some(why) = &missing_user {
            eprintln!("warning: {why}");
        }
        out!("{text}");
        return ExitCode::SUCCESS;
    }
    if let Some(why) = missing_user {
        eprintln!("error: {why}");
        return ExitCode::from(1);
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
