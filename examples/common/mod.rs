//! Shared by the examples: where the lock nodes are.

/// Lock node URLs from `FENCELOCK_NODES` (comma-separated), or the three nodes that
/// `scripts/demo.sh` starts on 127.0.0.1:7001-7003.
pub(crate) fn node_urls() -> Vec<String> {
    std::env::var("FENCELOCK_NODES")
        .unwrap_or_else(|_| {
            "redis://127.0.0.1:7001,redis://127.0.0.1:7002,redis://127.0.0.1:7003".into()
        })
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}
