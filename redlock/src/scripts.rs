//! The Lua scripts that run on every node.
//!
//! Each script lives in its own `.lua` file whose header names KEYS, ARGV and the return
//! value. [`redis::Script`] runs them with EVALSHA and loads them on NOSCRIPT, so a node
//! that restarted (and lost its script cache) costs one extra round trip, once.

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
