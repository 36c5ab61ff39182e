//! Restart strategies.
