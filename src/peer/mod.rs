//! `callvault peer`, the terminal agent (PROTOCOL 3, last bullet): fetches offered content
//! in pieces from the server and from other agents ([`fetch`], choosing per piece with
//! [`crate::share::select`] through the sans-IO [`plan::Scheduler`]), serves the pieces it
//! holds ([`serve`]), publishes a folder ([`publish`]) and, as `peer serve`, registers over
//! SIP and answers share requests ([`sip`]).

pub mod fetch;
pub mod http;
pub mod plan;
pub mod publish;
pub mod serve;
pub mod sip;
pub mod state;
pub mod terminals;

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::share::select::SourceClass;

pub use fetch::{FetchOptions, FetchReport};

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("bad URL {0:?} (want http(s)://host[:port][/path])")]
    BadUrl(String),
    #[error("{0}")]
    Http(String),
    #[error("{what}: {detail}")]
    Server { what: String, detail: String },
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("listen on {0}")]
    Listen(String),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("SIP: {0}")]
    Sip(String),
    #[error(transparent)]
    Dht(#[from] crate::share::dht::DhtError),
}

/// `callvault peer ...`.
#[derive(Debug, Subcommand)]
pub enum PeerCmd {
    /// Fetch offered content in pieces from the server and other peers, serving what it holds.
    Fetch(Box<FetchArgs>),
    /// Publish the new files of a folder as shares (PUT /v1/shares/{user}/{name}).
    Share(ShareArgs),
    /// Register over SIP, answer share requests and fetch the offers that arrive.
    Serve(ServeArgs),
}

#[derive(Debug, Clone, Args)]
pub struct FetchArgs {
    /// The server's base URL, e.g. http://127.0.0.1:8080 (the offer's server_url).
    #[arg(long)]
    pub server: Option<String>,
    /// The content id (the offer's content_id).
    #[arg(long)]
    pub content: Option<String>,
    /// The offer's token.
    #[arg(long)]
    pub token: Option<String>,
    /// An offer JSON file (share-offer body) instead of --server/--content/--token.
    #[arg(long, value_name = "FILE")]
    pub offer: Option<PathBuf>,
    /// Which index finds holders: `server` (the index at the offer's index_url, or
    /// {server}/v1/index/{content}), `terminals` (a DHT among the agents plus their
    /// bitfields, claim 8), or an index URL [default: what the offer says].
    #[arg(long, value_name = "server|terminals|URL")]
    pub index: Option<String>,
    /// DHT nodes (`ip:port`) to bootstrap from with the terminal index, besides the
    /// offer's `dht_bootstrap`.
    #[arg(long, value_delimiter = ',')]
    pub dht_bootstrap: Vec<String>,
    /// Account credentials instead of a token (HTTP Basic).
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long)]
    pub password: Option<String>,
    #[command(flatten)]
    pub password_from: PasswordFrom,
    /// Output file.
    #[arg(long)]
    pub out: PathBuf,
    /// Where to serve pieces to other peers.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// The host:port announced to the index [default: the bound --listen address].
    #[arg(long)]
    pub advertise: Option<String>,
    /// This peer's id in the index [default: random].
    #[arg(long)]
    pub peer_id: Option<String>,
    /// Pieces fetched at once.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Directory for resume state (a fetch interrupted and rerun continues).
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Keep serving pieces after completion until killed.
    #[arg(long)]
    pub seed: bool,
    /// Keep serving this many seconds after completion.
    #[arg(long, value_name = "SECS")]
    pub linger: Option<u64>,
    /// Ignore other peers: every piece from the server (baseline for benchmarks).
    #[arg(long)]
    pub server_only: bool,
    /// Print the final report as JSON on stdout (progress goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
    /// Test mode: serve every piece with wrong bytes.
    #[arg(long, hide = true)]
    pub corrupt_pieces: bool,
    /// What this agent announces itself as: peer, or mobile (a mobile uplink; fetchers
    /// weigh it by the operator's mobile weight).
    #[arg(long, default_value = "peer", value_parser = parse_class)]
    pub class: SourceClass,
}

/// `--class`: `peer` or `mobile`.
pub fn parse_class(s: &str) -> Result<SourceClass, String> {
    SourceClass::parse_announced(s).ok_or_else(|| format!("{s:?}: want peer or mobile"))
}

/// SIP transport of `peer serve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SipTransport {
    Udp,
    Tcp,
}

