//! The metadata database: a sqlx `Any` pool so the same SQL text (with `$N` placeholders) runs
//! on SQLite now and PostgreSQL later. Schema changes are embedded sqlx migrations.

use std::borrow::Cow;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use sqlx::any::AnyPoolOptions;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::AnyPool;

/// Migrations compiled into the binary, `(version, description, sql)`. Add new files under
/// `migrations/` and list them here; applied versions must never be edited.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "accounts",
        include_str!("../../migrations/0001_accounts.sql"),
    ),
    (
        2,
        "stores",
        include_str!("../../migrations/0002_stores.sql"),
    ),
    (
        3,
        "shares",
        include_str!("../../migrations/0003_shares.sql"),
    ),
    (
        4,
        "account threshold",
        include_str!("../../migrations/0004_account_threshold.sql"),
    ),
    (
        5,
        "account threshold limit",
        include_str!("../../migrations/0005_account_threshold_limit.sql"),
    ),
    (
        6,
        "share uploads",
        include_str!("../../migrations/0006_share_uploads.sql"),
    ),
    (
        7,
        "store rtp endpoints",
        include_str!("../../migrations/0007_store_rtp_endpoints.sql"),
    ),
    (
        8,
        "store sip and direction",
        include_str!("../../migrations/0008_store_sip_direction.sql"),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("metadata database {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("metadata database {url}: backend not supported by this build (sqlite:// only)")]
    UnsupportedBackend { url: String },
    #[error("cannot create directory {path} for the metadata database: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the metadata database file {path} (mode 0600): {source}")]
    CreateFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("metadata database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("metadata database: {0}")]
    Query(#[from] sqlx::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
}

/// A handle on the metadata database; cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
}

#[derive(Debug)]
struct Embedded;

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 's>> {
        Box::pin(async {
            Ok(MIGRATIONS
                .iter()
                .map(|(v, desc, sql)| {
                    Migration::new(
                        *v,
                        Cow::Borrowed(*desc),
                        MigrationType::Simple,
                        Cow::Borrowed(*sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// Splits `sqlite://path?query` / `sqlite:path` into the file path (None for in-memory).
fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or("");
    if path.is_empty() || path == ":memory:" {
        None
    } else {
        Some(PathBuf::from(path))
    }
}

impl Db {
    /// Opens (creating if missing) the database at `url` and brings its schema up to date.
    pub async fn open(url: &str) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        if !url.starts_with("sqlite:") {
            return Err(DbError::UnsupportedBackend {
                url: url.to_string(),
            });
        }
        let file = sqlite_file(url);
        let mut connect_url = url.to_string();
        if let Some(file) = &file {
            if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
                crate::secret::create_private_dir_all(parent).map_err(|source| {
                    DbError::CreateDir {
                        path: parent.to_path_buf(),
                        source,
                    }
                })?;
            }
            // The file holds password-equivalent digest hashes, PIN hashes and tokens:
            // create it 0600 before SQLite does (SQLite gives its -wal/-shm the same mode).
            crate::secret::ensure_private_file(file).map_err(|source| DbError::CreateFile {
                path: file.clone(),
                source,
            })?;
            if !url.contains("mode=") {
                // Read-write-create: a fresh install starts with an empty database.
                connect_url.push(if url.contains('?') { '&' } else { '?' });
                connect_url.push_str("mode=rwc");
            }
        }
        let connect_err = |source| DbError::Connect {
            url: url.to_string(),
            source,
        };
        // Every in-memory connection is its own database, so keep exactly one.
        let max = if file.is_some() { 8 } else { 1 };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .min_connections(if file.is_some() { 0 } else { 1 })
            .idle_timeout(None)
            .max_lifetime(if file.is_some() {
                Some(std::time::Duration::from_secs(1800))
            } else {
                None
            })
            .connect(&connect_url)
            .await
            .map_err(connect_err)?;
        if file.is_some() {
            // WAL lets readers (HTTP listings) run beside the writer; the mode is persistent
            // in the file, so setting it once per open is enough.
            sqlx::query("PRAGMA journal_mode=WAL")
                .execute(&pool)
                .await
                .map_err(connect_err)?;
        }
        let db = Db {
            pool,
            backend: Backend::Sqlite,
        };
        db.migrate().await?;
        Ok(db)
    }

    pub async fn migrate(&self) -> Result<(), DbError> {
        let migrator = Migrator::new(Embedded).await?;
        migrator.run(&self.pool).await?;
        Ok(())
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Row;

    #[test]
    fn sqlite_paths() {
        assert_eq!(
            sqlite_file("sqlite://./data/callvault.db"),
            Some(PathBuf::from("./data/callvault.db"))
        );
        assert_eq!(
            sqlite_file("sqlite:///var/lib/cv.db?mode=rw"),
            Some(PathBuf::from("/var/lib/cv.db"))
        );
        assert_eq!(sqlite_file("sqlite::memory:"), None);
        assert_eq!(sqlite_file("postgres://x"), None);
    }

    #[tokio::test]
    async fn opens_creates_and_migrates_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/deeper/cv.db");
        let url = format!("sqlite://{}", path.display());
        let db = Db::open(&url).await.unwrap();
        assert!(path.exists());
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode();
            assert_eq!(mode(&path) & 0o777, 0o600, "database file is private");
            assert_eq!(
                mode(path.parent().unwrap()) & 0o777,
                0o700,
                "its folder too"
            );
        }
        let mode: String = sqlx::query("PRAGMA journal_mode")
            .fetch_one(db.pool())
            .await
            .unwrap()
            .get(0);
        assert_eq!(mode.to_lowercase(), "wal");
        db.close().await;
        // Re-opening an up-to-date database is a no-op for migrations.
        let db = Db::open(&url).await.unwrap();
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM accounts")
            .fetch_one(db.pool())
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn refuses_unknown_backend() {
        let e = Db::open("mysql://localhost/x").await.unwrap_err();
        assert!(matches!(e, DbError::UnsupportedBackend { .. }));
    }

    #[tokio::test]
    async fn in_memory_works() {
        let db = Db::open("sqlite::memory:").await.unwrap();
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM accounts")
            .fetch_one(db.pool())
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0);
    }
}
