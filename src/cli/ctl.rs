//! `dinomo ctl`: operate a running cluster through its manager.

use clap::{Args, Subcommand};
use dinomo::ctl::CtlCommand;

use super::secret::SecretArgs;

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  dinomo ctl status                      KNs (slots, lease, load), map epoch, recent reconfigurations
  dinomo ctl add-kn                      the manager starts a new KN; slots move to it
  dinomo ctl remove-kn 2                 KN 2 merges its logs, leaves, its slots move
  dinomo ctl rebalance                   recompute the map over the live KNs
  dinomo ctl rebalance --slots 0-99 --to 1
  dinomo ctl replicate user:42           every KN serves user:42 (reads and writes) through its cell
  dinomo ctl dereplicate user:42         user:42 goes back to its owner alone

Reconfigurations show: slots moved, SETTLE_MS (publish to settled: how long moving slots
were refused), RELEASE_MS (the slowest old owner's flush + merge), MERGED (log entries merged).
Exit code 0 on success, 1 when the manager is unreachable or refuses (e.g. unknown KN).")]
pub(crate) struct CtlArgs {
    /// Manager address.
    #[arg(long, default_value = "127.0.0.1:7000", global = true)]
    manager: String,
    /// Print the manager's reply as JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    secret: SecretArgs,
    #[command(subcommand)]
    command: CtlSub,
}

#[derive(Subcommand, Debug)]
enum CtlSub {
    /// KNs, the map, and the recent reconfigurations with their measurements.
    Status,
    /// Start a new KN (the manager spawns it) and move slots to it.
    AddKn,
    /// Drain KN `ID`: it merges its logs and leaves; its slots move to the others.
    RemoveKn {
        /// KN id (see `status`).
        id: u16,
    },
    /// Recompute the map over the live KNs, or move one slot range to one KN.
    Rebalance {
        /// Slot range FIRST-LAST to move (needs --to).
        #[arg(long, value_parser = dinomo::ctl::parse_slot_range, requires = "to")]
        slots: Option<(u16, u16)>,
        /// KN to move --slots to.
        #[arg(long, requires = "slots")]
        to: Option<u16>,
    },
    /// Replicate KEY on every live KN: each then serves its reads and writes (through the
    /// key's cell at the DPM) instead of redirecting them to the key's owner.
    Replicate {
        /// The key (its bytes as given).
        key: String,
    },
    /// Return KEY to its owner alone (the other KNs redirect it again).
    Dereplicate {
        /// The key (its bytes as given).
        key: String,
    },
}

pub(crate) fn run(a: CtlArgs) -> anyhow::Result<()> {
    let cmd = match a.command {
        CtlSub::Status => CtlCommand::Status,
        CtlSub::AddKn => CtlCommand::AddKn,
        CtlSub::RemoveKn { id } => CtlCommand::RemoveKn(id),
        CtlSub::Rebalance { slots, to } => CtlCommand::Rebalance(slots.zip(to)),
        CtlSub::Replicate { key } => CtlCommand::Replicate(key.into_bytes()),
        CtlSub::Dereplicate { key } => CtlCommand::Dereplicate(key.into_bytes()),
    };
    let secret = a
        .secret
        .load_for("ctl", &[("--manager", a.manager.clone())])?;
    let out = dinomo::ctl::run(&a.manager, secret, &cmd, a.json)?;
    print!("{out}");
    Ok(())
}
