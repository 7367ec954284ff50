//! The JSON bodies of in-call storage (PROTOCOL.md §2) and their plain-text forms (§5).
//!
//! Pure data: parsing and validating what terminals send, building what callvault sends.

use serde::{Deserialize, Serialize};

pub const STORE_REQUEST: &str = "application/vnd.callvault.store-request+json";
pub const STORE_ACCEPTED: &str = "application/vnd.callvault.store-accepted+json";
pub const PROMPT: &str = "application/vnd.callvault.prompt+json";
pub const READY: &str = "application/vnd.callvault.ready+json";
pub const ERROR: &str = super::errors::ERROR_CONTENT_TYPE;
pub const SHARE_REQUEST: &str = "application/vnd.callvault.share-request+json";
pub const SHARE_OFFER: &str = "application/vnd.callvault.share-offer+json";

/// Content types callvault consumes itself in a call instead of relaying (§2). The prompt is
/// owned but relayed (via-receiver mode), so it is not listed here.
pub fn is_consumed(content_type: &str) -> bool {
    content_type.eq_ignore_ascii_case(STORE_REQUEST)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    Direct,
    ViaReceiver,
}

/// `threshold` of a store request: exactly one of the three forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<bool>,
}

/// Step 11: what the receiver asks for.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreRequest {
    pub pin: String,
    #[serde(default)]
    pub sender: Option<String>,
    #[serde(default)]
    pub receiver: Option<String>,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub threshold: Option<ThresholdSpec>,
}

impl StoreRequest {
    /// Parses and checks a store-request body; the error text becomes the `detail` of a
    /// `malformed-request` answer.
    pub fn parse(body: &[u8]) -> Result<StoreRequest, String> {
        let req: StoreRequest =
            serde_json::from_slice(body).map_err(|e| format!("invalid store request: {e}"))?;
        if req.pin.is_empty() || req.pin.len() > 32 || !req.pin.bytes().all(|b| b.is_ascii_digit())
        {
            return Err("pin must be 1 to 32 digits".into());
        }
        if let Some(t) = req.threshold {
            let given = [t.percent.is_some(), t.bytes.is_some(), t.adaptive.is_some()]
                .iter()
                .filter(|x| **x)
                .count();
            if given != 1 {
                return Err("threshold takes exactly one of percent, bytes, adaptive".into());
            }
            if t.percent.is_some_and(|p| p > 100) {
                return Err("threshold percent must be 0..100".into());
            }
            if t.adaptive == Some(false) {
                return Err("threshold adaptive must be true when given".into());
            }
        }
        Ok(req)
    }

    /// The DTMF feature code `*7 PIN #` means a request with every other field at its default.
    pub fn from_pin(pin: &str) -> StoreRequest {
        StoreRequest {
            pin: pin.to_string(),
            sender: None,
            receiver: None,
            mode: Mode::Direct,
            threshold: None,
        }
    }
}

/// Direct-mode `200` body (§2.2, §5).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct StoreAccepted {
    pub store_id: String,
    pub prompted: String,
}

/// Step 12: the storage address injected into the sender's leg.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Prompt {
    pub store_id: String,
    pub receiver: String,
    pub store_uri: String,
    pub ip: String,
    pub port: u16,
    pub space_bytes: u64,
    pub expires_at: String,
    pub formats: Vec<String>,
    pub upload_url: String,
}

impl Prompt {
    /// `callvault: send to sip:st_...@host:port (50 MiB free, until 14:05 UTC)`.
    pub fn to_text(&self) -> String {
        let until = self
            .expires_at
            .get(11..16)
            .map(|hm| format!(", until {hm} UTC"))
            .unwrap_or_default();
        format!(
            "callvault: send to {} ({} free{})",
            self.store_uri,
            crate::config::format_bytes(self.space_bytes),
            until
        )
    }
}

/// Step 331: the store can be played.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Ready {
    pub store_id: String,
    pub play_uri: String,
    pub download_url: String,
    pub state: String,
    pub received_bytes: u64,
    pub declared_bytes: Option<u64>,
    pub format: String,
}

impl Ready {
    pub fn to_text(&self) -> String {
        format!("callvault: ready - call {} to listen", self.play_uri)
    }
}

/// Plain-text form of an error body for softphones.
pub fn error_text(code: &str, detail: &str) -> String {
    format!("callvault: {code} - {detail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_request_defaults_and_checks() {
        let r = StoreRequest::parse(br#"{"pin":"4321"}"#).unwrap();
        assert_eq!(r.mode, Mode::Direct);
        assert_eq!(r.threshold, None);
        let r = StoreRequest::parse(
            br#"{"pin":"4321","sender":"sip:1001@example.com","mode":"via-receiver","threshold":{"percent":30}}"#,
        )
        .unwrap();
        assert_eq!(r.mode, Mode::ViaReceiver);
        assert_eq!(r.threshold.unwrap().percent, Some(30));
        for bad in [
            &b"not json"[..],
            br#"{"sender":"x"}"#,
            br#"{"pin":"12a"}"#,
            br#"{"pin":"1","mode":"sideways"}"#,
            br#"{"pin":"1","threshold":{"percent":101}}"#,
            br#"{"pin":"1","threshold":{"percent":1,"bytes":2}}"#,
            br#"{"pin":"1","threshold":{}}"#,
            br#"{"pin":"1","extra":true}"#,
        ] {
            assert!(
                StoreRequest::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn text_forms_name_the_uri() {
        let p = Prompt {
            store_id: "st_x".into(),
            receiver: "sip:1002@example.com".into(),
            store_uri: "sip:st_x@192.0.2.10:5060".into(),
            ip: "192.0.2.10".into(),
            port: 5060,
            space_bytes: 50 * 1024 * 1024,
            expires_at: "2026-11-21T14:05:00Z".into(),
            formats: vec!["PCMU/8000".into()],
            upload_url: "http://x".into(),
        };
        assert_eq!(
            p.to_text(),
            "callvault: send to sip:st_x@192.0.2.10:5060 (50 MiB free, until 14:05 UTC)"
        );
        let r = Ready {
            store_id: "st_x".into(),
            play_uri: "sip:play-st_x@192.0.2.10:5060".into(),
            download_url: "http://x".into(),
            state: "receiving".into(),
            received_bytes: 1,
            declared_bytes: None,
            format: "PCMU/8000".into(),
        };
        assert_eq!(
            r.to_text(),
            "callvault: ready - call sip:play-st_x@192.0.2.10:5060 to listen"
        );
    }
}
