//! `Demoting`: the lease names another region (or nobody known): every
//! job stops here and its tasks are cancelled — not left running for a
//! next leader — then the region stands by.

use crate::coordinator::Coordinator;
use crate::role::Role;

pub async fn step(c: &Coordinator, to: Option<String>) -> Role {
    c.jobs.stand_by(to.as_deref()).await;
    Role::Standby { primary: to }
}
