//! The fault catalog of `ferry chaos` and the seeded schedule: which
//! faults a round injects, drawn from a seeded generator so that the same
//! seed (with the same `ferry` build) replays the same campaign.

use std::fmt;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Which region a fault hits, resolved when it is injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Primary,
    Standby,
}

/// Which JobManager.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JmPick {
    Leader,
    Standby,
}

/// How a process is hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hit {
    /// SIGKILL; restarted at heal.
    Kill,
    /// SIGTERM (a graceful stop); restarted at heal.
    Term,
    /// SIGSTOP; SIGCONT at heal.
    Freeze,
}

/// A link to cut or slow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// The leader JobManager ↔ its region's NATS cluster.
    JmNats,
    /// JobManagers → one TaskManager (its gRPC).
    JmTm,
    /// Every process of a region ↔ the global cluster.
    RegionGlobal,
    /// The leader JobManager ↔ the S3 store.
    JmStore,
    /// TaskManager ↔ TaskManager: every exchange connection of the region
    /// (records of jobs spread over both TaskManagers).
    TmTm,
}

/// What the S3 store does wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreFault {
    /// `503 SlowDown` to everything.
    Unavailable,
    /// Accepts connections, never answers (black hole).
    Timeouts,
    /// Every answer 2 s late.
    Slow,
    /// Every connection reset, new ones refused.
    Resets,
    /// `403 AccessDenied` to writes.
    RefusesWrites,
}

/// One fault of the catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    JobManager(Side, JmPick, Hit),
    TaskManager(Side, usize, Hit),
    /// A node of a region's NATS cluster killed (restarted at heal).
    RegionNats(Side, usize),
    /// A node of the global cluster killed (restarted at heal).
    GlobalNats(usize),
    /// A region's whole NATS cluster restarted with empty storage (a lost
    /// volume): coordination data loss.
    CoordinationLoss(Side),
    /// A link cut (black-holed) or slowed by 300 ms per chunk.
    Link(LinkKind, Side, bool),
    Store(StoreFault),
    /// West's file store full (a ballast file fills its tmpfs).
    StoreFull,
    /// A TaskManager drained under load (`ferry taskmanager drain`): its
    /// jobs move away by savepoint; the drain is cancelled at heal.
    Drain(Side, usize),
    /// Every JobManager and TaskManager of the primary region SIGKILLed;
    /// restarted at heal (they rejoin as the standby).
    RegionOutage,
    /// A planned switchover to the standby region.
    Switchover,
    /// Fail-back to the home region after it was failed away from (a
    /// switchover home otherwise).
    Failback,
}

