//! Every error code of the wire contract (PROTOCOL.md 2.2, 2.4, 2.5, 3 and 5) in one place:
//! the `error` string of the JSON body (and of SIP's `Warning: 399 <host> "CODE"` or a BYE's
//! `Reason` text), the SIP status, the HTTP status and a default human detail.
//!
//! The SIP side ([`crate::b2bua::errors::with_error_body`], the store and share services,
//! the engine) and the HTTP side ([`crate::http::ApiError`]) both take an [`ErrorCode`]; no
//! other module spells a code string. [`Refusal`] is a code with its detail (and a
//! `Retry-After`), the one typed error every refused store request, store session, play
//! session and upload carries.

use std::fmt;

/// A code of the contract. The SIP and HTTP statuses differ only where the contract says so
/// (`not-ready`: SIP `480`, HTTP `503`; `unsupported-format`: SIP `488`, HTTP `415`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    // 2.2: answers to a store request.
    MalformedRequest,
    UnknownReceiver,
    BadPin,
    LockedOut,
    QuotaExhausted,
    NotInCall,
    ReceiverMismatch,
    // 2.4: step 211.
    UnknownStore,
    NotSender,
    UnsupportedFormat,
    QuotaExceeded,
    // 2.5: session ends (BYE `Reason` text) and step 333.
    SizeExceeded,
    RtpTimeout,
    StorageFailed,
    PlayFailed,
    NotReceiver,
    NotReady,
    /// Ended by a clean shutdown (PROTOCOL.md 4).
    Shutdown,
    // 5: general SIP errors.
    MalformedMessage,
    Overloaded,
    LoopDetected,
    NoAck,
    /// The callee did not answer in time (a call, not a store).
    Timeout,
    /// The callee could not be reached.
    Unreachable,
    /// The caller cancelled while the callee's leg was being answered.
    Cancelled,
    Internal,
    // 5: HTTP errors.
    Unauthorized,
    Forbidden,
    NotFound,
    BadRequest,
    MethodNotAllowed,
    LengthRequired,
    NoData,
    TooLarge,
    WrongState,
    StorageError,
    Truncated,
    // 3 and 5 "Shares".
    ShareDenied,
    UnknownShare,
    SharesDisabled,
    BadName,
    BadPolicy,
    IncompleteBody,
    RangeNotSatisfiable,
    BadAnnounce,
    // 7: TLS and SRTP.
    /// A `sips:` target whose first hop is not TLS.
    SipsNeedsTls,
    /// An `RTP/SAVP` offer without a crypto line callvault supports.
    NoSupportedCrypto,
    /// A request too big for UDP whose target takes no TCP (RFC 3261 §18.1.1).
    MessageTooLarge,
    // Defences (issue 10): login lockouts and the piece index's bounds.
    /// Too many failed logins (HTTP Basic, SIP digest) of a user or from a source.
    LoginLockedOut,
    /// An announce for a peer id another announcer holds.
    PeerIdTaken,
    /// One announcer's holders per content are at their bound.
    TooManyHolders,
    /// A content's holder table is full.
    IndexFull,
    /// `[share] index = "terminals"`: serve keeps no piece index.
    IndexOnTerminals,
    // 8: the admin API.
    /// Ended or deleted by the operator (a BYE's `Reason` text).
    EndedByOperator,
    /// A store still receiving over HTTP cannot be deleted yet.
    StoreReceiving,
    /// The server runs no SIP core to answer for calls and registrations.
    AdminUnavailable,
    /// `POST /v1/accounts` for a user that exists.
    AccountExists,
}

