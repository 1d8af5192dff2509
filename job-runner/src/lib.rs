//! A lock-guarded job runner built on [`fencelock`].
//!
//! This crate is a placeholder for the runner; the lock crate it builds on lives in
//! `redlock/`.

pub use fencelock;
