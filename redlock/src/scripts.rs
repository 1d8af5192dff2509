//! The Lua scripts that run on every node.
//!
//! Each script lives in its own `.lua` file whose header names KEYS, ARGV and the return
//! value. [`redis::Script`] runs them with EVALSHA and loads them on NOSCRIPT; every node
//! connection loads them all up front, so a round is one EVALSHA per node.

use std::sync::LazyLock;

use redis::Script;

pub(crate) static ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/acquire.lua")));
pub(crate) static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/release.lua")));
pub(crate) static EXTEND: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/extend.lua")));
pub(crate) static HANDOFF: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/handoff.lua")));
pub(crate) static FENCE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/fence.lua")));
pub(crate) static SEED: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/seed.lua")));

/// The per-node key holding its restart state: when it may vote, and whether its fence
/// counters have been seeded.
pub(crate) const NODE_KEY: &str = "fencelock:node";

/// The prefix of fence counter keys; the resource name follows, in braces so that a
/// counter lands in the same Redis Cluster slot as its lock.
pub(crate) const FENCE_PREFIX: &str = "fencelock:fence:";

/// The fence counter key of `resource`.
pub(crate) fn fence_key(resource: &str) -> String {
    format!("{FENCE_PREFIX}{{{resource}}}")
}

/// Every script, for loading when a connection opens.
pub(crate) fn all() -> [&'static Script; 6] {
    [&ACQUIRE, &RELEASE, &EXTEND, &HANDOFF, &FENCE, &SEED]
}
