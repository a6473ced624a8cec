//! The checks before a key leaves every bundle (a forced CA retire, `--revoke-old`): the connected
//! agents (on every replica) whose bot certificates the CA signed must have renewed onto the active
//! CA, and no agent may still hold an SVID the key signed; otherwise they are named.

use std::time::Duration;

use tonic::Status;

use super::server::AdminApi;

/// How long a withdrawal waits for connected agents to move off the key: other replicas' counts
/// arrive with their heartbeats (every 5 s).
const RENEWAL_WAIT: Duration = Duration::from_secs(15);

/// Agents named in a refusal, at most.
const NAMED: usize = 10;

/// Who still depends on a key: this replica's agents by name (with how many SVIDs), the other
/// replicas' by count.
#[derive(Debug, Default)]
pub(super) struct Dependents {
    pub here: Vec<String>,
    pub elsewhere: Vec<(String, u64)>,
    pub agents: u64,
    pub svids: u64,
}

impl Dependents {
    fn none(&self) -> bool {
        self.agents == 0
    }

    /// The agents named, then the other replicas' counts.
    fn names(&self) -> String {
        let mut names: Vec<String> = self.here.iter().take(NAMED).cloned().collect();
        if self.here.len() > NAMED {
            names.push(format!("and {} more", self.here.len() - NAMED));
        }
        names.extend(
            self.elsewhere
                .iter()
                .map(|(replica, n)| format!("{n} on replica {replica}")),
        );
        names.join(", ")
    }
}

/// Looks every 100 ms, for up to [`RENEWAL_WAIT`], until `look` finds what `done` wants (once only
/// when `bypass`: the operator said to go ahead anyway); the last look.
async fn settle<T>(bypass: bool, look: impl Fn() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = tokio::time::Instant::now() + RENEWAL_WAIT;
    let mut last = look();
    while !done(&last) && !bypass && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        last = look();
    }
    last
}

fn agents(n: u64) -> String {
    match n {
        1 => "1 agent".into(),
        n => format!("{n} agents"),
    }
}

impl AdminApi {
    /// Who holds something the key named `name` (a CA's pin, a `kid`) signed, as the agents
    /// report it: this replica's connected agents (one that has not reported yet may hold anything,
    /// and counts), the agent in this process, and the counts other replicas' heartbeats carry
    /// (with `since`, a replica whose last heartbeat is older counts as one dependent: what it says
    /// may predate the change being waited for).
    pub(super) fn dependents(&self, issuer: &crate::issuer::LocalIssuer, name: &str, since: Option<i64>) -> Dependents {
        let mut out = Dependents::default();
        let add = |who: String, held: Option<&crate::issuer::Holdings>, out: &mut Dependents| {
            let Some(held) = held else {
                out.here.push(format!("{who}: has not reported what it holds yet"));
                out.agents += 1;
                return;
            };
            let (svids, bot) = held.on(name);
            if svids > 0 || bot {
                let bot = if bot { " and its bot certificate" } else { "" };
                out.here.push(format!("{who}: {svids} SVIDs{bot}"));
                out.agents += 1;
                out.svids += svids;
            }
        };
        if let Some(sessions) = &self.sessions {
            for s in sessions.agents() {
                add(
                    format!("{}/{} ({})", s.bot, s.instance, s.address),
                    s.held.as_ref(),
                    &mut out,
                );
            }
        }
        if let Some((who, held)) = issuer.local_holdings() {
            add(format!("{who} (this host)"), Some(&held), &mut out);
        }
        let this = self.status.get().host.replica.clone();
        for replica in issuer.replicas().into_iter().filter(|r| r.name != this) {
            let [n, svids] = replica.held.get(name).copied().unwrap_or_default();
            let unreported = replica.held.get("").map_or(0, |c| c[0]);
            let stale = since.is_some_and(|t| replica.heartbeat < t);
            let n = n + unreported + u64::from(stale);
            if n > 0 {
                out.elsewhere.push((replica.name, n));
                out.agents += n;
                out.svids += svids;
            }
        }
        out
    }

