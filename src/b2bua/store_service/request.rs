//! Steps 11/111/12: a receiver's store request (SIP body or DTMF PIN), its validation in the
//! order of PROTOCOL.md §2.2, the store, and the prompt to the sender (or back to the
//! receiver in `via-receiver` mode).

use std::time::{Duration, Instant, SystemTime};

use super::{Command, Ctx, Notification, Target};
use crate::b2bua::media::{CallKey, Side};
use crate::b2bua::wire::{self, Mode, Prompt, StoreAccepted, StoreRequest};
use crate::config::PromptFormat;
use crate::error_code::{ErrorCode, Refusal};
use crate::sip::transaction::ServerTxId;
use crate::sip::uri::Uri;
use crate::storage::pin_lockouts::PinLockouts;
use crate::storage::stores::{party_uri, rfc3339, NewStore, StoreKind};
use crate::storage::threshold::Threshold;

/// Codecs a store session accepts (PROTOCOL.md §2.3 `formats`).
pub(super) const FORMATS: [&str; 4] = ["PCMU/8000", "PCMA/8000", "G722/8000", "opus/48000/2"];

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

pub(crate) async fn handle(ctx: Ctx, job: Job) {
    match decide(&ctx, &job).await {
        Ok(()) => {}
        Err(Refusal { code, detail, .. }) => {
            tracing::info!(receiver = %job.receiver, %code, "store request refused");
            match &job.origin {
                Origin::Sip { tx, .. } => ctx.send(Command::RejectRequest {
                    tx: *tx,
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
                        text: wire::error_text(code.as_str(), &detail),
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

/// Step 111 in the order of PROTOCOL.md 2.2: the request, the parties, the subscriber, the
/// PIN (with its lockout) and free space. The request, the receiver's account and user.
async fn validate(
    ctx: &Ctx,
    job: &Job,
) -> Result<(StoreRequest, crate::storage::Account, String), Refusal> {
    let req = match &job.origin {
        Origin::Sip { body, .. } => {
            StoreRequest::parse(body).map_err(|e| Refusal::new(ErrorCode::MalformedRequest, e))?
        }
        Origin::Dtmf { pin } => StoreRequest::from_pin(pin),
    };
    if let Some(s) = &req.sender {
        if !same_party(s, &job.sender) {
            return Err(Refusal::new(
                ErrorCode::NotInCall,
                format!("{s} is not the other party of this call"),
            ));
        }
    }
    if let Some(r) = &req.receiver {
        if !same_party(r, &job.receiver) {
            return Err(Refusal::new(
                ErrorCode::ReceiverMismatch,
                format!("{r} is not you ({})", job.receiver),
            ));
        }
    }
    let user = user_of(&job.receiver).to_string();
    let account = ctx
        .accounts
        .get(&user)
        .await
        .map_err(Refusal::internal)?
        .ok_or_else(|| {
            Refusal::new(
                ErrorCode::UnknownReceiver,
                format!("{} is not a subscriber", job.receiver),
            )
        })?;
    // On a shared database the lockout is shared too (PROTOCOL 6): a guesser spreading tries
    // over nodes meets one count. A single node keeps it in memory.
    let shared = ctx
        .stores
        .db()
        .backend()
        .is_shared()
        .then(|| PinLockouts::new(ctx.stores.db().clone()));
    let locked = match &shared {
        Some(l) => l
            .is_locked(&user, SystemTime::now())
            .await
            .map_err(Refusal::internal)?,
        None => ctx.lockout().is_locked(&user, Instant::now()),
    };
    if locked {
        return Err(Refusal::bare(ErrorCode::LockedOut));
    }
    let ok = ctx
        .accounts
        .verify_pin(&user, &req.pin)
        .await
        .map_err(Refusal::internal)?;
    if !ok {
        match &shared {
            Some(l) => l
                .failure(&user, SystemTime::now())
                .await
                .map_err(Refusal::internal)?,
            None => ctx.lockout().failure(&user, Instant::now()),
        }
        return Err(Refusal::bare(ErrorCode::BadPin));
    }
    match &shared {
        Some(l) => l.success(&user).await.map_err(Refusal::internal)?,
        None => ctx.lockout().success(&user),
    }
    if account.free_bytes() == 0 {
        return Err(Refusal::bare(ErrorCode::QuotaExhausted));
    }
    Ok((req, account, user))
}

/// Validates, creates the store and sends the prompt (step 12).
async fn decide(ctx: &Ctx, job: &Job) -> Result<(), Refusal> {
    let (req, account, user) = validate(ctx, job).await?;
    let free = account.free_bytes();
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
        .map_err(Refusal::internal)?;

    if job.secure {
        ctx.secure_store(&store.id, Some(true));
    }
    let prompt = Prompt {
        store_id: store.id.clone(),
        receiver: party_uri(&job.receiver),
        store_uri: ctx.cfg.session_uri(&store.id, job.secure),
        ip: ctx.cfg.public_ip.to_string(),
        port: ctx.cfg.session_port(job.secure),
        space_bytes: free,
        expires_at: rfc3339(store.expires_at),
        formats: FORMATS.iter().map(|f| f.to_string()).collect(),
        upload_url: crate::storage::capability::upload_url(&ctx.cfg.http_base, &store),
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
                    prompted: party_uri(&job.sender),
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
