//! The core crate's error type. Messages name the path, URL or field involved
//! and say what to do about it.

use thiserror::Error;

/// Errors raised by the shared types: storage access, manifests, specs.
#[derive(Debug, Error)]
pub enum CoreError {
    #[error("invalid storage URL '{url}': {reason}")]
    StorageUrl { url: String, reason: String },

    #[error("cannot use storage '{url}': {reason}")]
    StorageAccess { url: String, reason: String },

    #[error("object store error at '{path}': {source}")]
    Store {
        path: String,
        #[source]
        source: object_store::Error,
    },

    #[error("'{path}' already exists (create-only write refused)")]
    AlreadyExists { path: String },

    #[error("corrupt checkpoint data at '{path}': {reason}")]
    Corrupt { path: String, reason: String },

    #[error("invalid job spec:\n{0}")]
    Spec(crate::spec::SpecErrors),

    #[error("{0}")]
    Other(String),
}

/// Result alias for the core crate.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;

/// What kind of trouble an object-store error is, for deciding whether to
/// wait and retry and for saying it plainly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreProblem {
    /// Network errors, timeouts, 5xx and throttling: the store may come
    /// back, so waiting and retrying is right.
    Unreachable,
    /// No space left (a full disk or volume, a quota).
    Full,
    /// The store answered and said no (permissions, credentials, an
    /// unsupported operation): retrying does not help until someone acts.
    Refused,
}

impl CoreError {
    /// The kind of store trouble this is, if it is an object-store error.
    pub fn store_problem(&self) -> Option<StoreProblem> {
        use object_store::Error as E;
        let CoreError::Store { source, .. } = self else {
            return None;
        };
        if is_full(source) {
            return Some(StoreProblem::Full);
        }
        match source {
            E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
            | E::NotSupported { .. }
            | E::NotImplemented { .. }
            | E::InvalidPath { .. }
            | E::UnknownConfigurationKey { .. } => Some(StoreProblem::Refused),
            E::NotFound { .. }
            | E::AlreadyExists { .. }
            | E::Precondition { .. }
            | E::NotModified { .. } => None,
            _ => Some(StoreProblem::Unreachable),
        }
    }

    /// True when retrying later may succeed (the store is unreachable).
    pub fn is_transient(&self) -> bool {
        self.store_problem() == Some(StoreProblem::Unreachable)
    }

    /// The error led by what it means for an operator.
    pub fn describe(&self) -> String {
        match self.store_problem() {
            Some(StoreProblem::Full) => format!("the store is full (no space left): {self}"),
            Some(StoreProblem::Refused) => format!("the store refused the request: {self}"),
            Some(StoreProblem::Unreachable) => format!("the store is unreachable: {self}"),
            None => self.to_string(),
        }
    }
}

/// Whether an object-store error comes from a full disk or a quota.
fn is_full(e: &object_store::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
        {
            return true;
        }
        let text = err.to_string();
        if text.contains("No space left on device")
            || text.contains("QuotaExceeded")
            || text.contains("XMinioStorageFull")
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The message of a caught panic (`&str` or `String` payloads; other
/// payloads have none).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(source: object_store::Error) -> CoreError {
        CoreError::Store {
            path: "x".into(),
            source,
        }
    }

    #[test]
    fn store_errors_are_classified_by_what_helps() {
        let full = store(object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(std::io::Error::from(std::io::ErrorKind::StorageFull)),
        });
        assert_eq!(full.store_problem(), Some(StoreProblem::Full));
        assert!(full.describe().starts_with("the store is full"));
        let down = store(object_store::Error::Generic {
            store: "S3",
            source: "error sending request: connection refused".into(),
        });
        assert!(down.is_transient());
        let denied = store(object_store::Error::PermissionDenied {
            path: "x".into(),
            source: "403".into(),
        });
        assert_eq!(denied.store_problem(), Some(StoreProblem::Refused));
        assert!(!denied.is_transient());
        assert_eq!(CoreError::Other("x".into()).store_problem(), None);
    }
}
