//! `callvault peer serve` (PROTOCOL 3): registers the agent's UDP socket as the account's
//! contact (digest on a 401, re-registering at half the granted lifetime), answers share
//! requests relayed by callvault with `{"forward":true}` (or 403 with `--refuse`), and fetches
//! every share offer it receives into the downloads folder, printing one JSON line per fetch.
//!
//! The message handling ([`answer`], [`register_request`], [`granted_expires`]) is pure; the
//! loop in [`run_cli`] only moves datagrams and timers.

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::fetch::{advertised, fetch, random_peer_id, Announcer, FetchOptions, OfferBody};
use super::serve::PieceServer;
use super::{PeerError, ServeArgs};
use crate::sip::auth;
use crate::sip::message::{parse, HeaderAccess, Method, Request, Response, SipMessage};

pub const SHARE_REQUEST: &str = "application/vnd.callvault.share-request+json";
pub const SHARE_OFFER: &str = "application/vnd.callvault.share-offer+json";

/// REGISTER is resent this often until answered (UDP loses datagrams).
const REG_RETRANSMIT: Duration = Duration::from_millis(500);
/// A REGISTER unanswered this long is abandoned and tried again after [`REG_RETRY`].
const REG_TIMEOUT: Duration = Duration::from_secs(16);
const REG_RETRY: Duration = Duration::from_secs(10);
/// Answers kept for retransmitted requests.
const ANSWER_CACHE: usize = 256;

/// Who this agent is and where it is reached.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: String,
    pub domain: String,
    /// The local SIP socket (written into Via and Contact).
    pub local: SocketAddr,
}

impl Identity {
    pub fn aor(&self) -> String {
        format!("sip:{}@{}", self.user, self.domain)
    }
    pub fn registrar_uri(&self) -> String {
        format!("sip:{}", self.domain)
    }
    pub fn contact(&self) -> String {
        format!("<sip:{}@{}>", self.user, self.local)
    }
}

/// One REGISTER: the fields that change between sends.
#[derive(Debug, Clone)]
pub struct RegisterParams<'a> {
    pub call_id: &'a str,
    pub from_tag: &'a str,
    pub cseq: u32,
    pub branch: &'a str,
    pub expires: u32,
    pub authorization: Option<&'a str>,
}

/// The REGISTER of `id` (RFC 3261 10.2): same Call-ID and From tag for every refresh,
/// a new branch and CSeq per request.
pub fn register_request(id: &Identity, p: &RegisterParams<'_>) -> Request {
    let aor = id.aor();
    let mut req = Request::new(Method::Register, id.registrar_uri());
    req.headers.push(
        "Via",
        format!("SIP/2.0/UDP {};branch={};rport", id.local, p.branch),
    );
    req.headers.push("Max-Forwards", "70");
    req.headers
        .push("From", format!("<{aor}>;tag={}", p.from_tag));
    req.headers.push("To", format!("<{aor}>"));
    req.headers.push("Call-ID", p.call_id.to_string());
    req.headers.push("CSeq", format!("{} REGISTER", p.cseq));
    req.headers.push("Contact", id.contact());
    req.headers.push("Expires", p.expires.to_string());
    if let Some(a) = p.authorization {
        req.headers.push("Authorization", a.to_string());
    }
    req.headers.push("User-Agent", "callvault-peer");
    req
}

/// The lifetime the registrar granted our contact: its `expires` param in the 200's Contact
/// list, else the Expires header, else what we asked for.
pub fn granted_expires(resp: &Response, id: &Identity, asked: u32) -> u32 {
    let ours = format!("{}", id.local);
    resp.contacts()
        .iter()
        .find(|c| c.uri.to_string().contains(&ours))
        .and_then(|c| c.to_string().split(';').find_map(expires_param))
        .or_else(|| resp.expires())
        .unwrap_or(asked)
}

fn expires_param(p: &str) -> Option<u32> {
    let (k, v) = p.trim().split_once('=')?;
    if k.trim().eq_ignore_ascii_case("expires") {
        v.trim().trim_matches('"').parse().ok()
    } else {
        None
    }
}

