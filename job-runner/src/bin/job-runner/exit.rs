//! How a command ends: exit codes, and the failure that carries one.
//!
//! 0 on success and after a clean shutdown; 1 when a command fails; 69
//! (`EX_UNAVAILABLE`) when Redis cannot be reached at startup; 75 (`EX_TEMPFAIL`) when
//! `lock exec` cannot take or loses its lock; 78 (`EX_CONFIG`) on a configuration error;
//! 130 after a second shutdown signal. `lock exec` otherwise passes on its child's code.

use job_runner::ConfigError;

/// Exit code: configuration error.
pub(crate) const EX_CONFIG: i32 = 78;
/// Exit code: a service could not be reached at startup.
pub(crate) const EX_UNAVAILABLE: i32 = 69;

/// A failure that ends the command with an exit code.
#[derive(Debug)]
pub(crate) struct Exit {
    /// The code.
    pub(crate) code: i32,
    /// What to print on stderr.
    pub(crate) message: String,
}

impl Exit {
    pub(crate) fn new(code: i32, message: impl Into<String>) -> Self {
        Exit {
            code,
            message: message.into(),
        }
    }

    /// A command that failed (exit 1), saying why.
    pub(crate) fn failed(e: &dyn std::error::Error) -> Self {
        Exit::new(1, job_runner::error::chain(e))
    }
}

impl From<ConfigError> for Exit {
    fn from(e: ConfigError) -> Self {
        Exit::new(EX_CONFIG, e.to_string())
    }
}
