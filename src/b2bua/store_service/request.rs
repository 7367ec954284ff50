//! Steps 11/111/12: a receiver's store request (SIP body or DTMF PIN), its validation in the
//! order of PROTOCOL.md §2.2, the store, and the prompt to the sender (or back to the
//! receiver in `via-receiver` mode).

use std::time::{Duration, Instant, SystemTime};

use super::{Command, Ctx, Notification, Target};
use crate::b2bua::media::{CallKey, Side};
use crate::b2bua::wire::{self, Mode, Prompt, StoreAccepted, StoreRequest};
use crate::config::PromptFormat;
use crate::sip::transaction::ServerTxId;
use crate::sip::uri::Uri;
use crate::storage::stores::{rfc3339, NewStore, StoreKind};
use crate::storage::threshold::Threshold;

/// Codecs a store session accepts (PROTOCOL.md §2.3 `formats`).
pub const FORMATS: [&str; 4] = ["PCMU/8000", "PCMA/8000", "G722/8000", "opus/48000/2"];

pub(crate) enum Origin {
    /// In-dialog MESSAGE/INFO: answered with a status.
    Sip { tx: ServerTxId, body: bytes::Bytes },
    /// `*7 PIN #`: failures go back as an in-dialog MESSAGE.
    Dtmf { pin: String },
}

pub(crate) struct Job {
    pub call: CallKey,
    /// The receiver's side.
    pub side: Side,
    /// `user@domain` of the receiver and of the other party.
    pub receiver: String,
    pub sender: String,
    pub origin: Origin,
    /// The receiver's leg runs over TLS: store and play URIs name the TLS port.
    pub secure: bool,
}