#[derive(Debug, Clone, Args)]
pub struct ShareArgs {
    /// The server's base URL.
    #[arg(long)]
    pub server: String,
    #[arg(long)]
    pub user: String,
    /// The account's password (or --password-file / --password-env).
    #[arg(long, default_value = "", hide_default_value = true)]
    pub password: String,
    #[command(flatten)]
    pub password_from: PasswordFrom,
    /// The folder whose files are shared.
    #[arg(long)]
    pub folder: PathBuf,
    /// public, subscribers or a comma-separated list of AORs [default: the server's default].
    #[arg(long)]
    pub policy: Option<String>,
    /// Keep watching the folder, publishing new or changed files.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between folder scans with --watch.
    #[arg(long, default_value_t = 5)]
    pub interval: u64,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// callvault's SIP address.
    #[arg(long, default_value = "127.0.0.1:5060")]
    pub sip: String,
    /// SIP transport to callvault: requests for this agent come back on the same UDP
    /// socket or TCP connection.
    #[arg(long, value_enum, default_value = "udp")]
    pub transport: SipTransport,
    #[arg(long)]
    pub user: String,
    /// The account's password (or --password-file / --password-env).
    #[arg(long, default_value = "", hide_default_value = true)]
    pub password: String,
    #[command(flatten)]
    pub password_from: PasswordFrom,
    /// SIP domain [default: the host of --sip].
    #[arg(long)]
    pub domain: Option<String>,
    /// Local SIP address to bind.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub bind: String,
    /// Where fetched offers are written (as `DIR/<name>`).
    #[arg(long, alias = "out-dir", default_value = ".")]
    pub downloads: PathBuf,
    /// Server base URL used for fetches instead of the offer's `server_url`.
    #[arg(long)]
    pub server: Option<String>,
    /// Where to serve pieces to other peers.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// Registration lifetime asked for, seconds.
    #[arg(long, default_value_t = 300)]
    pub expires: u32,
    /// Refuse share requests (answer 403) instead of forwarding them.
    #[arg(long)]
    pub refuse: bool,
    /// What this agent announces itself as when it fetches: peer or mobile.
    #[arg(long, default_value = "peer", value_parser = parse_class)]
    pub class: SourceClass,
    /// Which index finds holders [default: what each offer says].
    #[arg(long, value_enum)]
    pub index: Option<IndexArg>,
    /// DHT nodes (`ip:port`) to bootstrap from with the terminal index, besides the
    /// offer's `dht_bootstrap`.
    #[arg(long, value_delimiter = ',')]
    pub dht_bootstrap: Vec<String>,
}

/// `peer serve --index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IndexArg {
    /// The offer's index_url (serve's index or the `callvault index` role).
    Server,
    /// The agents' own index: a DHT plus their bitfields (claim 8).
    Terminals,
}

impl IndexArg {
    pub fn as_str(self) -> &'static str {
        match self {
            IndexArg::Server => "server",
            IndexArg::Terminals => "terminals",
        }
    }
}

/// `--password-file` / `--password-env`: the password kept off the command line, which `ps`
/// shows to every user (PROTOCOL.md section 7, "Secrets").
#[derive(Debug, Clone, Default, Args)]
pub struct PasswordFrom {
    /// Read the password from FILE (without one trailing newline).
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Read the password from the environment variable VAR.
    #[arg(long, value_name = "VAR")]
    pub password_env: Option<String>,
}

impl PasswordFrom {
    /// The password: `literal` (None or empty when not given), else the file or variable.
    fn resolve(&self, literal: Option<&str>) -> Result<Option<String>, PeerError> {
        crate::secret::resolve(
            "password",
            literal.filter(|p| !p.is_empty()),
            self.password_file.as_deref(),
            self.password_env.as_deref(),
        )
        .map_err(|e| PeerError::Usage(e.to_string()))
    }

    /// A required password (`share`, `serve`).
    fn require(&self, literal: &str) -> Result<String, PeerError> {
        self.resolve(Some(literal))?.ok_or_else(|| {
            PeerError::Usage("give --password, --password-file or --password-env".into())
        })
    }
}

/// Runs a `peer` subcommand (the binary's dispatch).
pub async fn run(cmd: PeerCmd) -> Result<(), PeerError> {
    match cmd {
        PeerCmd::Fetch(mut a) => {
            a.password = a.password_from.resolve(a.password.as_deref())?;
            fetch::run_cli(*a).await
        }
        PeerCmd::Share(mut a) => {
            a.password = a.password_from.require(&a.password)?;
            publish::run_cli(a).await
        }
        PeerCmd::Serve(mut a) => {
            a.password = a.password_from.require(&a.password)?;
            sip::run_cli(a).await
        }
    }
}
