//! Errors shown on one line, each cause once.

use std::error::Error;

/// An error and its sources on one line, `outer: cause: root`.
///
/// A source whose text is already on the line is left out: redis-rs, for one, wraps an
/// I/O error and also shows its text, so the plain chain would print it twice
/// (`Connection refused (os error 111): Connection refused (os error 111)`).
pub fn chain(e: &dyn Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = inner.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use std::fmt;

    use super::*;

    #[derive(Debug)]
    struct Wrap(&'static str, Option<Box<Wrap>>);

    impl fmt::Display for Wrap {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Wrap {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|w| w as &(dyn Error + 'static))
        }
    }

    #[test]
    fn each_cause_appears_once() {
        let refused = "Connection refused (os error 111)";
        let io = Wrap(refused, None);
        let redis = Wrap(refused, Some(Box::new(io)));
        let queue = Wrap("queue connect failed", Some(Box::new(redis)));
        assert_eq!(
            chain(&queue),
            "queue connect failed: Connection refused (os error 111)"
        );
        let distinct = Wrap(
            "a",
            Some(Box::new(Wrap("b", Some(Box::new(Wrap("c", None)))))),
        );
        assert_eq!(chain(&distinct), "a: b: c");
    }

    /// The real thing: redis-rs's error for a refused connection.
    #[test]
    fn a_refused_redis_connection_names_its_cause_once() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let redis = redis::RedisError::from(io);
        let line = chain(&redis);
        let cause = std::io::Error::from(std::io::ErrorKind::ConnectionRefused).to_string();
        assert_eq!(line.matches(&cause).count(), 1, "{line}");
    }
}