impl ErrorCode {
    /// Every code, for tests and documentation.
    pub const ALL: [ErrorCode; 57] = [
        ErrorCode::MalformedRequest,
        ErrorCode::UnknownReceiver,
        ErrorCode::BadPin,
        ErrorCode::LockedOut,
        ErrorCode::QuotaExhausted,
        ErrorCode::NotInCall,
        ErrorCode::ReceiverMismatch,
        ErrorCode::UnknownStore,
        ErrorCode::NotSender,
        ErrorCode::UnsupportedFormat,
        ErrorCode::QuotaExceeded,
        ErrorCode::SizeExceeded,
        ErrorCode::RtpTimeout,
        ErrorCode::StorageFailed,
        ErrorCode::PlayFailed,
        ErrorCode::NotReceiver,
        ErrorCode::NotReady,
        ErrorCode::Shutdown,
        ErrorCode::MalformedMessage,
        ErrorCode::Overloaded,
        ErrorCode::LoopDetected,
        ErrorCode::NoAck,
        ErrorCode::Timeout,
        ErrorCode::Unreachable,
        ErrorCode::Cancelled,
        ErrorCode::Internal,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::BadRequest,
        ErrorCode::MethodNotAllowed,
        ErrorCode::LengthRequired,
        ErrorCode::NoData,
        ErrorCode::TooLarge,
        ErrorCode::WrongState,
        ErrorCode::StorageError,
        ErrorCode::Truncated,
        ErrorCode::ShareDenied,
        ErrorCode::UnknownShare,
        ErrorCode::SharesDisabled,
        ErrorCode::BadName,
        ErrorCode::BadPolicy,
        ErrorCode::IncompleteBody,
        ErrorCode::RangeNotSatisfiable,
        ErrorCode::BadAnnounce,
        ErrorCode::SipsNeedsTls,
        ErrorCode::NoSupportedCrypto,
        ErrorCode::MessageTooLarge,
        ErrorCode::LoginLockedOut,
        ErrorCode::PeerIdTaken,
        ErrorCode::TooManyHolders,
        ErrorCode::IndexFull,
        ErrorCode::IndexOnTerminals,
        ErrorCode::EndedByOperator,
        ErrorCode::StoreReceiving,
        ErrorCode::AdminUnavailable,
        ErrorCode::AccountExists,
    ];

    /// `(code string, SIP status, HTTP status, default detail)`. SIP status 200 marks a code
    /// that only ends a dialog (the BYE's `Reason: SIP;cause=200;text="CODE"`).
    const fn row(self) -> (&'static str, u16, u16, &'static str) {
        use ErrorCode::*;
        match self {
            MalformedRequest => (
                "malformed-request",
                400,
                400,
                "the request body is not valid",
            ),
            UnknownReceiver => (
                "unknown-receiver",
                403,
                403,
                "the receiver is not a subscriber",
            ),
            BadPin => ("bad-pin", 403, 403, "wrong storage PIN"),
            LockedOut => (
                "locked-out",
                403,
                403,
                "too many wrong PINs; try again later",
            ),
            QuotaExhausted => ("quota-exhausted", 403, 403, "no free storage space"),
            NotInCall => ("not-in-call", 404, 404, "not the other party of this call"),
            ReceiverMismatch => ("receiver-mismatch", 403, 403, "the receiver is not you"),
            UnknownStore => ("unknown-store", 404, 404, "unknown, used or expired store"),
            NotSender => ("not-sender", 403, 403, "not the sender of this store"),
            UnsupportedFormat => ("unsupported-format", 488, 415, "format not supported"),
            QuotaExceeded => (
                "quota-exceeded",
                403,
                403,
                "larger than the receiver's free space",
            ),
            SizeExceeded => (
                "size-exceeded",
                200,
                413,
                "more data than the store may hold",
            ),
            RtpTimeout => ("rtp-timeout", 200, 408, "the sender went silent"),
            StorageFailed => ("storage-failed", 200, 500, "storing the data failed"),
            PlayFailed => ("play-failed", 200, 500, "reading the store failed"),
            NotReceiver => ("not-receiver", 403, 403, "only the receiver may listen"),
            NotReady => ("not-ready", 480, 503, "the threshold is not reached yet"),
            Shutdown => ("shutdown", 200, 503, "the server is shutting down"),
            MalformedMessage => (
                "malformed-message",
                400,
                400,
                "the message cannot be parsed",
            ),
            Overloaded => ("overloaded", 503, 503, "the server is overloaded"),
            LoopDetected => ("loop-detected", 482, 508, "the request loops"),
            NoAck => ("no-ack", 200, 408, "the 2xx was never acknowledged"),
            Timeout => ("timeout", 408, 504, "the callee did not answer in time"),
            Unreachable => ("unreachable", 480, 502, "the callee could not be reached"),
            Cancelled => ("cancelled", 200, 400, "the caller cancelled"),
            Internal => ("internal", 500, 500, "internal error"),
            Unauthorized => ("unauthorized", 401, 401, "credentials required"),
            Forbidden => ("forbidden", 403, 403, "not allowed"),
            NotFound => ("not-found", 404, 404, "no such resource"),
            BadRequest => ("bad-request", 400, 400, "bad request"),
            MethodNotAllowed => ("method-not-allowed", 405, 405, "method not allowed"),
            LengthRequired => ("length-required", 411, 411, "Content-Length is required"),
            NoData => ("no-data", 409, 409, "the store holds no data"),
            TooLarge => ("too-large", 413, 413, "too large"),
            WrongState => ("wrong-state", 409, 409, "the store is in the wrong state"),
            StorageError => ("storage-error", 500, 500, "store data unreadable"),
            Truncated => (
                "truncated",
                400,
                400,
                "the body ended early; the store is truncated",
            ),
            ShareDenied => ("share-denied", 403, 403, "the share's policy refuses you"),
            UnknownShare => ("unknown-share", 404, 404, "no such shared file"),
            SharesDisabled => ("shares-disabled", 503, 503, "sharing is not enabled"),
            BadName => ("bad-name", 400, 400, "bad share name"),
            BadPolicy => ("bad-policy", 400, 400, "bad share policy"),
            IncompleteBody => ("incomplete-body", 400, 400, "the body ended early"),
            RangeNotSatisfiable => ("range-not-satisfiable", 416, 416, "range not satisfiable"),
            BadAnnounce => ("bad-announce", 400, 400, "bad announce"),
            SipsNeedsTls => (
                "sips-needs-tls",
                480,
                400,
                "a sips: target is only reached over TLS",
            ),
            NoSupportedCrypto => (
                "no-supported-crypto",
                488,
                400,
                "no supported SRTP crypto line offered",
            ),
            MessageTooLarge => (
                "message-too-large",
                513,
                413,
                "the message is too large for the transport",
            ),
            // SIP 503 + Retry-After, not 403: a 403 must not be retried (RFC 3261 21.4.4),
            // which would strand a phone locked out by someone else's guesses.
            LoginLockedOut => (
                "login-locked-out",
                503,
                429,
                "too many failed logins; retry later",
            ),
            PeerIdTaken => (
                "peer-id-taken",
                409,
                409,
                "the peer id belongs to another announcer",
            ),
            TooManyHolders => (
                "too-many-holders",
                429,
                429,
                "too many holders from one announcer",
            ),
            IndexFull => ("index-full", 503, 503, "the content's holder list is full"),
            IndexOnTerminals => (
                "index-on-terminals",
                503,
                503,
                "the piece index lives on the terminals",
            ),
            EndedByOperator => ("ended-by-operator", 200, 410, "ended by operator"),
            StoreReceiving => (
                "store-receiving",
                409,
                409,
                "the store is still receiving; try again",
            ),
            AdminUnavailable => (
                "admin-unavailable",
                503,
                503,
                "this server runs no SIP core",
            ),
            AccountExists => ("account-exists", 409, 409, "the account exists"),
        }
    }

