//! Persistent state: the metadata database and the accounts in it (stores and objects follow).

pub mod accounts;
pub mod capability;
pub mod db;
pub mod live;
pub mod log_thread;
pub mod objects;
pub mod segments;
pub mod session;
pub mod stores;
pub mod threshold;

pub use accounts::{Account, AccountError, AccountView, Accounts};
pub use db::{Db, DbError};
