//! The error taxonomy of SPEC §4: every delivery failure becomes exactly one
//! `Failure` with one `ErrorType`, classified here and nowhere else.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    Timeout,
    Connect,
    Http5xx,
    Http429,
    Http4xx,
    FileMissing,
    FileUnreadable,
    PathDenied,
    PayloadInvalid,
    UnknownEntityType,
}

impl ErrorType {
    pub const ALL: [ErrorType; 10] = [
        ErrorType::Timeout,
        ErrorType::Connect,
        ErrorType::Http5xx,
        ErrorType::Http429,
        ErrorType::Http4xx,
        ErrorType::FileMissing,
        ErrorType::FileUnreadable,
        ErrorType::PathDenied,
        ErrorType::PayloadInvalid,
        ErrorType::UnknownEntityType,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::Timeout => "timeout",
            ErrorType::Connect => "connect",
            ErrorType::Http5xx => "http_5xx",
            ErrorType::Http429 => "http_429",
            ErrorType::Http4xx => "http_4xx",
            ErrorType::FileMissing => "file_missing",
            ErrorType::FileUnreadable => "file_unreadable",
            ErrorType::PathDenied => "path_denied",
            ErrorType::PayloadInvalid => "payload_invalid",
            ErrorType::UnknownEntityType => "unknown_entity_type",
        }
    }

    pub fn parse(text: &str) -> Option<ErrorType> {
        ErrorType::ALL.into_iter().find(|t| t.as_str() == text)
    }

    /// Failures that say "the sink as a whole is unwell" rather than "this row is bad".
    pub fn is_sink_level(self) -> bool {
        matches!(
            self,
            ErrorType::Timeout | ErrorType::Connect | ErrorType::Http5xx | ErrorType::Http429
        )
    }
}

/// Whether `entity_type` can be routed at all: not blank, at most 100 bytes, no
/// control characters (it goes into logs and metric labels). Any other name goes
/// to `/api/ingest/sync` unless `dispatch.json_entity_types` says otherwise.
pub fn well_formed_entity_type(entity_type: &str) -> bool {
    !entity_type.trim().is_empty()
        && entity_type.len() <= 100
        && !entity_type.chars().any(char::is_control)
}

impl fmt::Display for ErrorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How much of a sink's response body is kept for operators.
pub const RESPONSE_BODY_LIMIT: usize = 4096;

