//! The `callvault` command line (PROTOCOL.md section 4).

// Bad input gets an error, never a panic: no unwrap/expect outside tests (an infallible case
// says why in an `#[allow]`).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use callvault::config::{parse_bytes, Config, PromptFormat};
use callvault::secret::{self, SecretError};
use callvault::storage::{AccountError, Accounts, Db};

#[derive(Debug, Parser)]
#[command(
    name = "callvault",
    version,
    about = "SIP B2BUA with anchored media and in-call network storage"
)]
struct Cli {
    /// Config file [default: config/callvault.toml, defaults when missing].
    #[arg(long, global = true, value_name = "FILE", env = "CALLVAULT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the registrar, B2BUA, storage platform and HTTP API.
    Serve,
    /// Manage subscriber accounts.
    #[command(subcommand)]
    Account(AccountCmd),
    /// Shared data (PROTOCOL section 3).
    #[command(subcommand)]
    Share(ShareCmd),
    /// The terminal agent: fetch in pieces from server and peers, share a folder, serve.
    #[command(subcommand)]
    Peer(callvault::peer::PeerCmd),
    /// The piece index as a role of its own, on index.listen (same database as serve; set
    /// index.url for serve and the peers to use it).
    Index,
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCmd),
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Load the config (file, defaults, environment), check it, and print the effective
    /// config as TOML with secrets masked. Exits 2 with the reason when it is invalid.
    Check,
}

#[derive(Debug, Subcommand)]
enum ShareCmd {
    /// Publish a file as USER's share (replaces a share of the same name); prints its JSON.
    Publish {
        user: String,
        path: PathBuf,
        /// Share name [default: the file's name].
        #[arg(long)]
        name: Option<String>,
        /// public, subscribers (default) or a comma-separated list of AORs.
        #[arg(long, default_value = "subscribers")]
        policy: String,
    },
}

#[derive(Debug, Subcommand)]
enum AccountCmd {
    /// Create an account.
    Add {
        user: String,
        #[command(flatten)]
        secrets: SecretArgs,
        /// Storage quota, e.g. 50MiB, 1GiB, 52428800.
        #[arg(long, value_parser = quantity)]
        quota: u64,
        #[arg(long, value_parser = prompt_format)]
        prompt_format: Option<PromptFormat>,
    },
    /// One line per account.
    List,
    /// The account as JSON.
    Show { user: String },
    /// Change an account.
    Set(SetArgs),
    /// Delete an account.
    Remove { user: String },
}

#[derive(Debug, Args)]
struct SetArgs {
    user: String,
    #[command(flatten)]
    secrets: SecretArgs,
    /// New quota, e.g. 50MiB; may be below what is used (free space is then 0).
    #[arg(long, value_parser = quantity)]
    quota: Option<u64>,
    /// text or json; `default` goes back to the server's store.prompt_format.
    #[arg(long, value_parser = prompt_format_or_default)]
    prompt_format: Option<FormatChoice>,
    /// Default store threshold: `percent:30`, `bytes:48000`, `adaptive`; `default` goes back to
    /// the server's store.threshold_percent.
    #[arg(long, value_parser = threshold_or_default)]
    threshold: Option<ThresholdChoice>,
    /// Cap on this account's byte thresholds (bytes, e.g. 48000 or 1MiB; tightens the server's
    /// store.threshold_max_bytes); `default` removes it.
    #[arg(long, value_parser = limit_or_default)]
    threshold_max_bytes: Option<LimitChoice>,
}

/// `--threshold-max-bytes` of `set`: a size, or `default` for none.
#[derive(Debug, Clone, Copy)]
struct LimitChoice(Option<u64>);

fn limit_or_default(s: &str) -> Result<LimitChoice, String> {
    if s == "default" {
        return Ok(LimitChoice(None));
    }
    callvault::config::parse_bytes(s)
        .map(|n| LimitChoice(Some(n)))
        .map_err(|e| e.to_string())
}

