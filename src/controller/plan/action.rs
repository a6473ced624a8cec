//! The plan's typed actions: what the daemon does at run time, and how `tbotctl diff` prints each.

use std::fmt;

/// What the daemon does at run time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Load or create the CA of a trust domain (first start, or the trust domain changed).
    CreateCa {
        trust_domain: String,
    },
    /// A new CA for the same trust domain (key algorithm or validity changed); both stay trusted.
    RotateCa {
        trust_domain: String,
    },
    /// Join for the first time.
    Join,
    /// Join again with new terms; the old identity stays until the rejoin succeeds or expires.
    Rejoin,
    /// An agent of a remote issuer trusts it differently (`ca_pins`, `ca_path`, `insecure`): the
    /// next connection is checked against the new trust; no new join.
    Retrust,
    Bind {
        service: String,
        listen: String,
    },
    /// Bind the new socket, then drain and close the old one.
    Rebind {
        service: String,
        from: String,
        to: String,
    },
    Unbind {
        service: String,
        listen: String,
    },
    /// New selector, attestors or SVID lifetime for a service: re-decide its callers.
    Reconfigure {
        service: String,
    },
    /// A new file output: issue its SVID and write its files.
    Write {
        output: String,
        path: String,
    },
    /// An output's settings changed: issue again and replace its files.
    Rewrite {
        output: String,
        path: String,
    },
    /// An output removed: stop renewing; its files are left in place.
    StopOutput {
        output: String,
        path: String,
    },
    Issue {
        identity: String,
    },
    Reissue {
        identity: String,
    },
    Revoke {
        identity: String,
    },
    /// Trust a foreign trust domain: keep its bundle from `source` and give it to workloads.
    Federate {
        trust_domain: String,
        source: String,
        new: bool,
    },
    /// Stop trusting a foreign trust domain: its bundle is withdrawn from every workload.
    Unfederate {
        trust_domain: String,
    },
    /// A key's rotation schedule changed (`key` is `ca` or `jwt`): the issuer follows the new one
    /// from now on; the active key keeps its dates.
    Reschedule {
        key: String,
        schedule: String,
    },
    /// The issuance log's limits changed (`cluster.spec.issuance_log`): kept from the next write on.
    IssuanceLog {
        settings: String,
    },
    /// A change that only takes effect at the next start.
    RestartRequired {
        field: String,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::CreateCa { trust_domain } => write!(f, "+ ca {trust_domain}: create (or load) the CA"),
            Action::Federate {
                trust_domain,
                source,
                new: true,
            } => write!(
                f,
                "+ federation {trust_domain}: keep its bundle ({source}) and give it to workloads"
            ),
            Action::Federate {
                trust_domain, source, ..
            } => write!(
                f,
                "~ federation {trust_domain}: keep its bundle from {source} from now on"
            ),
            Action::Unfederate { trust_domain } => write!(
                f,
                "- federation {trust_domain}: withdraw its bundle from every workload"
            ),
            Action::RotateCa { trust_domain } => write!(
                f,
                "~ ca {trust_domain}: prepare a CA with the new settings; in every bundle now, signing after 10m (`tbotctl rotate ca --force` activates it now)"
            ),
            Action::Join => write!(f, "+ bot: join"),
            Action::Rejoin => write!(f, "~ bot: rejoin with the new terms"),
            Action::Retrust => write!(
                f,
                "~ issuer: check its certificate against the new trust at the next connection"
            ),
            Action::Bind { service, listen } => write!(f, "+ listener {service}: bind {listen}"),
            Action::Rebind { service, from, to } => write!(f, "~ listener {service}: rebind {from} → {to}"),
            Action::Unbind { service, listen } => write!(f, "- listener {service}: unbind {listen}"),
            Action::Reconfigure { service } => write!(f, "~ listener {service}: re-decide its callers"),
            Action::Write { output, path } => write!(f, "+ output {output}: write {path}"),
            Action::Rewrite { output, path } => {
                write!(f, "~ output {output}: issue again and replace the files in {path}")
            }
            Action::StopOutput { output, path } => write!(
                f,
                "- output {output}: stop renewing; the files in {path} are left in place"
            ),
            Action::Issue { identity } => write!(f, "+ SVIDs of workload_identity/{identity} issued"),
            Action::Reissue { identity } => write!(f, "~ SVIDs of workload_identity/{identity} reissued"),
            Action::Revoke { identity } => write!(f, "- SVIDs of workload_identity/{identity} revoked"),
            Action::Reschedule { key, schedule } => {
                write!(f, "~ {key} rotation: {schedule}; the active key keeps its dates")
            }
            Action::IssuanceLog { settings } => write!(f, "~ issuance log: {settings}"),
            Action::RestartRequired { field } => write!(f, "! {field} changed: takes effect at the next restart"),
        }
    }
}
