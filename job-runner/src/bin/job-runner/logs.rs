//! Where logs go: `tracing` on stderr, as text or JSON.

use std::io::IsTerminal;

use crate::settings::LogFormat;

/// Sets up `tracing` on stderr: human-readable or JSON, filtered by `RUST_LOG` (default
/// `info`). Colour only when stderr is a terminal and `NO_COLOR` is unset or empty
/// (no-color.org): escape codes in a file or a pipe are noise to whoever reads it.
pub(crate) fn init(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour(std::io::stderr().is_terminal(), no_color))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
}

fn colour(terminal: bool, no_color: bool) -> bool {
    terminal && !no_color
}

#[cfg(test)]
mod tests {
    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(super::colour(true, false));
        assert!(!super::colour(true, true));
        assert!(!super::colour(false, false));
        assert!(!super::colour(false, true));
    }
}
