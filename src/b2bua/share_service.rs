//! Share requests over SIP (PROTOCOL §3 steps 2–3, §5 "Shares") on top of the engine.
//!
//! The engine hands up [`EngineEvent::ShareRequest`]; this service relays it to a registered
//! sharer (whose terminal answers `200 {"forward":true}` to forward it to the server, or
//! refuses with `403`) or answers on the sharer's behalf from the share's policy when the
//! sharer is unreachable (not registered, `408`, `480`, or no answer within
//! [`ShareServiceConfig::relay_deadline`]). An accepted request gets `200` and then the
//! share-offer MESSAGE. `{"list":true}` is answered by callvault itself.
//!
//! Like the store service: [`ShareService::on_event`] reacts to engine events, database work
//! runs in spawned tasks that send [`Command`]s back, and [`ShareService::apply`] is the only
//! place those touch the engine. The decisions themselves are pure functions
//! ([`parse_request`], [`classify_answer`]) so they are tested without I/O.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::engine::{Engine, EngineEvent};
use super::media::MediaBackend;
use super::wire;
use crate::error_code::ErrorCode;
use crate::share::{Requester, Share, Shares};
use crate::sip::message::{HeaderAccess, Method, Request};
use crate::sip::transaction::{Peer, ServerTxId};
use crate::storage::accounts::Accounts;

/// Longest share name accepted in a request (names are validated at publish; this only
/// bounds what we look up).
const MAX_NAME: usize = 1024;

/// What the service needs to know about the server.
#[derive(Debug, Clone)]
pub struct ShareServiceConfig {
    /// The SIP domain (our accounts are `user@domain`).
    pub domain: String,
    /// `http://host:port` of the HTTP API: the offer's `server_url`.
    pub http_base: String,
    /// How long a registered sharer has to answer a relayed request before callvault answers
    /// on its behalf. Well under Timer F (32 s): a UDP requester gives up at Timer F itself,
    /// so waiting for the relay's own 408 would answer nobody.
    pub relay_deadline: Duration,
}

/// Default for [`ShareServiceConfig::relay_deadline`].
pub const RELAY_DEADLINE: Duration = Duration::from_secs(10);

/// A share-request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShareAsk {
    /// `{"name":"holiday.mp4"}`.
    Name(String),
    /// `{"list":true}`.
    List,
}

#[derive(Deserialize)]
struct RawAsk {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    list: Option<bool>,
}

/// Parses a share-request body; the error text is the `detail` of `400 malformed-request`.
pub fn parse_request(body: &[u8]) -> Result<ShareAsk, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("invalid share request: {e}"))?;
    // serde would take a struct from an array too; the contract is an object.
    if !value.is_object() {
        return Err("a share request is a JSON object".into());
    }
    let raw: RawAsk =
        serde_json::from_value(value).map_err(|e| format!("invalid share request: {e}"))?;
    match (raw.name, raw.list) {
        (Some(_), Some(true)) => Err("give either name or list, not both".into()),
        (None, Some(true)) => Ok(ShareAsk::List),
        (Some(n), _) if n.is_empty() || n.len() > MAX_NAME => {
            Err(format!("name must be 1 to {MAX_NAME} bytes"))
        }
        (Some(n), _) => Ok(ShareAsk::Name(n)),
        (None, _) => Err("a share request needs name or list:true".into()),
    }
}

/// What a sharer's final answer to a relayed request means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharerAnswer {
    /// `2xx` with `{"forward":true}`: the sharer forwards the request to the server.
    Forwarded,
    /// `403`: the sharer refuses (`403 share-denied` to the requester).
    Refused,
    /// Not reached (`408`, `480`), or a `2xx` from a terminal that does not forward (a plain
    /// softphone taking the MESSAGE): callvault answers on the sharer's behalf by policy.
    OnBehalf,
    /// Anything else is relayed to the requester as it is.
    Relay,
}

#[derive(Deserialize)]
struct ForwardBody {
    #[serde(default)]
    forward: bool,
}

pub fn classify_answer(status: u16, content_type: Option<&str>, body: &[u8]) -> SharerAnswer {
    match status {
        200..=299 => {
            // The content type is not checked: a terminal may label its JSON loosely.
            let _ = content_type;
            let forward = serde_json::from_slice::<ForwardBody>(body)
                .map(|b| b.forward)
                .unwrap_or(false);
            if forward {
                SharerAnswer::Forwarded
            } else {
                SharerAnswer::OnBehalf
            }
        }
        403 => SharerAnswer::Refused,
        408 | 480 => SharerAnswer::OnBehalf,
        _ => SharerAnswer::Relay,
    }
}

