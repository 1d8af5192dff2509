//! The Lua scripts that run on every node.
//!
//! Each script lives in its own `.lua` file whose header names KEYS, ARGV and the return
//! value. [`redis::Script`] runs them with EVALSHA; every node connection loads them all up
//! front, and again on NOSCRIPT. A node's driver sends one operation as its own script and
//! several queued at once as one [`BATCH`], so a round is one EVALSHA per node and
//! concurrent rounds share theirs.

use std::sync::LazyLock;

use redis::Script;

pub(crate) static ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{PRELUDE}{}", SOURCES[0])));
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(SOURCES[1]));
pub(crate) static EXTEND: LazyLock<Script> = LazyLock::new(|| Script::new(SOURCES[2]));
pub(crate) static HANDOFF: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{PRELUDE}{}", SOURCES[3])));
pub(crate) static FENCE: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{PRELUDE}{}", SOURCES[4])));
pub(crate) static SEED: LazyLock<Script> = LazyLock::new(|| Script::new(SOURCES[5]));
pub(crate) static INIT: LazyLock<Script> = LazyLock::new(|| Script::new(SOURCES[6]));
pub(crate) static VERIFY: LazyLock<Script> = LazyLock::new(|| Script::new(SOURCES[7]));
pub(crate) static GENESIS: LazyLock<Script> = LazyLock::new(|| Script::new(SOURCES[8]));

/// Every other script as a function of one script, which runs a batch of them in one
/// EVALSHA: a node's driver sends everything queued for the node as one command.
///
/// KEYS: every operation's keys, in order. ARGV[1]: the number of operations; then per
/// operation its script's number (1-based, in the order of [`all`]), its key count, its
/// argument count, and its arguments. Returns one reply per operation: the script's
/// integer, or a string with the error an operation raised (an error in one operation
/// does not stop the others; like a script of its own, it keeps the writes made before it).
pub(crate) static BATCH: LazyLock<Script> = LazyLock::new(|| Script::new(&batch_source()));

fn batch_source() -> String {
    let mut lua = format!("-- fencelock: batch\n{PRELUDE}local scripts = {{}}\n");
    for (i, body) in SOURCES.iter().enumerate() {
        // KEYS and ARGV as parameters shadow the globals, so each body runs unchanged.
        lua.push_str(&format!(
            "scripts[{}] = function(KEYS, ARGV)\n{body}\nend\n",
            i + 1
        ));
    }
    lua.push_str(include_str!("scripts/batch.lua"));
    lua
}

/// Declared before the acquire, hand-off and fence scripts' bodies, on their own and once
/// per batch: what they share.
const PRELUDE: &str = include_str!("scripts/prelude.lua");

/// The scripts' sources, in the order of [`all`].
const SOURCES: [&str; 9] = [
    include_str!("scripts/acquire.lua"),
    include_str!("scripts/release.lua"),
    include_str!("scripts/extend.lua"),
    include_str!("scripts/handoff.lua"),
    include_str!("scripts/fence.lua"),
    include_str!("scripts/seed.lua"),
    include_str!("scripts/init.lua"),
    include_str!("scripts/verify.lua"),
    include_str!("scripts/genesis.lua"),
];

/// The number [`BATCH`] knows `script` by.
#[cfg(test)]
pub(crate) fn number(script: &Script) -> usize {
    all()
        .iter()
        .position(|s| s.get_hash() == script.get_hash())
        .expect("every script is one of `all()`")
        + 1
}

/// The per-node key holding its restart state: when it may vote, and whether its fence
/// counters have been seeded.
pub(crate) const NODE_KEY: &str = "fencelock:node";

/// The prefix of every key fencelock keeps on a node for itself; a resource may not start
/// with it.
pub(crate) const RESERVED_PREFIX: &str = "fencelock:";

/// The prefix of fence counter keys; the resource name follows, in braces so that a
/// counter lands in the same Redis Cluster slot as its lock. The node's high-water mark and
/// floor share the prefix (without braces, so no resource's counter is ever named like
/// them): a seeding that reads every key under it reads them too, that of an older client
/// included.
pub(crate) const FENCE_PREFIX: &str = "fencelock:fence:";

/// The node's high-water mark: at least every value a fence counter with a TTL ever had on
/// the node. A resource whose counter expired is known by it.
pub(crate) const HIGH_KEY: &str = "fencelock:fence:high";

/// The node's floor: its high-water mark when it was last seeded. A counter below it (kept
/// from an older copy of the node's data) counts as the floor.
pub(crate) const FLOOR_KEY: &str = "fencelock:fence:floor";

/// The fence counter key of `resource`.
pub(crate) fn fence_key(resource: &str) -> String {
    format!("{FENCE_PREFIX}{{{resource}}}")
}

/// Every script but [`BATCH`], in the order [`BATCH`] numbers them.
#[cfg(test)]
pub(crate) fn all() -> [&'static Script; 9] {
    [
        &ACQUIRE, &RELEASE, &EXTEND, &HANDOFF, &FENCE, &SEED, &INIT, &VERIFY, &GENESIS,
    ]
}

/// Every script, for loading when a connection opens.
pub(crate) fn to_load() -> [&'static Script; 10] {
    [
        &ACQUIRE, &RELEASE, &EXTEND, &HANDOFF, &FENCE, &SEED, &INIT, &VERIFY, &GENESIS, &BATCH,
    ]
}