impl Fault {
    /// The fault's kind, for the summary (no targets).
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::JobManager(_, JmPick::Leader, Hit::Kill) => "leader JM SIGKILL",
            Fault::JobManager(_, JmPick::Leader, Hit::Term) => "leader JM SIGTERM",
            Fault::JobManager(_, JmPick::Leader, Hit::Freeze) => "leader JM SIGSTOP",
            Fault::JobManager(_, JmPick::Standby, _) => "standby JM kill/stop",
            Fault::TaskManager(_, _, Hit::Kill) => "TM SIGKILL",
            Fault::TaskManager(_, _, Hit::Term) => "TM SIGTERM",
            Fault::TaskManager(_, _, Hit::Freeze) => "TM SIGSTOP",
            Fault::RegionNats(..) => "regional NATS node killed",
            Fault::GlobalNats(_) => "global NATS node killed",
            Fault::CoordinationLoss(_) => "coordination data loss",
            Fault::Link(LinkKind::JmNats, _, false) => "JM↔NATS cut",
            Fault::Link(LinkKind::JmNats, _, true) => "JM↔NATS slow",
            Fault::Link(LinkKind::JmTm, _, false) => "JM↔TM cut",
            Fault::Link(LinkKind::JmTm, _, true) => "JM↔TM slow",
            Fault::Link(LinkKind::RegionGlobal, _, false) => "region↔global cut",
            Fault::Link(LinkKind::RegionGlobal, _, true) => "region↔global slow",
            Fault::Link(LinkKind::JmStore, _, false) => "JM↔store cut",
            Fault::Link(LinkKind::JmStore, _, true) => "JM↔store slow",
            Fault::Link(LinkKind::TmTm, _, false) => "TM↔TM exchange cut",
            Fault::Link(LinkKind::TmTm, _, true) => "TM↔TM exchange slow",
            Fault::Drain(..) => "TM drain",
            Fault::Store(StoreFault::Unavailable) => "store 503",
            Fault::Store(StoreFault::Timeouts) => "store timeouts",
            Fault::Store(StoreFault::Slow) => "store slow",
            Fault::Store(StoreFault::Resets) => "store resets",
            Fault::Store(StoreFault::RefusesWrites) => "store refuses writes",
            Fault::StoreFull => "store full",
            Fault::RegionOutage => "region outage",
            Fault::Switchover => "planned switchover",
            Fault::Failback => "fail-back",
        }
    }

    /// The kind as a command-line word: lowercase, words joined by `-`
    /// (`leader-jm-sigkill`, `jm-nats-cut`, `store-503`).
    pub fn slug(&self) -> String {
        slug(self.kind())
    }

    /// Whether the fault may redeploy tasks, given whether the region it
    /// hits (or, for a store, the region whose store it is) is the
    /// primary. A JobManager failover adopts running tasks, and nothing
    /// that happens to the standby region touches the primary's tasks: a
    /// round of only such faults must add no deployment. One NATS node of
    /// three may: when it led the coordination KV's stream, the KV takes no
    /// writes until the survivors elect a leader (several seconds of NATS
    /// Raft election), no JobManager can hold the region's lease meanwhile,
    /// and the TaskManagers' region fence runs out.
    pub fn may_redeploy(&self, hits_primary: bool) -> bool {
        match self {
            Fault::JobManager(..) => false,
            Fault::Link(LinkKind::JmNats, ..) => false,
            Fault::TaskManager(..)
            | Fault::RegionNats(..)
            | Fault::CoordinationLoss(_)
            | Fault::Link(..)
            | Fault::Store(_)
            | Fault::StoreFull
            | Fault::Drain(..) => hits_primary,
            Fault::GlobalNats(_) | Fault::RegionOutage | Fault::Switchover | Fault::Failback => {
                true
            }
        }
    }

    /// Draws one fault of the first catalog (its draws never change, so
    /// that a seed replays what it always did).
    fn draw(rng: &mut StdRng) -> Fault {
        let hit = |rng: &mut StdRng| match rng.random_range(0..3) {
            0 => Hit::Kill,
            1 => Hit::Term,
            _ => Hit::Freeze,
        };
        {
            match rng.random_range(0..14) {
                0 | 1 => Fault::JobManager(side(rng), JmPick::Leader, hit(rng)),
                2 => Fault::JobManager(side(rng), JmPick::Standby, hit(rng)),
                3 => Fault::TaskManager(side(rng), rng.random_range(0..2), hit(rng)),
                4 => Fault::RegionNats(side(rng), rng.random_range(0..3)),
                5 => Fault::GlobalNats(rng.random_range(0..3)),
                6 => Fault::CoordinationLoss(side(rng)),
                7 | 8 => {
                    let kind = match rng.random_range(0..4) {
                        0 => LinkKind::JmNats,
                        1 => LinkKind::JmTm,
                        2 => LinkKind::RegionGlobal,
                        _ => LinkKind::JmStore,
                    };
                    Fault::Link(kind, side(rng), rng.random_bool(0.3))
                }
                9 | 10 => Fault::Store(match rng.random_range(0..5) {
                    0 => StoreFault::Unavailable,
                    1 => StoreFault::Timeouts,
                    2 => StoreFault::Slow,
                    3 => StoreFault::Resets,
                    _ => StoreFault::RefusesWrites,
                }),
                11 => Fault::StoreFull,
                12 => Fault::RegionOutage,
                _ => {
                    if rng.random_bool(0.5) {
                        Fault::Switchover
                    } else {
                        Fault::Failback
                    }
                }
            }
        }
    }
}

/// Primary (70 %) or standby.
fn side(rng: &mut StdRng) -> Side {
    if rng.random_bool(0.7) {
        Side::Primary
    } else {
        Side::Standby
    }
}

impl Fault {
    /// Draws one fault of the catalog's extension: the exchange between
    /// TaskManagers cut or slowed, or a TaskManager drained.
    fn draw_extension(rng: &mut StdRng) -> Fault {
        match rng.random_range(0..3) {
            0 => Fault::Link(LinkKind::TmTm, side(rng), false),
            1 => Fault::Link(LinkKind::TmTm, side(rng), true),
            _ => Fault::Drain(side(rng), rng.random_range(0..super::world::TASKMANAGERS)),
        }
    }
}