/// The `Authorization` for a 401/407 to a REGISTER: the first challenge we can answer
/// (callvault lists the strongest first).
pub fn answer_challenge(
    resp: &Response,
    user: &str,
    password: &str,
    uri: &str,
    cnonce: &str,
) -> Result<String, PeerError> {
    let mut last = String::from("no challenge in the 401");
    for v in resp
        .headers
        .get_all("WWW-Authenticate")
        .chain(resp.headers.get_all("Proxy-Authenticate"))
    {
        match auth::Challenge::parse(v) {
            Ok(_) => match auth::respond(v, user, password, "REGISTER", uri, cnonce, 1) {
                Ok(a) => return Ok(a),
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
    }
    Err(PeerError::Sip(last))
}

/// What an incoming request asks of the agent.
#[derive(Debug)]
pub enum Inbound {
    /// Answer and nothing else.
    Answered(Response),
    /// Answered 200; fetch this offer.
    Offer(Response, Box<OfferBody>),
    /// ACK: no answer.
    Ignore,
}

/// Answers an incoming request (`tag` is the To tag for out-of-dialog answers).
pub fn answer(req: &Request, refuse: bool, tag: &str) -> Inbound {
    let reply = |status: u16| {
        let mut r = req.response(status, None);
        r.ensure_to_tag(tag);
        r
    };
    match req.method {
        Method::Ack => Inbound::Ignore,
        Method::Message => match req.content_type().as_deref() {
            Some(SHARE_REQUEST) => {
                tracing::info!(
                    from = ?req.headers.get("From"),
                    body = %String::from_utf8_lossy(&req.body),
                    refuse,
                    "share-request"
                );
                if refuse {
                    return Inbound::Answered(reply(403));
                }
                let mut r = reply(200);
                r.headers.push("Content-Type", "application/json");
                r.body = Bytes::from_static(br#"{"forward":true}"#);
                Inbound::Answered(r)
            }
            Some(SHARE_OFFER) => match serde_json::from_slice::<OfferBody>(&req.body) {
                Ok(o) => Inbound::Offer(reply(200), Box::new(o)),
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable share offer");
                    Inbound::Answered(reply(400))
                }
            },
            // Other messages (prompts, ready notes, text) are acknowledged and logged.
            _ => {
                tracing::info!(
                    content_type = ?req.content_type(),
                    body = %String::from_utf8_lossy(&req.body),
                    "MESSAGE"
                );
                Inbound::Answered(reply(200))
            }
        },
        Method::Options => Inbound::Answered(reply(200)),
        _ => {
            let mut r = reply(405);
            r.headers.push("Allow", "MESSAGE, OPTIONS");
            Inbound::Answered(r)
        }
    }
}

/// The file an offer is written to: its name's last path component, else the content id.
pub fn download_path(dir: &Path, offer: &OfferBody) -> PathBuf {
    let name = offer
        .name
        .as_deref()
        .and_then(|n| n.rsplit(['/', '\\']).next())
        .filter(|n| !n.is_empty() && *n != "." && *n != ".." && !n.contains('\0'))
        .unwrap_or(&offer.content_id);
    dir.join(name)
}

fn token() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Registration progress.
struct Reg {
    call_id: String,
    from_tag: String,
    cseq: u32,
    /// The request in flight: branch, bytes, first sent, next resend.
    pending: Option<(String, Vec<u8>, Instant, Instant)>,
    /// The challenge was answered once for this attempt (a second 401 is a bad password).
    authed: bool,
    next_register: Instant,
}

/// `callvault peer serve`.
pub async fn run_cli(a: ServeArgs) -> Result<(), PeerError> {
    let target = tokio::net::lookup_host(&a.sip)
        .await
        .map_err(|e| PeerError::Usage(format!("--sip {}: {e}", a.sip)))?
        .next()
        .ok_or_else(|| PeerError::Usage(format!("--sip {}: no address", a.sip)))?;
    let domain = a.domain.clone().unwrap_or_else(|| target.ip().to_string());
    let sock = UdpSocket::bind(&a.bind)
        .await
        .map_err(|e| PeerError::Listen(format!("{}: {e}", a.bind)))?;
    let local = sock.local_addr()?;
    let id = Identity {
        user: a.user.clone(),
        domain,
        local,
    };
    std::fs::create_dir_all(&a.downloads)?;
    let pieces = PieceServer::new(false);
    let advertise = advertised(None, pieces.spawn(&a.listen).await?)?;
    let peer_id = random_peer_id();
    tracing::info!(aor = %id.aor(), sip = %local, pieces = %advertise, "peer serve");

    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<Announcer>(16);
    // Announcers stay alive so fetched content keeps being served to other peers.
    let mut seeding: Vec<Announcer> = Vec::new();
    let mut answers: HashMap<String, Vec<u8>> = HashMap::new();
    let mut answer_order: VecDeque<String> = VecDeque::new();
    let mut reg = Reg {
        call_id: format!("{}@{}", token(), local.ip()),
        from_tag: token(),
        cseq: 0,
        pending: None,
        authed: false,
        next_register: Instant::now(),
    };
    let mut buf = vec![0u8; 65536];
    loop {
        let now = Instant::now();
        if reg.pending.is_none() && now >= reg.next_register {
            reg.authed = false;
            send_register(&sock, target, &id, &mut reg, a.expires, None).await?;
        }
        let wake = match &reg.pending {
            Some((_, _, _, resend)) => *resend,
            None => reg.next_register,
        };
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let (n, from) = match r {
                    Ok(x) => x,
                    // ICMP errors from an earlier send surface here on some systems.
                    Err(e) => { tracing::debug!(error = %e, "recv"); continue; }
                };
                let msg = match parse(&buf[..n]) {
                    Ok(m) => m,
                    Err(e) => { tracing::debug!(%from, error = %e, "unparsable datagram"); continue; }
                };
                match msg {
                    SipMessage::Response(resp) => {
                        on_register_response(&sock, target, &id, &mut reg, &a, resp).await?;
                    }
                    SipMessage::Request(req) => {
                        let branch = req.top_via().and_then(|v| v.branch().map(str::to_string));
                        if let Some(bytes) = branch.as_ref().and_then(|b| answers.get(b)) {
                            sock.send_to(bytes, from).await?;
                            continue;
                        }
                        let (resp, offer) = match answer(&req, a.refuse, &token()) {
                            Inbound::Ignore => continue,
                            Inbound::Answered(r) => (r, None),
                            Inbound::Offer(r, o) => (r, Some(o)),
                        };
                        let bytes = resp.to_bytes();
                        sock.send_to(&bytes, from).await?;
                        if let Some(b) = branch {
                            if answer_order.len() >= ANSWER_CACHE {
                                if let Some(old) = answer_order.pop_front() {
                                    answers.remove(&old);
                                }
                            }
                            answer_order.push_back(b.clone());
                            answers.insert(b, bytes);
                        }
                        if let Some(offer) = offer {
                            start_fetch(&a, *offer, &pieces, &advertise, &peer_id, done_tx.clone());
                        }
                    }
                }
            }
            Some(ann) = done_rx.recv() => seeding.push(ann),
            _ = tokio::time::sleep_until(wake) => {
                if let Some((_, bytes, first, resend)) = &mut reg.pending {
                    if now.duration_since(*first) >= REG_TIMEOUT {
                        tracing::warn!(registrar = %target, "REGISTER not answered");
                        reg.pending = None;
                        reg.next_register = Instant::now() + REG_RETRY;
                    } else {
                        sock.send_to(bytes, target).await?;
                        *resend = Instant::now() + REG_RETRANSMIT;
                    }
                }
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    drop(seeding);
    Ok(())
}

async fn send_register(
    sock: &UdpSocket,
    target: SocketAddr,
    id: &Identity,
    reg: &mut Reg,
    expires: u32,
    authorization: Option<&str>,
) -> Result<(), PeerError> {
    reg.cseq += 1;
    let branch = format!("z9hG4bK{}", token());
    let req = register_request(
        id,
        &RegisterParams {
            call_id: &reg.call_id,
            from_tag: &reg.from_tag,
            cseq: reg.cseq,
            branch: &branch,
            expires,
            authorization,
        },
    );
    let bytes = req.to_bytes();
    sock.send_to(&bytes, target).await?;
    let now = Instant::now();
    reg.pending = Some((branch, bytes, now, now + REG_RETRANSMIT));
    Ok(())
}

async fn on_register_response(
    sock: &UdpSocket,
    target: SocketAddr,
    id: &Identity,
    reg: &mut Reg,
    a: &ServeArgs,
    resp: Response,
) -> Result<(), PeerError> {
    let ours = match (&reg.pending, resp.top_via()) {
        (Some((b, ..)), Some(v)) => v.branch() == Some(b.as_str()),
        _ => false,
    };
    if !ours || resp.is_provisional() {
        return Ok(());
    }
    reg.pending = None;
    match resp.status {
        200..=299 => {
            let granted = granted_expires(&resp, id, a.expires).max(2);
            tracing::info!(aor = %id.aor(), contact = %id.contact(), expires = granted, "registered");
            // Refresh at half the lifetime, so a lost refresh still has time to be retried.
            reg.next_register = Instant::now() + Duration::from_secs(u64::from(granted / 2).max(1));
        }
        401 | 407 if !reg.authed => {
            match answer_challenge(&resp, &a.user, &a.password, &id.registrar_uri(), &token()) {
                Ok(authz) => {
                    reg.authed = true;
                    send_register(sock, target, id, reg, a.expires, Some(&authz)).await?;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot answer the challenge");
                    reg.next_register = Instant::now() + REG_RETRY;
                }
            }
        }
        s => {
            tracing::warn!(status = s, reason = %resp.reason, "REGISTER refused");
            reg.next_register = Instant::now() + REG_RETRY;
        }
    }
    Ok(())
}

fn start_fetch(
    a: &ServeArgs,
    mut offer: OfferBody,
    pieces: &PieceServer,
    advertise: &str,
    peer_id: &str,
    done: tokio::sync::mpsc::Sender<Announcer>,
) {
    if let Some(s) = &a.server {
        offer.server_url = s.clone();
    }
    let out = download_path(&a.downloads, &offer);
    let o = FetchOptions::from_offer(&offer, out, peer_id);
    let pieces = pieces.clone();
    let advertise = advertise.to_string();
    tokio::spawn(async move {
        tracing::info!(content = %o.content_id, out = %o.out.display(), "fetching offer");
        match fetch(&o, &pieces, &advertise).await {
            Ok((report, ann)) => {
                if let Ok(line) = serde_json::to_string(&report) {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                }
                let _ = done.send(ann).await;
            }
            Err(e) => tracing::warn!(content = %o.content_id, error = %e, "fetch failed"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity {
            user: "1001".into(),
            domain: "example.com".into(),
            local: "127.0.0.1:40000".parse().unwrap(),
        }
    }

    fn message(ct: &str, body: &str) -> Request {
        let raw = format!(
            "MESSAGE sip:1001@127.0.0.1:40000 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKx\r\n\
             From: <sip:1002@example.com>;tag=a\r\nTo: <sip:1001@example.com>\r\nCall-ID: c1\r\n\
             CSeq: 1 MESSAGE\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        match parse(raw.as_bytes()).unwrap() {
            SipMessage::Request(r) => r,
            _ => panic!("not a request"),
        }
    }

    #[test]
    fn share_request_is_forwarded_or_refused() {
        let req = message(SHARE_REQUEST, r#"{"name":"a.bin"}"#);
        let Inbound::Answered(r) = answer(&req, false, "t1") else {
            panic!("want an answer")
        };
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type().as_deref(), Some("application/json"));
        assert_eq!(&r.body[..], br#"{"forward":true}"#);
        assert_eq!(r.to_tag().as_deref(), Some("t1"));
        assert_eq!(r.call_id(), Some("c1"));
        let Inbound::Answered(r) = answer(&req, true, "t1") else {
            panic!("want an answer")
        };
        assert_eq!(r.status, 403);
    }

    #[test]
    fn offer_is_accepted_and_parsed_bad_offer_is_400() {
        let cid = "ab".repeat(32);
        let req = message(
            SHARE_OFFER,
            &format!(
                r#"{{"content_id":"{cid}","server_url":"http://127.0.0.1:1","name":"../x.bin","token":"t"}}"#
            ),
        );
        let Inbound::Offer(r, o) = answer(&req, false, "t") else {
            panic!("want an offer")
        };
        assert_eq!(r.status, 200);
        assert_eq!(o.content_id, cid);
        assert_eq!(download_path(Path::new("/d"), &o), Path::new("/d/x.bin"));
        let mut nameless = (*o).clone();
        nameless.name = Some("..".into());
        assert_eq!(
            download_path(Path::new("/d"), &nameless),
            Path::new("/d").join(&cid)
        );
        let Inbound::Answered(r) = answer(&message(SHARE_OFFER, "{"), false, "t") else {
            panic!("want an answer")
        };
        assert_eq!(r.status, 400);
    }

    #[test]
    fn register_answers_the_digest_challenge() {
        let id = id();
        let req = register_request(
            &id,
            &RegisterParams {
                call_id: "c",
                from_tag: "f",
                cseq: 1,
                branch: "z9hG4bKb",
                expires: 300,
                authorization: None,
            },
        );
        assert_eq!(req.uri, "sip:example.com");
        assert_eq!(
            req.headers.get("Contact"),
            Some("<sip:1001@127.0.0.1:40000>")
        );
        let mut r401 = req.response(401, None);
        r401.headers.push(
            "WWW-Authenticate",
            r#"Digest realm="example.com", nonce="n1", algorithm=MD5, qop="auth""#,
        );
        let authz = answer_challenge(&r401, "1001", "pw", "sip:example.com", "cn").unwrap();
        let c = auth::Credentials::parse(&authz).unwrap();
        assert_eq!((c.nc, c.qop.as_deref()), (Some(1), Some("auth")));
        let h1 = auth::ha1(auth::Algorithm::Md5, "1001", "example.com", "pw");
        let want = auth::compute_response(
            auth::Algorithm::Md5,
            &h1,
            "n1",
            1,
            "cn",
            "REGISTER",
            "sip:example.com",
        );
        assert_eq!(c.response, want);
        assert!(answer_challenge(&req.response(401, None), "1001", "pw", "u", "c").is_err());

        let mut ok = req.response(200, None);
        ok.headers
            .push("Contact", "<sip:1001@127.0.0.1:40000>;expires=120");
        assert_eq!(granted_expires(&ok, &id, 300), 120);
        let mut ok = req.response(200, None);
        ok.headers.push("Expires", "60");
        assert_eq!(granted_expires(&ok, &id, 300), 60);
        assert_eq!(granted_expires(&req.response(200, None), &id, 300), 300);
    }
}
