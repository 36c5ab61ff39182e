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
