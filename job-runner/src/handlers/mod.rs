//! The built-in handlers: `exec` (a command per job kind) and, with the `payment-demo`
//! feature, `payment` (the seed article's example, on the SQLite [`ledger`](crate::ledger)).

pub mod exec;
#[cfg(feature = "payment-demo")]
pub mod payment;