/// The account's password and PIN, each as a literal (visible in `ps`), a file (one trailing
/// newline dropped) or an environment variable (PROTOCOL.md section 7, "Secrets").
#[derive(Debug, Args)]
struct SecretArgs {
    /// SIP password (digest and HTTP); `set` recomputes the digest secrets for sip.domain.
    #[arg(long)]
    password: Option<String>,
    /// Read the password from FILE (without one trailing newline).
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// Read the password from the environment variable VAR.
    #[arg(long, value_name = "VAR")]
    password_env: Option<String>,
    /// Storage PIN (digits).
    #[arg(long)]
    pin: Option<String>,
    /// Read the PIN from FILE (without one trailing newline).
    #[arg(long, value_name = "FILE")]
    pin_file: Option<PathBuf>,
    /// Read the PIN from the environment variable VAR.
    #[arg(long, value_name = "VAR")]
    pin_env: Option<String>,
}

impl SecretArgs {
    /// `(password, pin)`, each None when not given.
    fn resolve(&self) -> Result<(Option<String>, Option<String>), SecretError> {
        let password = secret::resolve(
            "password",
            self.password.as_deref(),
            self.password_file.as_deref(),
            self.password_env.as_deref(),
        )?;
        let pin = secret::resolve(
            "pin",
            self.pin.as_deref(),
            self.pin_file.as_deref(),
            self.pin_env.as_deref(),
        )?;
        Ok((password, pin))
    }
}

/// `--threshold` of `set` (newtype for the same reason as [`FormatChoice`]).
#[derive(Debug, Clone, Copy)]
struct ThresholdChoice(Option<callvault::storage::threshold::Threshold>);

fn threshold_or_default(s: &str) -> Result<ThresholdChoice, String> {
    if s == "default" {
        Ok(ThresholdChoice(None))
    } else {
        s.parse()
            .map(|t| ThresholdChoice(Some(t)))
            .map_err(|e: callvault::storage::threshold::ThresholdError| e.to_string())
    }
}

fn quantity(s: &str) -> Result<u64, String> {
    parse_bytes(s).map_err(|e| e.to_string())
}

fn prompt_format(s: &str) -> Result<PromptFormat, String> {
    s.parse()
}

/// `--prompt-format` of `set`: a format, or None for the server default. A newtype because
/// clap reads `Option<Option<T>>` as "flag with an optional value".
#[derive(Debug, Clone, Copy)]
struct FormatChoice(Option<PromptFormat>);

fn prompt_format_or_default(s: &str) -> Result<FormatChoice, String> {
    if s == "default" {
        Ok(FormatChoice(None))
    } else {
        s.parse().map(|f| FormatChoice(Some(f)))
    }
}

fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    // One line, whatever the error text contains.
    let text = msg.to_string().replace('\n', " ");
    eprintln!("callvault: {text}");
    ExitCode::from(code)
}

fn load_config(path: Option<&Path>) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| fail(e, 2))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The config says how to log; its own errors go to stderr as one line (`fail`).
    // Exactly one rustls crypto provider, before any TLS is set up (DESIGN.md).
    callvault::transport::tls::install_crypto_provider();
    let config = match load_config(cli.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    callvault::logging::init(&config.log);
    match cli.command {
        Command::Serve => match callvault::server::run_from(config, cli.config.clone()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e, 1),
        },
        Command::Account(cmd) => match account(&config, cmd).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(format!("{e:#}"), 1),
        },
        Command::Share(cmd) => match share(&config, cmd).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(format!("{e:#}"), 1),
        },
        Command::Config(ConfigCmd::Check) => match config.masked_toml() {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e, 1),
        },
        Command::Index => match callvault::http::index_role::run(config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e, 1),
        },
        Command::Peer(cmd) => match callvault::peer::run(cmd).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e, 1),
        },
    }
}

async fn account(config: &Config, cmd: AccountCmd) -> anyhow::Result<()> {
    let db = Db::open(&config.storage.metadata).await?;
    let accounts = Accounts::new(db.clone(), config.sip.domain.clone());
    let result = account_cmd(&accounts, cmd).await;
    db.close().await;
    result
}

