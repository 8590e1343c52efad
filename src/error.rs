//! Errors of the store API and of the layer's configuration.
//!
//! The layer itself adds no error to a service: a [`StoreError`] met while
//! serving a request is logged, counted and turned into a pass-through to the
//! inner service.

use std::fmt;

/// A boxed error, as carried in [`StoreError::source`](std::error::Error::source).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A store call failed. While serving a request this never reaches the
/// client: the request goes to the inner service instead (fail open).
#[derive(Debug)]
pub struct StoreError {
    kind: Kind,
    source: Option<BoxError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Timeout,
    Unavailable,
    Backend,
    /// Not called: the circuit breaker is open.
    Skipped,
}

impl StoreError {
    /// The store did not answer within the configured store timeout.
    pub fn timeout() -> Self {
        StoreError {
            kind: Kind::Timeout,
            source: None,
        }
    }

    /// No connection to the store could be had (pool exhausted, server down).
    pub fn unavailable(source: impl Into<BoxError>) -> Self {
        StoreError {
            kind: Kind::Unavailable,
            source: Some(source.into()),
        }
    }

    /// The store answered with an error.
    pub fn backend(source: impl Into<BoxError>) -> Self {
        StoreError {
            kind: Kind::Backend,
            source: Some(source.into()),
        }
    }

    /// The store was not called: the layer's circuit breaker is open after
    /// repeated failures (see
    /// [`breaker_failures`](crate::FenceLayerBuilder::breaker_failures)).
    pub fn skipped() -> Self {
        StoreError {
            kind: Kind::Skipped,
            source: None,
        }
    }

    /// True when the store was not called because the breaker is open.
    pub fn is_skipped(&self) -> bool {
        self.kind == Kind::Skipped
    }

    /// True when the store is sick: it timed out or could not be reached
    /// (an error reply is an answer, not a sign of sickness).
    pub(crate) fn is_sick(&self) -> bool {
        matches!(self.kind, Kind::Timeout | Kind::Unavailable)
    }

    /// True when the store did not answer within the store timeout.
    pub fn is_timeout(&self) -> bool {
        self.kind == Kind::Timeout
    }

    /// True when no connection to the store could be had.
    pub fn is_unavailable(&self) -> bool {
        self.kind == Kind::Unavailable
    }

    /// An error of the same kind, without the source (for requests that
    /// shared the failed call).
    pub(crate) fn copy_kind(&self) -> StoreError {
        StoreError {
            kind: self.kind,
            source: None,
        }
    }

    /// The `result` label of a failed store call's metric.
    #[cfg(feature = "metrics")]
    pub(crate) fn metric_label(&self) -> &'static str {
        match self.kind {
            Kind::Timeout => "timeout",
            Kind::Unavailable => "unavailable",
            Kind::Skipped => "skipped",
            Kind::Backend => "error",
        }
    }

    /// A short token for `Cache-Status` `detail` and for logs.
    pub(crate) fn detail(&self) -> &'static str {
        match self.kind {
            Kind::Timeout => "store-timeout",
            Kind::Unavailable | Kind::Skipped => "store-unavailable",
            Kind::Backend => "store-error",
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Kind::Timeout => f.write_str("cache store timed out"),
            Kind::Unavailable => f.write_str("cache store unavailable"),
            Kind::Backend => f.write_str("cache store error"),
            Kind::Skipped => f.write_str("cache store skipped: circuit breaker open"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// The layer's configuration is invalid; returned by
/// [`FenceLayerBuilder::build`](crate::FenceLayerBuilder::build).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    message: String,
}

impl ConfigError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        ConfigError {
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid tower-fence configuration: {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_send_sync_and_chain_their_source() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<StoreError>();
        assert_send_sync::<ConfigError>();
        let err = StoreError::backend(std::io::Error::other("boom"));
        assert_eq!(err.to_string(), "cache store error");
        assert_eq!(std::error::Error::source(&err).unwrap().to_string(), "boom");
        assert!(StoreError::timeout().is_timeout());
        assert_eq!(StoreError::timeout().detail(), "store-timeout");
    }
}
