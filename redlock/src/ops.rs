//! The contract with the Lua scripts, typed: what a node is held to, what its state says,
//! and the values that name an acquisition or a node's state.

use rand::Rng;

/// What the driver of a node holds every connection to before using it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NodePolicy {
    /// The quarantine a node found restarted with part of its data starts, in milliseconds.
    pub(crate) quarantine_ms: u64,
    /// Whether a node whose `maxmemory-policy` may evict keys is used anyway.
    pub(crate) allow_eviction: bool,
}

/// What a node's restart state says, as the seeding reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeState {
    /// Whether its fence counters were seeded in this life of its state.
    pub(crate) seeded: bool,
    /// The name of this life of its state; a seeding must carry it.
    pub(crate) nonce: Option<String>,
}

/// 128 bits from a CSPRNG (rand's thread-local ChaCha, seeded and reseeded from the
/// operating system), hex-encoded: unique per acquisition and opaque, like node-redlock's
/// and redsync's values. Two `getrandom` calls per acquisition cost more than the rest of
/// the client's work for it.
pub(crate) fn new_value() -> String {
    let bits: u128 = rand::rng().random();
    format!("{bits:032x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_128_bit_and_unique() {
        let a = new_value();
        let b = new_value();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