    /// The `error` field (and Warning / Reason text).
    pub const fn as_str(self) -> &'static str {
        self.row().0
    }

    /// The SIP status of a response refusing with this code (200 for dialog-ending reasons).
    pub const fn sip_status(self) -> u16 {
        self.row().1
    }

    /// The HTTP status of an API error with this code.
    pub const fn http_status(self) -> u16 {
        self.row().2
    }

    /// A default human text, for when the situation adds nothing.
    pub const fn default_detail(self) -> &'static str {
        self.row().3
    }

    /// The code for a code string (what a peer wrote in a body).
    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: the code, the situation's detail and, for `overloaded` / `not-ready`, a
/// `Retry-After` in seconds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct Refusal {
    pub code: ErrorCode,
    pub detail: String,
    pub retry_after: Option<u32>,
}

impl Refusal {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Refusal {
        Refusal {
            code,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// With the code's default detail.
    pub fn bare(code: ErrorCode) -> Refusal {
        Refusal::new(code, code.default_detail())
    }

    /// `500 internal`, logging nothing itself: the detail is the error's text.
    pub fn internal(e: impl fmt::Display) -> Refusal {
        Refusal::new(ErrorCode::Internal, e.to_string())
    }

    pub fn retry_after(mut self, secs: u32) -> Refusal {
        self.retry_after = Some(secs);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.as_str()), "duplicate {c}");
            assert_eq!(ErrorCode::parse(c.as_str()), Some(c));
            assert!(c
                .as_str()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'-'));
            assert!((200..600).contains(&c.sip_status()));
            assert!((400..600).contains(&c.http_status()));
            assert!(!c.default_detail().is_empty());
        }
        assert_eq!(ErrorCode::parse("nonsense"), None);
    }

    #[test]
    fn contract_rows() {
        // PROTOCOL.md 2.2 and 2.4, 333, 5.
        assert_eq!(ErrorCode::NotInCall.sip_status(), 404);
        assert_eq!(ErrorCode::UnsupportedFormat.sip_status(), 488);
        assert_eq!(ErrorCode::UnsupportedFormat.http_status(), 415);
        assert_eq!(ErrorCode::NotReady.sip_status(), 480);
        assert_eq!(ErrorCode::NotReady.http_status(), 503);
        assert_eq!(ErrorCode::QuotaExceeded.as_str(), "quota-exceeded");
        assert_eq!(ErrorCode::SizeExceeded.sip_status(), 200);
    }
}
