//! The fixture for the root package's tests and benches, which reach it as `mod support;`:
//! the `fencelock-test-support` crate beside this file, re-exported.
#![allow(unused_imports, unreachable_pub)]

pub use fencelock_test_support::*;