    /// Before `--revoke-old` withdraws the keys named `names`: every agent was told to issue again
    /// what they signed when they were tainted; waits up to [`RENEWAL_WAIT`] for the last to report
    /// it did, then refuses, naming who still depends on them, unless `force`.
    pub(super) async fn wait_for_dependents(
        &self,
        issuer: &crate::issuer::LocalIssuer,
        names: &[String],
        force: bool,
    ) -> Result<(), Status> {
        // Other replicas' counts are taken from a heartbeat after this moment only.
        let since = time::OffsetDateTime::now_utc().unix_timestamp() + 1;
        let depending = || {
            names
                .iter()
                .map(|n| (n.clone(), self.dependents(issuer, n, Some(since))))
                .filter(|(_, d)| !d.none())
                .collect::<Vec<_>>()
        };
        let left = settle(force, depending, |left| left.is_empty()).await;
        if left.is_empty() {
            return Ok(());
        }
        let said: Vec<String> = left
            .iter()
            .map(|(name, d)| format!("{name}: {} holding {} SVIDs ({})", agents(d.agents), d.svids, d.names()))
            .collect();
        if force {
            tracing::warn!(dependents = %said.join("; "),
                "revoking keys although agents still hold what they signed (--force): it no longer verifies");
            return Ok(());
        }
        Err(Status::failed_precondition(format!(
            "agents still hold what the tainted key signed, {}s after being told to issue it again: {}. Revoking \
             now would make it fail verification. Look at why those agents did not move (their logs, `tbotctl \
             status` on them), wait, or pass --force to revoke anyway",
            RENEWAL_WAIT.as_secs(),
            said.join("; ")
        )))
    }

    /// Before the CAs `withdrawn` leave every bundle: the connected agents whose bot certificates
    /// they signed were told to renew (at the successor's activation, or the taint); waits up to
    /// [`RENEWAL_WAIT`] for them, then refuses to strand the rest unless `strand`.
    pub(super) async fn wait_for_renewals_off(
        &self,
        issuer: &crate::issuer::LocalIssuer,
        withdrawn: &[u32],
        strand: bool,
    ) -> Result<(), Status> {
        let Some(sessions) = &self.sessions else { return Ok(()) };
        let this = self.status.get().host.replica.clone();
        // This replica's agents by name; the other replicas' by count, from their heartbeats.
        let stranded = || {
            // Each agent's latest stream: one opened with a renewed certificate counts, not the old.
            let here: Vec<crate::issuer::server::AgentSession> = sessions
                .agents()
                .into_iter()
                .filter(|s| withdrawn.contains(&s.ca))
                .collect();
            let elsewhere: Vec<(String, u64)> = issuer
                .replicas()
                .into_iter()
                .filter(|r| r.name != this)
                .map(|r| {
                    let n = withdrawn
                        .iter()
                        .map(|ca| r.agents_by_ca.get(ca).copied().unwrap_or(0))
                        .sum();
                    (r.name, n)
                })
                .filter(|(_, n)| *n > 0)
                .collect();
            Dependents {
                agents: here.len() as u64 + elsewhere.iter().map(|(_, n)| n).sum::<u64>(),
                here: here
                    .iter()
                    .map(|s| format!("{}/{} ({})", s.bot, s.instance, s.address))
                    .collect(),
                elsewhere,
                svids: 0,
            }
        };
        let left = settle(strand, stranded, Dependents::none).await;
        if left.none() {
            return Ok(());
        }
        let count = match left.agents {
            1 => "1 connected agent still holds".to_owned(),
            n => format!("{n} connected agents still hold"),
        };
        if strand {
            tracing::warn!(agents = left.agents, names = %left.names(),
                "withdrawing the CA now although connected agents hold bot certificates it signed: they are refused from now on");
            return Ok(());
        }
        Err(Status::failed_precondition(format!(
            "{count} a bot certificate of the CA this would withdraw, and did not renew onto the active CA \
             within {}s: {}. Withdrawing it now would refuse them (a `token` agent then needs a new token). \
             Wait until they renew (see `tbotctl status`, column CA), or pass --strand to withdraw it anyway",
            RENEWAL_WAIT.as_secs(),
            left.names()
        )))
    }
}
