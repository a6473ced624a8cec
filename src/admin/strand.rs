//! The forced CA retire's check: before a CA leaves every bundle, the connected agents (on every
//! replica) whose bot certificates it signed must have renewed onto the active CA, or be named.

use std::time::Duration;

use tonic::Status;

use super::server::AdminApi;

/// How long a forced CA retire waits for connected agents to renew onto the active CA: other
/// replicas' counts arrive with their heartbeats (every 5 s).
const RENEWAL_WAIT: Duration = Duration::from_secs(15);

impl AdminApi {
    /// Before a forced retire withdraws a CA: the connected agents whose bot certificates it signed
    /// were told to renew when the successor activated (the bundle on their `Watch` streams); waits
    /// up to [`RENEWAL_WAIT`] for them, then refuses to strand the rest unless `strand`.
    pub(super) async fn wait_for_renewals_off_retiring_cas(
        &self,
        issuer: &crate::issuer::LocalIssuer,
        strand: bool,
    ) -> Result<(), Status> {
        let Some(sessions) = &self.sessions else { return Ok(()) };
        let this = self.status.get().host.replica.clone();
        // This replica's agents by name; the other replicas' by count, from their heartbeats.
        let stranded = || {
            let retiring = issuer.retiring_cas();
            let mut here: Vec<crate::issuer::server::AgentSession> = sessions
                .list()
                .into_iter()
                .map(|(s, _)| s)
                .filter(|s| retiring.contains(&s.ca))
                .collect();
            here.sort_by(|a, b| (&a.bot, &a.instance).cmp(&(&b.bot, &b.instance)));
            here.dedup_by(|a, b| a.bot == b.bot && a.instance == b.instance);
            let elsewhere: Vec<(String, u64)> = issuer
                .replicas()
                .into_iter()
                .filter(|r| r.name != this)
                .map(|r| {
                    let n = retiring
                        .iter()
                        .map(|ca| r.agents_by_ca.get(ca).copied().unwrap_or(0))
                        .sum();
                    (r.name, n)
                })
                .filter(|(_, n)| *n > 0)
                .collect();
            (here, elsewhere)
        };
        let deadline = tokio::time::Instant::now() + RENEWAL_WAIT;
        let (mut here, mut elsewhere) = stranded();
        let stranding = |here: &Vec<_>, elsewhere: &Vec<_>| !here.is_empty() || !elsewhere.is_empty();
        while stranding(&here, &elsewhere) && !strand && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            (here, elsewhere) = stranded();
        }
        if !stranding(&here, &elsewhere) {
            return Ok(());
        }
        const NAMED: usize = 10;
        let mut names: Vec<String> = here
            .iter()
            .take(NAMED)
            .map(|s| format!("{}/{} ({})", s.bot, s.instance, s.address))
            .collect();
        if here.len() > NAMED {
            names.push(format!("and {} more", here.len() - NAMED));
        }
        names.extend(elsewhere.iter().map(|(replica, n)| format!("{n} on replica {replica}")));
        let total = here.len() as u64 + elsewhere.iter().map(|(_, n)| n).sum::<u64>();
        let count = match total {
            1 => "1 connected agent still holds".to_owned(),
            n => format!("{n} connected agents still hold"),
        };
        if strand {
            tracing::warn!(agents = total, names = %names.join(", "),
                "retiring the CA now although connected agents hold bot certificates it signed (--strand): they are refused from now on");
            return Ok(());
        }
        Err(Status::failed_precondition(format!(
            "{count} a bot certificate of the CA this would withdraw, and did not renew onto the active CA \
             within {}s: {}. Withdrawing it now would refuse them (a `token` agent then needs a new token). \
             Wait until they renew (see `tbotctl status`, column CA), or pass --strand to withdraw it anyway",
            RENEWAL_WAIT.as_secs(),
            names.join(", ")
        )))
    }
}
