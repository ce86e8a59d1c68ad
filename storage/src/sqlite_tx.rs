//! The SQLite transaction guard the catalog's SQLite backend writes through (the task
//! store's SQLite backend, on rusqlite, keeps the same rule on its own connections).
//!
//! SQLite ends a transaction by itself on some errors (a full disk, an I/O error); sqlx's
//! rollback then fails and leaves its pooled connection believing it is still in a
//! transaction, refusing every later one. So a transaction that does not commit here
//! closes its connection instead of returning it to the pool: closing rolls back what is
//! left and frees the write lock, and the next request gets a fresh connection. The same
//! holds when the request is cancelled half way.
//!
//! It must never hand a connection whose transaction did not commit back to the pool.

use sqlx::pool::PoolConnection;
use sqlx::sqlite::SqlitePool;
use sqlx::{Sqlite, SqliteConnection};

/// A transaction on a pooled connection of its own, begun and committed with plain
/// statements, whose connection is closed rather than reused unless it commits.
pub struct Tx {
    conn: PoolConnection<Sqlite>,
    committed: bool,
}

impl Tx {
    /// Begins with `begin`: `BEGIN IMMEDIATE` for a write, so the write lock is taken
    /// now and racing writers queue instead of failing on a stale snapshot; `BEGIN`
    /// for a consistent read of several statements.
    pub async fn begin(pool: &SqlitePool, begin: &'static str) -> Result<Self, sqlx::Error> {
        let mut tx = Tx {
            conn: pool.acquire().await?,
            committed: false,
        };
        sqlx::query(begin).execute(&mut *tx.conn).await?;
        Ok(tx)
    }

    /// Commits; only then does the connection go back to the pool.
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        sqlx::query("COMMIT").execute(&mut *self.conn).await?;
        self.committed = true;
        Ok(())
    }
}

impl std::ops::Deref for Tx {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.conn
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if !self.committed {
            self.conn.close_on_drop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

    /// SQLite rolls a transaction back by itself here, as it may on a full disk; the
    /// pool's only connection must still serve the next transaction.
    #[tokio::test]
    async fn a_transaction_sqlite_ended_itself_leaves_the_pool_usable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(
                SqliteConnectOptions::new()
                    .filename(dir.path().join("db"))
                    .create_if_missing(true),
            )
            .await
            .expect("pool");
        sqlx::query("CREATE TABLE t (x INTEGER UNIQUE)")
            .execute(&pool)
            .await
            .expect("table");
        sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&pool)
            .await
            .expect("row");
        {
            let mut tx = Tx::begin(&pool, "BEGIN IMMEDIATE").await.expect("begin");
            sqlx::query("INSERT OR ROLLBACK INTO t VALUES (1)")
                .execute(&mut *tx)
                .await
                .expect_err("SQLite rolls back");
        }
        let mut tx = Tx::begin(&pool, "BEGIN IMMEDIATE")
            .await
            .expect("a fresh transaction");
        sqlx::query("INSERT INTO t VALUES (2)")
            .execute(&mut *tx)
            .await
            .expect("insert");
        tx.commit().await.expect("commit");
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
            .fetch_one(&pool)
            .await
            .expect("count");
        assert_eq!(n, 2);
        pool.close().await;
    }
}
