//! `ferry cluster status`: the region's HA state from any JobManager's
//! `/v1/cluster` — this instance's role, the leader and its epoch, and every
//! member with its heartbeat age.

use std::fmt::Write as _;
use std::process::ExitCode;

use ferry_core::api::HaHealth;

use super::job::{ApiArgs, client, show};

#[derive(clap::Subcommand, Debug)]
pub enum ClusterCommand {
    /// Show the leader, its epoch and every member with its heartbeat age.
    Status {
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub fn run(c: ClusterCommand) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match c {
            ClusterCommand::Status { api } => {
                let call = client(&api)?.cluster().await;
                Ok(show(api.output, call, print_status))
            }
        }
    })
}

fn print_status(h: &HaHealth, out: &mut String) {
    let region = h.region.as_deref().unwrap_or("(embedded)");
    let _ = writeln!(out, "region:   {region}");
    match &h.leader {
        Some(l) if !l.url.is_empty() => {
            let _ = writeln!(
                out,
                "leader:   {} at {} (epoch {})",
                l.instance, l.url, l.epoch
            );
        }
        Some(l) => {
            let _ = writeln!(out, "leader:   {} (embedded, no election)", l.instance);
        }
        None => {
            let _ = writeln!(
                out,
                "leader:   none known (an election is under way or NATS is unreachable)"
            );
        }
    }
    let _ = writeln!(
        out,
        "answered: {} ({:?}); {} leader change(s) seen, {} heartbeat failure(s)",
        h.instance, h.role, h.leader_changes, h.heartbeat_failures
    )
    .map(|_| ());
    if !h.backend_reachable {
        let _ = writeln!(
            out,
            "warning:  this instance cannot read the coordination store (NATS)"
        );
    }
    let _ = writeln!(
        out,
        "members:  {} healthy of {} known",
        h.healthy_members, h.total_members
    );
    if !h.members.is_empty() {
        let _ = writeln!(
            out,
            "  {:<24} {:<12} {:<10} {:>10}  ADDRESS",
            "ID", "ROLE", "LEADER", "HEARTBEAT"
        );
        for m in &h.members {
            let leads = h.leader.as_ref().is_some_and(|l| l.instance == m.member.id);
            let _ = writeln!(
                out,
                "  {:<24} {:<12} {:<10} {:>8}ms  {}",
                m.member.id,
                m.member.role,
                if leads { "yes" } else { "" },
                m.heartbeat_age_ms,
                m.member.address
            );
        }
    }
}
