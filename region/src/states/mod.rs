//! One module per region role: each `step` takes the state's data, does
//! that state's I/O for one tick, and returns the next state (the
//! coordinator checks the transition). What each state does:
//!
//! | state | each tick |
//! |---|---|
//! | [`starting`] | read the lease: confirm it (renew) if it names this region, else stand by |
//! | [`standby`] | read the lease; take it over from a silent primary (or accept it moved here) |
//! | [`promoting`] | renew; start every job |
//! | [`primary`] | renew; restart the jobs after an in-region leader change; isolate when renewals fail for half the timeout |
//! | [`switching`] | renew while a planned switchover stops the jobs with savepoints |
//! | [`demoting`] | stop every job and cancel its tasks |
//! | [`isolated`] | retry the renewal; resume, or stand by for whoever holds the lease |
//! | [`dark`] | nothing, until a drill's outage ends |

pub mod dark;
pub mod demoting;
pub mod isolated;
pub mod primary;
pub mod promoting;
pub mod standby;
pub mod starting;
pub mod switching;