/// One entry of the `{"list":true}` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedShare {
    pub name: String,
    pub size: u64,
    pub content_id: String,
}

/// The `{"list":true}` answer body (`application/json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareList {
    /// The sharer's AOR.
    pub owner: String,
    pub shares: Vec<ListedShare>,
}

/// Where the offer goes: the requester's registered contacts when it is one of our users and
/// has any, else the address its request came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferTarget {
    /// Our account name, when the requester is `user@<domain>`.
    pub local_user: Option<String>,
    pub source: Peer,
    /// Request-URI for the fallback: the requester's From URI.
    pub uri: String,
}

/// Work for the engine, produced by the service's tasks.
#[derive(Debug)]
pub enum Command {
    Respond {
        tx: ServerTxId,
        status: u16,
        content_type: Option<&'static str>,
        body: Bytes,
    },
    Reject {
        tx: ServerTxId,
        code: ErrorCode,
        detail: String,
    },
    /// `200` to the requester, then the offer MESSAGE.
    Offer {
        tx: ServerTxId,
        target: OfferTarget,
        body: String,
    },
    /// The sharer did not answer within the relay deadline.
    RelayDeadline { tx: ServerTxId },
}

/// A named request, kept while the sharer is asked.
#[derive(Debug, Clone)]
struct Job {
    tx: ServerTxId,
    name: String,
    requester: String,
    sharer: String,
    target: OfferTarget,
}

/// Shared by the service and its tasks.
#[derive(Clone)]
struct Ctx {
    cfg: std::sync::Arc<ShareServiceConfig>,
    shares: Shares,
    accounts: Accounts,
    commands: mpsc::UnboundedSender<Command>,
}

impl Ctx {
    fn send(&self, c: Command) {
        // The core is gone only at shutdown; nothing left to do then.
        let _ = self.commands.send(c);
    }

    fn reject(&self, tx: ServerTxId, code: ErrorCode, detail: impl Into<String>) {
        self.send(Command::Reject {
            tx,
            code,
            detail: detail.into(),
        });
    }

    /// The requester as policy sees it: one of our subscribers when it is `user@<domain>`
    /// and that account exists (a digest user always is; a trusted peer's From may be).
    async fn requester(&self, requester: &str) -> Result<Option<Requester>, String> {
        let (user, host) = requester.rsplit_once('@').unwrap_or((requester, ""));
        let subscriber = if host.eq_ignore_ascii_case(&self.cfg.domain) {
            self.accounts
                .get(user)
                .await
                .map_err(|e| e.to_string())?
                .is_some()
        } else {
            false
        };
        Ok(Requester::from_uri(requester, subscriber, &self.cfg.domain))
    }

    async fn share(&self, job: &Job) -> Result<Option<Share>, String> {
        self.shares
            .get_by_name(&job.sharer, &job.name)
            .await
            .map_err(|e| e.to_string())
    }

    /// `holder`: the requester the policy allowed (its token is bound to it); None when the
    /// sharer consented (a token for the content).
    fn offer(&self, job: Job, share: &Share, holder: Option<Option<&Requester>>) {
        let offer = match holder {
            Some(r) => self.shares.offer_to(share, &self.cfg.http_base, r),
            None => self.shares.offer(share, &self.cfg.http_base),
        };
        match serde_json::to_string(&offer) {
            Ok(body) => {
                tracing::info!(requester = %job.requester, sharer = %job.sharer,
                    name = %job.name, content_id = %share.content_id, "share offered");
                self.send(Command::Offer {
                    tx: job.tx,
                    target: job.target,
                    body,
                });
            }
            Err(e) => self.reject(job.tx, ErrorCode::Internal, e.to_string()),
        }
    }

    fn unknown(&self, job: &Job) {
        self.reject(
            job.tx,
            ErrorCode::UnknownShare,
            format!("{} shares nothing named {:?}", job.sharer, job.name),
        );
    }

    /// Offers the share if it exists and may be fetched: by its policy when answering on the
    /// sharer's behalf, or unconditionally when the sharer forwarded the request (its consent
    /// stands in for the policy).
    async fn answer(self, job: Job, sharer_consented: bool) {
        let share = match self.share(&job).await {
            Err(e) => return self.reject(job.tx, ErrorCode::Internal, e),
            Ok(None) => return self.unknown(&job),
            Ok(Some(share)) => share,
        };
        if sharer_consented {
            return self.offer(job, &share, None);
        }
        let requester = match self.requester(&job.requester).await {
            Ok(r) => r,
            Err(e) => return self.reject(job.tx, ErrorCode::Internal, e),
        };
        if !self.shares.may_fetch(&share, requester.as_ref()) {
            return self.reject(
                job.tx,
                ErrorCode::ShareDenied,
                format!("{} may not fetch {:?}", job.requester, job.name),
            );
        }
        // Offered under the policy: the token names the requester and is checked against
        // the policy on every use.
        self.offer(job, &share, Some(requester.as_ref()));
    }

