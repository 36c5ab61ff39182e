//! Who replaces a silent primary: a pure decision, apart from the I/O that
//! acts on it (the standby state of the coordinator calls it every tick).

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_core::api::RegionView;

/// What a standby region's leader does about the primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Takeover {
    /// The primary renews its lease (or only just went quiet).
    Wait,
    /// A failover drill names another standby as the one to take over.
    StandAside(String),
    /// The primary is silent, but this healthy standby holds newer
    /// verified checkpoints and goes first.
    Defer(String),
    /// Take the region lease.
    Claim,
}

/// What the decision looks at.
#[derive(Clone, Debug)]
pub struct Situation<'a> {
    /// This (standby) region.
    pub me: &'a str,
    /// The primary the lease names (`None`: the record is unreadable).
    pub primary: Option<&'a str>,
    /// How long the lease's revision has not changed, on this clock.
    pub lease_silent_for: Duration,
    /// Every region's health, on this clock.
    pub views: &'a [RegionView],
    /// This region's newest restore-verified checkpoint per job.
    pub my_verified: &'a BTreeMap<String, u64>,
    pub timeout: Duration,
    /// The standby an ongoing failover drill wants to take over.
    pub drill_target: Option<&'a str>,
}

/// Rank of a region by its newest verified checkpoints: the sum over jobs
/// (checkpoint numbers of one job are shared by every region's copies).
pub fn score(verified: &BTreeMap<String, u64>) -> u64 {
    verified.values().sum()
}

/// Decides whether `me`, a standby, takes over. The primary is silent when
/// the lease has not been renewed for the whole `timeout`. A drill's target
/// claims at once and every other standby stands aside for it. Otherwise,
/// of several standbys the healthy one with the newest verified
/// checkpoints (ties: the smaller region name) goes first; the others step
/// in only once the primary has been silent for twice the timeout.
pub fn decide(s: &Situation<'_>) -> Takeover {
    if s.lease_silent_for <= s.timeout {
        return Takeover::Wait;
    }
    match s.drill_target {
        Some(t) if t == s.me => return Takeover::Claim,
        Some(t) => return Takeover::StandAside(t.to_string()),
        None => {}
    }
    use std::cmp::Reverse;
    let mine = (score(s.my_verified), Reverse(s.me));
    let better = s.views.iter().find(|v| {
        v.region != s.me
            && Some(v.region.as_str()) != s.primary
            && v.healthy
            && v.heartbeat
                .as_ref()
                .is_some_and(|h| (score(&h.verified), Reverse(v.region.as_str())) > mine)
    });
    match better {
        Some(b) if s.lease_silent_for < s.timeout * 2 => Takeover::Defer(b.region.clone()),
        _ => Takeover::Claim,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::api::RegionHeartbeat;

    fn view(region: &str, healthy: bool, verified: &[(&str, u64)]) -> RegionView {
        RegionView {
            region: region.into(),
            healthy,
            heartbeat_age_ms: Some(if healthy { 100 } else { 9_000 }),
            heartbeat: Some(RegionHeartbeat {
                region: region.into(),
                verified: verified.iter().map(|(j, n)| (j.to_string(), *n)).collect(),
                ..Default::default()
            }),
        }
    }

    fn situation<'a>(
        me: &'a str,
        silent: Duration,
        views: &'a [RegionView],
        mine: &'a BTreeMap<String, u64>,
    ) -> Situation<'a> {
        Situation {
            me,
            primary: Some("east"),
            lease_silent_for: silent,
            views,
            my_verified: mine,
            timeout: Duration::from_secs(5),
            drill_target: None,
        }
    }

    #[test]
    fn the_standby_with_the_newest_verified_checkpoints_takes_over_first() {
        let s6 = Duration::from_secs(6);
        let mine: BTreeMap<String, u64> = [("job".to_string(), 7)].into();
        // The lease is renewed: wait, however the heartbeats look.
        let views = [view("east", false, &[]), view("west", true, &[("job", 9)])];
        assert_eq!(
            decide(&situation("south", Duration::from_secs(5), &views, &mine)),
            Takeover::Wait
        );
        // Silent, no other standby: claim.
        let alone = [view("east", false, &[])];
        assert_eq!(
            decide(&situation("south", s6, &alone, &mine)),
            Takeover::Claim
        );
        // West verified checkpoint 9, this region only 7: west goes first,
        assert_eq!(
            decide(&situation("south", s6, &views, &mine)),
            Takeover::Defer("west".into())
        );
        // and west itself claims.
        let west_view = [view("east", false, &[]), view("south", true, &[("job", 7)])];
        let west_has: BTreeMap<String, u64> = [("job".to_string(), 9)].into();
        assert_eq!(
            decide(&situation("west", s6, &west_view, &west_has)),
            Takeover::Claim
        );
        // When west does not within another timeout, this region steps in.
        assert_eq!(
            decide(&situation("south", Duration::from_secs(10), &views, &mine)),
            Takeover::Claim
        );
        // An unhealthy better standby does not count.
        let down = [view("east", false, &[]), view("west", false, &[("job", 9)])];
        assert_eq!(
            decide(&situation("south", s6, &down, &mine)),
            Takeover::Claim
        );
        // Ties go to the smaller name.
        let tie = [view("east", false, &[]), view("north", true, &[("job", 7)])];
        assert_eq!(
            decide(&situation("south", s6, &tie, &mine)),
            Takeover::Defer("north".into())
        );
        let tie2 = [view("east", false, &[]), view("south", true, &[("job", 7)])];
        assert_eq!(
            decide(&situation("north", s6, &tie2, &mine)),
            Takeover::Claim
        );
    }

    #[test]
    fn a_drill_target_claims_and_every_other_standby_stands_aside() {
        let s6 = Duration::from_secs(6);
        let mine: BTreeMap<String, u64> = [("job".to_string(), 9)].into();
        // South would win the ranking, but the drill names west.
        let views = [view("east", false, &[]), view("west", true, &[("job", 1)])];
        let mut s = situation("south", s6, &views, &mine);
        s.drill_target = Some("west");
        assert_eq!(decide(&s), Takeover::StandAside("west".into()));
        // Even after twice the timeout: the drill's hold is bounded by the
        // drill itself, not by the ranking.
        s.lease_silent_for = Duration::from_secs(30);
        assert_eq!(decide(&s), Takeover::StandAside("west".into()));
        let views = [view("east", false, &[]), view("south", true, &[("job", 9)])];
        let few: BTreeMap<String, u64> = [("job".to_string(), 1)].into();
        let mut w = situation("west", s6, &views, &few);
        w.drill_target = Some("west");
        assert_eq!(decide(&w), Takeover::Claim);
        // But not before the primary is silent.
        w.lease_silent_for = Duration::from_secs(1);
        assert_eq!(decide(&w), Takeover::Wait);
    }

    #[test]
    fn an_unreadable_lease_is_claimed_like_a_silent_one() {
        let mine = BTreeMap::new();
        let views = [];
        let mut s = situation("west", Duration::from_secs(6), &views, &mine);
        s.primary = None;
        assert_eq!(decide(&s), Takeover::Claim);
    }
}