async fn account_cmd(accounts: &Accounts, cmd: AccountCmd) -> anyhow::Result<()> {
    match cmd {
        AccountCmd::Add {
            user,
            secrets,
            quota,
            prompt_format,
        } => {
            let (Some(password), Some(pin)) = secrets.resolve()? else {
                anyhow::bail!(
                    "account add needs a password (--password, --password-file or \
                     --password-env) and a PIN (--pin, --pin-file or --pin-env)"
                );
            };
            accounts.add(&user, &password, &pin, quota).await?;
            if prompt_format.is_some() {
                accounts.set_prompt_format(&user, prompt_format).await?;
            }
            tracing::info!(user, quota, "account added");
        }
        AccountCmd::List => {
            for a in accounts.list().await? {
                let v = a.view();
                println!(
                    "{} quota_bytes={} used_bytes={} reserved_bytes={} free_bytes={}",
                    v.user, v.quota_bytes, v.used_bytes, v.reserved_bytes, v.free_bytes
                );
            }
        }
        AccountCmd::Show { user } => {
            let a = accounts.require(&user).await?;
            println!("{}", serde_json::to_string(&a.view())?);
        }
        AccountCmd::Set(args) => {
            // Check everything first so a bad value changes nothing.
            let (password, pin) = args.secrets.resolve()?;
            accounts.require(&args.user).await?;
            if let Some(pin) = &pin {
                callvault::storage::accounts::validate_pin(pin)?;
            }
            if password.as_deref() == Some("") {
                return Err(AccountError::InvalidPassword.into());
            }
            if let Some(pin) = &pin {
                accounts.set_pin(&args.user, pin).await?;
            }
            if let Some(q) = args.quota {
                accounts.set_quota(&args.user, q).await?;
            }
            if let Some(pw) = &password {
                accounts.set_password(&args.user, pw).await?;
            }
            if let Some(FormatChoice(f)) = args.prompt_format {
                accounts.set_prompt_format(&args.user, f).await?;
            }
            if let Some(ThresholdChoice(t)) = args.threshold {
                accounts.set_threshold(&args.user, t).await?;
            }
            if let Some(LimitChoice(n)) = args.threshold_max_bytes {
                accounts.set_threshold_max_bytes(&args.user, n).await?;
            }
        }
        AccountCmd::Remove { user } => {
            accounts.remove(&user).await?;
            tracing::info!(user, "account removed");
        }
    }
    Ok(())
}

async fn share(config: &Config, cmd: ShareCmd) -> anyhow::Result<()> {
    let ShareCmd::Publish {
        user,
        path,
        name,
        policy,
    } = cmd;
    let name = match name {
        Some(n) => n,
        None => path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .ok_or_else(|| {
                anyhow::anyhow!("{}: no usable file name; give --name", path.display())
            })?,
    };
    // Check the arguments before touching the database or the file.
    callvault::share::manifest::validate_name(&name)?;
    let policy = callvault::share::Policy::parse(&policy, &config.sip.domain)?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let size = file.metadata().await?.len();
    let db = Db::open(&config.storage.metadata).await?;
    let result = async {
        let mut shares = callvault::share::Shares::open(
            db.clone(),
            config.storage.data_dir.clone(),
            config.sip.domain.clone(),
            callvault::share::ShareSettings::from_config(&config.share),
        )
        .await?;
        // The content goes where the server reads it: the local disk or the bucket.
        shares.set_objects(callvault::storage::objects::open(&config.storage).await?);
        let share = shares
            .publish_stream(&user, &name, policy, size, file_chunks(file))
            .await?;
        println!("{}", serde_json::to_string(&share.view())?);
        anyhow::Ok(())
    }
    .await;
    db.close().await;
    result
}

/// A file as a stream of chunks (the library takes any byte stream, as from HTTP).
fn file_chunks(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Unpin + Send {
    use tokio::io::AsyncReadExt;
    Box::pin(futures_util::stream::unfold(file, |mut f| async move {
        let mut buf = vec![0u8; 256 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    }))
}