    async fn list(self, tx: ServerTxId, requester: String, sharer: String) {
        let result = async {
            let requester = self.requester(&requester).await?;
            self.shares
                .list_visible(&sharer, requester.as_ref())
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match result {
            Err(e) => self.reject(tx, ErrorCode::Internal, e),
            Ok(shares) => {
                let list = ShareList {
                    owner: format!("sip:{sharer}@{}", self.cfg.domain.to_ascii_lowercase()),
                    shares: shares
                        .into_iter()
                        .map(|s| ListedShare {
                            name: s.name,
                            size: s.size,
                            content_id: s.content_id,
                        })
                        .collect(),
                };
                match serde_json::to_vec(&list) {
                    Ok(body) => self.send(Command::Respond {
                        tx,
                        status: 200,
                        content_type: Some("application/json"),
                        body: Bytes::from(body),
                    }),
                    Err(e) => self.reject(tx, ErrorCode::Internal, e.to_string()),
                }
            }
        }
    }
}

pub struct ShareService {
    ctx: Ctx,
    /// Requests relayed to their sharer, by the requester's transaction.
    relayed: HashMap<ServerTxId, Job>,
}

impl ShareService {
    pub fn new(
        cfg: ShareServiceConfig,
        shares: Shares,
        accounts: Accounts,
    ) -> (ShareService, mpsc::UnboundedReceiver<Command>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let ctx = Ctx {
            cfg: std::sync::Arc::new(cfg),
            shares,
            accounts,
            commands: tx,
        };
        (
            ShareService {
                ctx,
                relayed: HashMap::new(),
            },
            rx,
        )
    }

    /// Requests waiting for their sharer's answer.
    pub fn relayed(&self) -> usize {
        self.relayed.len()
    }

    /// Reacts to an engine event: relays to the sharer right away (the engine is at hand),
    /// spawns the database work for everything else.
    pub fn on_event<M: MediaBackend>(
        &mut self,
        engine: &mut Engine<M>,
        ev: &EngineEvent,
        now: Instant,
    ) {
        match ev {
            EngineEvent::ShareRequest {
                tx,
                request,
                requester,
                sharer,
                registered,
                source,
            } => self.on_request(
                engine,
                *tx,
                request,
                requester,
                sharer,
                *registered,
                *source,
                now,
            ),
            EngineEvent::ShareRelayAnswered {
                tx,
                status,
                content_type,
                body,
            } => {
                let Some(job) = self.relayed.remove(tx) else {
                    return;
                };
                let answer = classify_answer(*status, content_type.as_deref(), body);
                tracing::info!(sharer = %job.sharer, status, ?answer, "sharer answered");
                match answer {
                    SharerAnswer::Forwarded => {
                        tokio::spawn(self.ctx.clone().answer(job, true));
                    }
                    SharerAnswer::OnBehalf => {
                        tokio::spawn(self.ctx.clone().answer(job, false));
                    }
                    SharerAnswer::Refused => engine.reject_request(
                        *tx,
                        ErrorCode::ShareDenied,
                        &format!("{} refused", job.sharer),
                        now,
                    ),
                    SharerAnswer::Relay => {
                        // A challenge from the sharer's terminal means nothing to the requester.
                        let status = if matches!(status, 401 | 407) {
                            403
                        } else {
                            *status
                        };
                        let ct = content_type.as_deref().filter(|_| !body.is_empty());
                        engine.respond_request(*tx, status, ct, body.clone(), now);
                    }
                }
            }
            _ => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_request<M: MediaBackend>(
        &mut self,
        engine: &mut Engine<M>,
        tx: ServerTxId,
        request: &Request,
        requester: &str,
        sharer: &str,
        registered: bool,
        source: Peer,
        now: Instant,
    ) {
        let ask = match parse_request(&request.body) {
            Ok(a) => a,
            Err(detail) => {
                return engine.reject_request(tx, ErrorCode::MalformedRequest, &detail, now);
            }
        };
        let name = match ask {
            ShareAsk::List => {
                let ctx = self.ctx.clone();
                tokio::spawn(ctx.list(tx, requester.to_string(), sharer.to_string()));
                return;
            }
            ShareAsk::Name(n) => n,
        };
        let (user, host) = requester.rsplit_once('@').unwrap_or((requester, ""));
        let local_user = host
            .eq_ignore_ascii_case(&self.ctx.cfg.domain)
            .then(|| user.to_string());
        let uri = request
            .from_hdr()
            .map(|f| {
                let mut u = f.uri.clone();
                u.params.clear();
                u.headers = None;
                u.to_string()
            })
            .unwrap_or_else(|| format!("sip:{requester}"));
        let job = Job {
            tx,
            name,
            requester: requester.to_string(),
            sharer: sharer.to_string(),
            target: OfferTarget {
                local_user,
                source,
                uri,
            },
        };
        if registered && engine.relay_share_request(tx, now) {
            tracing::info!(%requester, %sharer, name = %job.name, "share request relayed to the sharer");
            self.relayed.insert(tx, job);
            let ctx = self.ctx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(ctx.cfg.relay_deadline).await;
                ctx.send(Command::RelayDeadline { tx });
            });
            return;
        }
        tokio::spawn(self.ctx.clone().answer(job, false));
    }