fn hit_word(h: &Hit) -> &'static str {
    match h {
        Hit::Kill => "SIGKILL",
        Hit::Term => "SIGTERM",
        Hit::Freeze => "SIGSTOP",
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = |s: &Side| match s {
            Side::Primary => "primary",
            Side::Standby => "standby",
        };
        match self {
            Fault::JobManager(s, p, h) => write!(
                f,
                "{} {} JobManager of the {} region",
                hit_word(h),
                match p {
                    JmPick::Leader => "the leading",
                    JmPick::Standby => "a standby",
                },
                side(s)
            ),
            Fault::TaskManager(s, i, h) => {
                write!(
                    f,
                    "{} TaskManager {i} of the {} region",
                    hit_word(h),
                    side(s)
                )
            }
            Fault::RegionNats(s, n) => write!(f, "kill NATS node {n} of the {} region", side(s)),
            Fault::GlobalNats(n) => write!(f, "kill global NATS node {n}"),
            Fault::CoordinationLoss(s) => write!(
                f,
                "restart the {} region's NATS cluster with empty storage",
                side(s)
            ),
            Fault::Link(k, s, slow) => write!(
                f,
                "{} {} of the {} region",
                if *slow { "slow" } else { "cut" },
                match k {
                    LinkKind::JmNats => "leader JM ↔ NATS",
                    LinkKind::JmTm => "JMs → TaskManager 0",
                    LinkKind::RegionGlobal => "every process ↔ global cluster",
                    LinkKind::JmStore => "leader JM ↔ S3 store",
                    LinkKind::TmTm => "TaskManager ↔ TaskManager exchange",
                },
                side(s)
            ),
            Fault::Store(s) => write!(f, "S3 store: {}", self.kind().trim_start_matches("store "))
                .and(match s {
                    StoreFault::Slow => write!(f, " (2 s per request)"),
                    _ => Ok(()),
                }),
            Fault::StoreFull => write!(f, "fill west's file store"),
            Fault::Drain(s, i) => write!(f, "drain TaskManager {i} of the {} region", side(s)),
            Fault::RegionOutage => write!(
                f,
                "kill every JobManager and TaskManager of the primary region"
            ),
            Fault::Switchover => write!(f, "planned switchover to the standby region"),
            Fault::Failback => write!(f, "fail back to the home region"),
        }
    }
}

/// `kind` as a command-line word.
pub fn slug(kind: &str) -> String {
    let mut out = String::new();
    for c in kind.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// Every kind of the catalog, as command-line words.
pub fn all_slugs() -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(0);
    let mut kinds = std::collections::BTreeSet::new();
    for _ in 0..5_000 {
        kinds.insert(Fault::draw(&mut rng).slug());
        kinds.insert(Fault::draw_extension(&mut rng).slug());
    }
    kinds.into_iter().collect()
}

/// Seeds the extension's own stream: `seed` with this mixed in.
const EXTENSION_STREAM: u64 = 0x6578_7465_6e64_0001;
/// A round gets one fault of the extension with this probability.
const EXTENSION_PER_ROUND: f64 = 0.35;

/// One round's plan: its faults, each injected `at` after the round's
/// start, all healed after `hold`.
#[derive(Clone, Debug)]
pub struct Plan {
    pub faults: Vec<(Duration, Fault)>,
    pub hold: Duration,
}

/// The seeded schedule. Faults added to the catalog after the first are
/// drawn from a stream of their own (`extra`) and join rounds on top of
/// the first catalog's draws, so every seed still injects the faults it
/// always did at the same moments — seeds named in findings and in CI keep
/// replaying their scenarios — and gains the new ones besides.
pub struct Schedule {
    rng: StdRng,
    extra: StdRng,
    /// Only these kinds (slugs), if given.
    only: Option<Vec<String>>,
}