/// A refusal: status, `error` code, detail.
struct Refusal(u16, &'static str, String);

pub(crate) async fn handle(ctx: Ctx, job: Job) {
    match decide(&ctx, &job).await {
        Ok(()) => {}
        Err(Refusal(status, code, detail)) => {
            tracing::info!(receiver = %job.receiver, code, "store request refused");
            match &job.origin {
                Origin::Sip { tx, .. } => ctx.send(Command::RejectRequest {
                    tx: *tx,
                    status,
                    code,
                    detail,
                }),
                Origin::Dtmf { .. } => {
                    let user = user_of(&job.receiver).to_string();
                    let prefer_text = prefers_text(&ctx, &user).await;
                    ctx.send(Command::Notify(Notification {
                        target: Target::InCall(job.call, job.side),
                        content_type: wire::ERROR,
                        json: crate::b2bua::errors::error_json(code, &detail),
                        text: wire::error_text(code, &detail),
                        prefer_text,
                    }))
                }
            }
        }
    }
}

fn user_of(aor: &str) -> &str {
    aor.split('@').next().unwrap_or(aor)
}

/// `sip:user@host` (or `user@host`) naming the same address-of-record as `aor`.
fn same_party(uri: &str, aor: &str) -> bool {
    let uri = uri.trim();
    let parsed = if uri.contains(':') {
        Uri::parse(uri).ok()
    } else {
        Uri::parse(&format!("sip:{uri}")).ok()
    };
    parsed.is_some_and(|u| u.aor().eq_ignore_ascii_case(aor))
}

/// Whether `user`'s account (or the server) wants plain-text notifications.
pub(crate) async fn prefers_text(ctx: &Ctx, user: &str) -> bool {
    let account = ctx.accounts.get(user).await.ok().flatten();
    let format = account
        .and_then(|a| a.prompt_format_override())
        .unwrap_or(ctx.cfg.store.prompt_format);
    format == PromptFormat::Text
}

async fn decide(ctx: &Ctx, job: &Job) -> Result<(), Refusal> {
    let req = match &job.origin {
        Origin::Sip { body, .. } => {
            StoreRequest::parse(body).map_err(|e| Refusal(400, "malformed-request", e))?
        }
        Origin::Dtmf { pin } => StoreRequest::from_pin(pin),
    };
    if let Some(s) = &req.sender {
        if !same_party(s, &job.sender) {
            return Err(Refusal(
                404,
                "not-in-call",
                format!("{s} is not the other party of this call"),
            ));
        }
    }
    if let Some(r) = &req.receiver {
        if !same_party(r, &job.receiver) {
            return Err(Refusal(
                403,
                "receiver-mismatch",
                format!("{r} is not you ({})", job.receiver),
            ));
        }
    }
    let user = user_of(&job.receiver).to_string();
    let account = ctx
        .accounts
        .get(&user)
        .await
        .map_err(|e| Refusal(500, "internal", e.to_string()))?
        .ok_or_else(|| {
            Refusal(
                403,
                "unknown-receiver",
                format!("{} is not a subscriber", job.receiver),
            )
        })?;
    if ctx.lockout().is_locked(&user, Instant::now()) {
        return Err(Refusal(
            403,
            "locked-out",
            "too many wrong PINs; try again later".into(),
        ));
    }
    let ok = ctx
        .accounts
        .verify_pin(&user, &req.pin)
        .await
        .map_err(|e| Refusal(500, "internal", e.to_string()))?;
    if !ok {
        ctx.lockout().failure(&user, Instant::now());
        return Err(Refusal(403, "bad-pin", "wrong storage PIN".into()));
    }
    ctx.lockout().success(&user);
    let free = account.free_bytes();
    if free == 0 {
        return Err(Refusal(
            403,
            "quota-exhausted",
            "no free storage space".into(),
        ));
    }

    // The request's threshold, else the account's default, else the server's (§2.1).
    let requested = req.threshold.map(|t| match (t.percent, t.bytes) {
        (Some(p), _) => Threshold::Percent(p),
        (_, Some(b)) => Threshold::Bytes(b),
        _ => Threshold::Adaptive,
    });
    let threshold = Threshold::effective(
        requested,
        account.threshold,
        Threshold::Percent(ctx.cfg.store.threshold_percent),
    );
    let now = SystemTime::now();
    let store = ctx
        .stores
        .create(
            NewStore {
                kind: StoreKind::InCall,
                sender: job.sender.clone(),
                receiver: job.receiver.clone(),
                owner: Some(user.clone()),
                call_id: None,
                threshold,
                ttl: Duration::from_secs(ctx.cfg.store.store_expiry_secs),
            },
            now,
        )
        .await
        .map_err(|e| Refusal(500, "internal", e.to_string()))?;

    if job.secure {
        ctx.secure_store(&store.id, Some(true));
    }
    let prompt = Prompt {
        store_id: store.id.clone(),
        receiver: format!("sip:{}", job.receiver),
        store_uri: ctx.cfg.session_uri(&store.id, job.secure),
        ip: ctx.cfg.public_ip.to_string(),
        port: ctx.cfg.session_port(job.secure),
        space_bytes: free,
        expires_at: rfc3339(store.expires_at),
        formats: FORMATS.iter().map(|f| f.to_string()).collect(),
        upload_url: crate::http::upload_url(&ctx.cfg.http_base, &store),
    };
    let prompt_json = serde_json::to_string(&prompt).unwrap_or_default();
    tracing::info!(store = %store.id, receiver = %job.receiver, sender = %job.sender, "store accepted");

    match (&job.origin, req.mode) {
        (Origin::Sip { tx, .. }, Mode::ViaReceiver) => {
            ctx.send(Command::RespondRequest {
                tx: *tx,
                status: 200,
                content_type: wire::PROMPT,
                body: prompt_json,
            });
        }
        (origin, _) => {
            if let Origin::Sip { tx, .. } = origin {
                let accepted = StoreAccepted {
                    store_id: store.id.clone(),
                    prompted: format!("sip:{}", job.sender),
                };
                ctx.send(Command::RespondRequest {
                    tx: *tx,
                    status: 200,
                    content_type: wire::STORE_ACCEPTED,
                    body: serde_json::to_string(&accepted).unwrap_or_default(),
                });
            }
            let prefer_text = prefers_text(ctx, user_of(&job.sender)).await;
            ctx.send(Command::Notify(Notification {
                target: Target::InCall(job.call, job.side.other()),
                content_type: wire::PROMPT,
                json: prompt_json,
                text: prompt.to_text(),
                prefer_text,
            }));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn party_comparison() {
        assert!(same_party("sip:1001@example.com", "1001@example.com"));
        assert!(same_party(
            "sip:1001@EXAMPLE.com;transport=tcp",
            "1001@example.com"
        ));
        assert!(same_party("1001@example.com", "1001@example.com"));
        assert!(!same_party("sip:1003@example.com", "1001@example.com"));
        assert!(!same_party("garbage", "1001@example.com"));
    }
}