    /// Applies a command to the engine.
    pub fn apply<M: MediaBackend>(&mut self, engine: &mut Engine<M>, cmd: Command, now: Instant) {
        match cmd {
            Command::Respond {
                tx,
                status,
                content_type,
                body,
            } => engine.respond_request(tx, status, content_type, body, now),
            Command::Reject { tx, code, detail } => engine.reject_request(tx, code, &detail, now),
            Command::RelayDeadline { tx } => {
                // Still unanswered: the sharer counts as unreachable. Its late answer finds
                // no job and is dropped.
                if let Some(job) = self.relayed.remove(&tx) {
                    tracing::info!(sharer = %job.sharer, "sharer did not answer in time");
                    tokio::spawn(self.ctx.clone().answer(job, false));
                }
            }
            Command::Offer { tx, target, body } => {
                engine.respond_request(tx, 200, None, Bytes::new(), now);
                let headers = [("Content-Type", wire::SHARE_OFFER)];
                let body = Bytes::from(body);
                let sent = match &target.local_user {
                    Some(user) => {
                        engine.send_to_user(user, Method::Message, &headers, body.clone(), now)
                    }
                    None => Vec::new(),
                };
                if sent.is_empty() {
                    engine.send_to_peer(
                        target.source,
                        &target.uri,
                        Method::Message,
                        &headers,
                        body,
                        now,
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bodies() {
        assert_eq!(
            parse_request(br#"{"name":"holiday.mp4"}"#),
            Ok(ShareAsk::Name("holiday.mp4".into()))
        );
        assert_eq!(parse_request(br#"{"list":true}"#), Ok(ShareAsk::List));
        // `list:false` next to a name is just the name; unknown fields are tolerated.
        assert_eq!(
            parse_request(br#"{"name":"a","list":false,"x":1}"#),
            Ok(ShareAsk::Name("a".into()))
        );
        for bad in [
            &b"not json"[..],
            b"",
            b"{}",
            br#"{"list":false}"#,
            br#"{"name":""}"#,
            br#"{"name":"a","list":true}"#,
            br#"{"name":7}"#,
            br#"["holiday.mp4"]"#,
        ] {
            assert!(
                parse_request(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!(r#"{{"name":"{}"}}"#, "a".repeat(MAX_NAME + 1));
        assert!(parse_request(long.as_bytes()).is_err());
    }

    #[test]
    fn sharer_answers() {
        let json = Some("application/json");
        assert_eq!(
            classify_answer(200, json, br#"{"forward":true}"#),
            SharerAnswer::Forwarded
        );
        assert_eq!(
            classify_answer(202, None, br#"{"forward":true}"#),
            SharerAnswer::Forwarded
        );
        // A 200 that does not forward (a softphone showing the text) leaves it to policy.
        assert_eq!(
            classify_answer(200, json, br#"{"forward":false}"#),
            SharerAnswer::OnBehalf
        );
        assert_eq!(classify_answer(200, None, b""), SharerAnswer::OnBehalf);
        assert_eq!(classify_answer(403, None, b""), SharerAnswer::Refused);
        assert_eq!(classify_answer(408, None, b""), SharerAnswer::OnBehalf);
        assert_eq!(classify_answer(480, None, b""), SharerAnswer::OnBehalf);
        for s in [404, 415, 486, 500, 503, 603] {
            assert_eq!(classify_answer(s, None, b""), SharerAnswer::Relay, "{s}");
        }
    }

    #[test]
    fn list_body_shape() {
        let l = ShareList {
            owner: "sip:1001@example.com".into(),
            shares: vec![ListedShare {
                name: "a.mp4".into(),
                size: 3,
                content_id: "ab".into(),
            }],
        };
        let v: serde_json::Value = serde_json::to_value(&l).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"owner":"sip:1001@example.com",
                "shares":[{"name":"a.mp4","size":3,"content_id":"ab"}]})
        );
    }
}