/// A sink's response body as text for operators: its first [`RESPONSE_BODY_LIMIT`]
/// bytes of UTF-8, [`storable`] (invalid bytes and NULs become U+FFFD, which is wider
/// than they were, so the cut comes after the decoding, on a character boundary).
pub fn response_body_text(bytes: &[u8]) -> String {
    let text = storable(&String::from_utf8_lossy(bytes));
    let mut end = text.len().min(RESPONSE_BODY_LIMIT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// Text as a database column takes it: PostgreSQL's `text` and `jsonb` refuse NUL,
/// and a refused settle would leave every row of the batch unsettled (a sink's
/// response body can hold anything).
pub fn storable(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

/// One classified delivery failure.
#[derive(Debug, Clone)]
pub struct Failure {
    pub error_type: ErrorType,
    /// Whether another attempt could succeed (before counting attempts).
    pub retryable: bool,
    pub http_status: Option<u16>,
    /// Human-readable, the whole cause chain, never a payload or a secret.
    pub message: String,
    /// First 4 KiB of the sink's response body.
    pub response_body: Option<String>,
    /// The sink's `Retry-After`, when it sent one.
    pub retry_after: Option<Duration>,
    /// No connection was made (refused, DNS, TLS handshake, connect timeout): the
    /// request never reached the sink, so no row in it can have caused the failure,
    /// and none is charged an attempt for it.
    pub unsent: bool,
}

impl Failure {
    /// The message for a log line. Messages about a row's file or payload quote
    /// values from the payload (paths, field contents), and logs carry no payload
    /// contents (SPEC §7): those stay in the database (`last_error`, `dlq show`).
    pub fn log_message(&self) -> &str {
        match self.error_type {
            ErrorType::FileMissing
            | ErrorType::FileUnreadable
            | ErrorType::PathDenied
            | ErrorType::PayloadInvalid
            | ErrorType::UnknownEntityType => {
                "details in the row's last_error, not logged: they quote what the producer wrote"
            }
            _ => &self.message,
        }
    }

    fn new(error_type: ErrorType, retryable: bool, message: impl Into<String>) -> Failure {
        Failure {
            error_type,
            retryable,
            http_status: None,
            message: message.into(),
            response_body: None,
            retry_after: None,
            unsent: false,
        }
    }

    /// A non-2xx response.
    pub fn from_status(
        status: u16,
        body: Option<String>,
        retry_after: Option<Duration>,
    ) -> Failure {
        let (error_type, retryable) = match status {
            429 => (ErrorType::Http429, true),
            500..=599 => (ErrorType::Http5xx, true),
            408 => (ErrorType::Http4xx, true),
            // a redirect (never followed): a misconfigured ingest.base_url or a proxy
            // in front of the API, for an operator to fix; retried like a 408 meanwhile
            300..=399 => (ErrorType::Http4xx, true),
            400..=499 => (ErrorType::Http4xx, false),
            // no HTTP status at all (600 and up, or below 200 as a final answer): a
            // broken server or proxy, not a refusal of the rows; retried
            _ => (ErrorType::Http5xx, true),
        };
        let reason = reqwest::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        let redirect = if (300..=399).contains(&status) {
            " (a redirect, not followed: set ingest.base_url to the ingest API itself)"
        } else {
            ""
        };
        let mut f = Failure::new(
            error_type,
            retryable,
            format!("sink answered HTTP {status} {reason}")
                .trim_end()
                .to_string()
                + redirect,
        );
        f.http_status = Some(status);
        f.response_body = body;
        f.retry_after = if matches!(status, 429 | 503) {
            retry_after
        } else {
            None
        };
        f
    }

    /// A request that got no complete response. A connection that could not be
    /// made is `connect`, also when it is `ingest.connect_timeout` that ran out (a
    /// host or a listener that drops the handshake): `timeout` is a request sent
    /// and not answered in `ingest.timeout` (SPEC 4).
    pub fn from_transport(err: &reqwest::Error) -> Failure {
        let err_without_url = error_chain(err);
        let error_type = if !err.is_connect() && (err.is_timeout() || chain_has_timeout(err)) {
            ErrorType::Timeout
        } else {
            ErrorType::Connect
        };
        let mut f = Failure::new(error_type, true, err_without_url);
        f.unsent = err.is_connect();
        f
    }

    /// No complete answer within the request's deadline (the request went out).
    pub fn timeout(message: impl Into<String>) -> Failure {
        Failure::new(ErrorType::Timeout, true, message)
    }

    pub fn file_missing(message: impl Into<String>) -> Failure {
        Failure::new(ErrorType::FileMissing, true, message)
    }

    pub fn file_unreadable(message: impl Into<String>) -> Failure {
        Failure::new(ErrorType::FileUnreadable, true, message)
    }

    pub fn path_denied(message: impl Into<String>) -> Failure {
        Failure::new(ErrorType::PathDenied, false, message)
    }

    pub fn payload_invalid(message: impl Into<String>) -> Failure {
        Failure::new(ErrorType::PayloadInvalid, false, message)
    }

    pub fn unknown_entity_type(message: impl Into<String>) -> Failure {
        Failure::new(ErrorType::UnknownEntityType, false, message)
    }
}

/// "outer: cause: root cause" for any error.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

fn chain_has_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_the_taxonomy() {
        let cases = [
            (500, ErrorType::Http5xx, true),
            (503, ErrorType::Http5xx, true),
            (429, ErrorType::Http429, true),
            (408, ErrorType::Http4xx, true),
            (301, ErrorType::Http4xx, true),
            (302, ErrorType::Http4xx, true),
            (307, ErrorType::Http4xx, true),
            (400, ErrorType::Http4xx, false),
            (404, ErrorType::Http4xx, false),
            (422, ErrorType::Http4xx, false),
            // no HTTP status: a broken server or proxy, retried
            (600, ErrorType::Http5xx, true),
            (999, ErrorType::Http5xx, true),
        ];
        for (status, error_type, retryable) in cases {
            let f = Failure::from_status(status, None, None);
            assert_eq!(
                (f.error_type, f.retryable),
                (error_type, retryable),
                "status {status}"
            );
            assert_eq!(f.http_status, Some(status));
        }
    }

    #[test]
    fn retry_after_is_kept_only_for_429_and_503() {
        let d = Some(Duration::from_secs(7));
        assert_eq!(Failure::from_status(429, None, d).retry_after, d);
        assert_eq!(Failure::from_status(503, None, d).retry_after, d);
        assert_eq!(Failure::from_status(500, None, d).retry_after, None);
    }

    #[test]
    fn names_round_trip() {
        for t in ErrorType::ALL {
            assert_eq!(ErrorType::parse(t.as_str()), Some(t));
        }
        assert_eq!(ErrorType::parse("nope"), None);
    }
}