impl Schedule {
    /// `only`: draw only faults of these kinds ([`Fault::slug`]); they
    /// must be of the catalog ([`all_slugs`]). The schedule depends on
    /// nothing else, so a seed replays the same faults on any machine.
    pub fn new(seed: u64, only: Option<Vec<String>>) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            extra: StdRng::seed_from_u64(seed ^ EXTENSION_STREAM),
            only,
        }
    }

    fn draw(&mut self) -> Fault {
        let Some(only) = &self.only else {
            return Fault::draw(&mut self.rng);
        };
        // Filtered: from the whole catalog, the extension as often as its
        // share of the kinds (3 of the 30 that `all_slugs` lists; the
        // schedule's test checks that count).
        let share = 3.0 / 30.0;
        loop {
            let f = if self.rng.random_bool(share) {
                Fault::draw_extension(&mut self.rng)
            } else {
                Fault::draw(&mut self.rng)
            };
            if only.contains(&f.slug()) {
                return f;
            }
        }
    }

    /// The next round: 1–3 faults within its first 3 s, held 4–10 s.
    pub fn next_round(&mut self) -> Plan {
        let n = self.rng.random_range(1..=3);
        let mut faults: Vec<(Duration, Fault)> = (0..n)
            .map(|_| {
                let at = Duration::from_millis(self.rng.random_range(0..3_000));
                (at, self.draw())
            })
            .collect();
        let hold = Duration::from_millis(self.rng.random_range(4_000..10_000));
        if self.only.is_none() && self.extra.random_bool(EXTENSION_PER_ROUND) {
            let at = Duration::from_millis(self.extra.random_range(0..3_000));
            faults.push((at, Fault::draw_extension(&mut self.extra)));
        }
        faults.sort_by_key(|(at, _)| *at);
        Plan { faults, hold }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_the_same_schedule_and_covers_the_catalog() {
        let plans = |seed| {
            let mut s = Schedule::new(seed, None);
            (0..200).map(|_| s.next_round()).collect::<Vec<_>>()
        };
        let (a, b) = (plans(7), plans(7));
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.faults, y.faults);
            assert_eq!(x.hold, y.hold);
        }
        assert_ne!(
            a.iter().map(|p| p.faults.clone()).collect::<Vec<_>>(),
            plans(8)
                .iter()
                .map(|p| p.faults.clone())
                .collect::<Vec<_>>()
        );
        let kinds: std::collections::BTreeSet<&str> = a
            .iter()
            .flat_map(|p| p.faults.iter().map(|(_, f)| f.kind()))
            .collect();
        // 200 rounds draw every kind of the catalog.
        assert!(kinds.len() >= 25, "{kinds:?}");
        assert!(a.iter().all(|p| (1..=4).contains(&p.faults.len())));
        // The extension joins some rounds, on top of the first catalog's
        // faults: without it a schedule is what it was before.
        let first: Vec<Vec<(Duration, Fault)>> = a
            .iter()
            .map(|p| {
                p.faults
                    .iter()
                    .filter(|(_, f)| {
                        !matches!(f, Fault::Drain(..) | Fault::Link(LinkKind::TmTm, ..))
                    })
                    .cloned()
                    .collect()
            })
            .collect();
        assert!(first.iter().all(|f| (1..=3).contains(&f.len())));
        let extended = a
            .iter()
            .zip(&first)
            .filter(|(p, f)| p.faults.len() > f.len())
            .count();
        assert!(
            (40..=100).contains(&extended),
            "{extended} of 200 rounds extended"
        );
        let mut seed1 = Schedule::new(1, None);
        let round1: Vec<Fault> = seed1.next_round().faults.iter().map(|(_, f)| *f).collect();
        assert!(
            round1.contains(&Fault::JobManager(
                Side::Primary,
                JmPick::Standby,
                Hit::Term
            )) && round1.contains(&Fault::GlobalNats(2))
                && round1.contains(&Fault::Store(StoreFault::Unavailable)),
            "seed 1 no longer replays its first round: {round1:?}"
        );
        let mut only = Schedule::new(7, Some(vec!["store-503".into(), "region-outage".into()]));
        for _ in 0..50 {
            for (_, f) in only.next_round().faults {
                assert!(
                    matches!(
                        f,
                        Fault::RegionOutage | Fault::Store(StoreFault::Unavailable)
                    ),
                    "{f}"
                );
            }
        }
        assert!(
            all_slugs().contains(&"jm-nats-cut".to_string()),
            "{:?}",
            all_slugs()
        );
        for new in ["tm-tm-exchange-cut", "tm-tm-exchange-slow", "tm-drain"] {
            assert!(all_slugs().contains(&new.to_string()), "{:?}", all_slugs());
        }
        assert_eq!(all_slugs().len(), 30, "{:?}", all_slugs());
    }
}
