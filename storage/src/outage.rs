//! Which database failures are outages: the store cannot read or write now (disk full,
//! I/O, a lock held too long, read-only, unreachable) but may once the cause is gone, so
//! a caller answers "unavailable, try again" rather than "failed".
//!
//! This module owns that classification for both engines: SQLite by its primary result
//! code, PostgreSQL by its SQLSTATE, and sqlx's own pool and I/O errors by variant. It
//! must never read a database's message text: messages change between versions and
//! locales, codes do not.

/// Why a store cannot serve now, though it may once the cause is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// The disk (or the database server's) is full.
    DiskFull,
    /// Reading or writing failed at the OS or the network.
    Io,
    /// Another writer held a lock too long, or every connection stayed in use.
    Busy,
    /// The file or database accepts no writes.
    ReadOnly,
    /// The database file cannot be opened.
    CannotOpen,
    /// The database server is not there or is shutting down.
    Unreachable,
}

impl std::fmt::Display for Outage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outage::DiskFull => "disk full",
            Outage::Io => "I/O error",
            Outage::Busy => "busy (a lock was held too long)",
            Outage::ReadOnly => "read-only",
            Outage::CannotOpen => "cannot open the database file",
            Outage::Unreachable => "the database cannot be reached",
        })
    }
}

impl Outage {
    /// The outage `e` reports, if it is one; `None` for every other failure (a
    /// constraint, a syntax error, a corrupt file), which waiting will not cure.
    pub fn of(e: &sqlx::Error) -> Option<Self> {
        match e {
            sqlx::Error::Io(io) => Some(Self::of_io(io)),
            sqlx::Error::PoolTimedOut => Some(Outage::Busy),
            sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => Some(Outage::Unreachable),
            sqlx::Error::Database(db) => {
                if let Some(sqlite) = db.try_downcast_ref::<sqlx::sqlite::SqliteError>() {
                    Self::of_sqlite(sqlite)
                } else if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                    Self::of_sqlstate(pg.code())
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    fn of_io(e: &std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::StorageFull => Outage::DiskFull,
            std::io::ErrorKind::ReadOnlyFilesystem => Outage::ReadOnly,
            _ => Outage::Io,
        }
    }

    fn of_sqlite(e: &sqlx::sqlite::SqliteError) -> Option<Self> {
        use sqlx::error::DatabaseError;
        Self::of_sqlite_code(sqlite_primary_code(e.code().as_deref())?)
    }

    /// The outage an SQLite result code reports, extended or primary, whichever driver
    /// read it (sqlx for the catalog, rusqlite for a device's task store), so both
    /// classify alike.
    pub fn of_sqlite_code(code: i32) -> Option<Self> {
        match code & 0xff {
            SQLITE_BUSY | SQLITE_LOCKED => Some(Outage::Busy),
            SQLITE_READONLY => Some(Outage::ReadOnly),
            SQLITE_IOERR => Some(Outage::Io),
            SQLITE_FULL => Some(Outage::DiskFull),
            SQLITE_CANTOPEN => Some(Outage::CannotOpen),
            _ => None,
        }
    }

    /// PostgreSQL's SQLSTATE: its first two characters name the class.
    fn of_sqlstate(state: &str) -> Option<Self> {
        match state {
            "53100" => Some(Outage::DiskFull),
            "25006" => Some(Outage::ReadOnly),
            "57P01" | "57P02" | "57P03" => Some(Outage::Unreachable),
            "57014" | "55P03" | "40001" | "40P01" => Some(Outage::Busy),
            _ => match state.get(..2) {
                Some("08") => Some(Outage::Unreachable),
                Some("53") => Some(Outage::Busy),
                Some("58") => Some(Outage::Io),
                _ => None,
            },
        }
    }
}

/// SQLite's primary result code from the extended code sqlx reports (its low byte), so
/// that every extended variant of a failure (`SQLITE_IOERR_WRITE`, ...) counts as it.
pub fn sqlite_primary_code(extended: Option<&str>) -> Option<i32> {
    extended?.parse::<i32>().ok().map(|code| code & 0xff)
}

const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;
const SQLITE_READONLY: i32 = 8;
const SQLITE_IOERR: i32 = 10;
const SQLITE_FULL: i32 = 13;
const SQLITE_CANTOPEN: i32 = 14;

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::{ConnectOptions, Connection};

    #[test]
    fn postgres_states_are_read_by_code() {
        for (state, outage) in [
            ("53100", Some(Outage::DiskFull)),
            ("08006", Some(Outage::Unreachable)),
            ("57P01", Some(Outage::Unreachable)),
            ("53300", Some(Outage::Busy)),
            ("55P03", Some(Outage::Busy)),
            ("58030", Some(Outage::Io)),
            ("25006", Some(Outage::ReadOnly)),
            ("23505", None),
            ("42P01", None),
        ] {
            assert_eq!(Outage::of_sqlstate(state), outage, "{state}");
        }
    }

    #[test]
    fn sqlite_extended_codes_count_as_their_primary_code() {
        // SQLITE_IOERR_WRITE, SQLITE_READONLY_DBMOVED, SQLITE_BUSY_SNAPSHOT.
        assert_eq!(sqlite_primary_code(Some("778")), Some(SQLITE_IOERR));
        assert_eq!(sqlite_primary_code(Some("1032")), Some(SQLITE_READONLY));
        assert_eq!(sqlite_primary_code(Some("517")), Some(SQLITE_BUSY));
        assert_eq!(sqlite_primary_code(Some("not a code")), None);
        assert_eq!(sqlite_primary_code(None), None);
    }

    #[tokio::test]
    async fn a_write_to_a_read_only_sqlite_database_is_an_outage() {
        let e = crate::test_database::read_only_write_error().await;
        assert_eq!(Outage::of(&e), Some(Outage::ReadOnly), "{e}");
    }

    #[tokio::test]
    async fn a_write_lock_held_too_long_is_an_outage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(dir.path().join("db"))
            .create_if_missing(true)
            .busy_timeout(std::time::Duration::ZERO);
        let mut holder = options.connect().await.expect("open");
        sqlx::query("CREATE TABLE t (x)")
            .execute(&mut holder)
            .await
            .expect("table");
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut holder)
            .await
            .expect("lock");
        let mut other = options.connect().await.expect("open");
        let e = sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut other)
            .await
            .expect_err("busy");
        assert_eq!(Outage::of(&e), Some(Outage::Busy), "{e}");
        let _ = other.close().await;
        let _ = holder.close().await;
    }

    #[tokio::test]
    async fn other_database_errors_are_not_outages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(dir.path().join("db"))
            .create_if_missing(true)
            .connect()
            .await
            .expect("open");
        let e = sqlx::query("SELECT * FROM missing")
            .execute(&mut conn)
            .await
            .expect_err("no table");
        assert_eq!(Outage::of(&e), None, "{e}");
        let _ = conn.close().await;
    }
}
