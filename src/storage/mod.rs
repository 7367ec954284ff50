//! Persistent state: the metadata database and the accounts in it (stores and objects follow).

pub mod accounts;
pub mod capability;
pub mod db;
pub mod lease;
pub mod live;
pub mod log_thread;
pub mod nodes;
pub mod objects;
pub mod pin_lockouts;
pub mod registrations;
pub mod segments;
pub mod session;
pub mod stores;
pub mod threshold;

pub use accounts::{Account, AccountError, AccountView, Accounts};
pub use db::{Db, DbError};

/// The throwaway PostgreSQL of the integration tests, for unit tests against PostgreSQL.
#[cfg(test)]
#[path = "../../tests/common/pg.rs"]
pub(crate) mod pg_rig;

/// A metadata database for unit tests and the temp dir beside it: SQLite in the dir, or, with
/// `CALLVAULT_TEST_METADATA=postgres` (the second run of `scripts/test`), a fresh database
/// on a throwaway PostgreSQL.
#[cfg(test)]
pub(crate) struct TestDb {
    dir: tempfile::TempDir,
    _pg: Option<pg_rig::PgDb>,
}

#[cfg(test)]
impl TestDb {
    pub(crate) fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

#[cfg(test)]
pub(crate) async fn test_db() -> (TestDb, Db) {
    let dir = tempfile::tempdir().unwrap();
    let pg = if pg_rig::matrix_wants_postgres() {
        pg_rig::PgDb::fresh()
    } else {
        None
    };
    let url = match &pg {
        Some(pg) => pg.url.clone(),
        None => format!("sqlite://{}/meta/cv.db", dir.path().display()),
    };
    let db = Db::open(&url).await.unwrap();
    (TestDb { dir, _pg: pg }, db)
}

#[cfg(test)]
mod cluster_tests;
