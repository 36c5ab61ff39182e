//! The REST API (axum).
