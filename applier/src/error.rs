//! Applier errors, classified once: transient ones retry without limit (the partition waits, nothing is lost),
//! permanent ones go to the dead letter after the configured attempts.

/// Why applying failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Postgres failed the statement or the connection.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The event can't be read.
    #[error("unreadable event: {0}")]
    Unreadable(String),
    /// A table changed under the applier (a column dropped or retyped): the statements are rebuilt from the catalog
    /// and the batch is retried, like after an outage.
    #[error("a table changed; rebuilding statements: {0}")]
    SchemaChanged(sqlx::Error),
}

impl ApplyError {
    /// The error with the database's own message (constraint, trigger) and SQLSTATE when there is one.
    pub fn detail(&self) -> String {
        match self {
            Self::Database(sqlx::Error::Database(db)) => {
                format!(
                    "{} (SQLSTATE {})",
                    db.message(),
                    db.code().unwrap_or_default()
                )
            }
            other => other.to_string(),
        }
    }

    /// Transient: connection lost or refused, pool timeout, serialization failure, deadlock, the server shutting
    /// down or out of resources, a read-only server (failover in progress), a cancelled statement. Retrying later
    /// will succeed. Everything else (a constraint or trigger an operator added, an unreadable payload) is
    /// permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreadable(_) => false,
            Self::SchemaChanged(_) => true,
            Self::Database(err) => is_transient_sqlx(err),
        }
    }
}

/// Errors a statement built from an older catalog gives after an operator dropped or retyped a typed column.
pub fn is_schema_change(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if matches!(
        db.code().as_deref(),
        Some("42703") // undefined_column
        | Some("42804") // datatype_mismatch
    ))
}

/// The transient database errors of [`ApplyError::is_transient`].
pub fn is_transient_sqlx(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| is_transient_sqlstate(&code)),
        _ => false,
    }
}

/// SQLSTATEs that mean "try again later".
pub fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources: disk full, out of memory, too many connections
        || code.starts_with("58") // system error (I/O)
        || matches!(
            code,
            "40001" // serialization_failure
            | "40P01" // deadlock_detected
            | "57P01" // admin_shutdown
            | "57P02" // crash_shutdown
            | "57P03" // cannot_connect_now (starting up)
            | "57P05" // idle_session_timeout
            | "57014" // query_canceled (statement timeout)
            | "55P03" // lock_not_available
            | "25006" // read_only_sql_transaction (a replica during failover)
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_are_transient_and_rejections_are_permanent() {
        for code in [
            "08006", "08001", "40001", "40P01", "57P01", "57P03", "53300", "25006",
        ] {
            assert!(is_transient_sqlstate(code), "{code}");
        }
        for code in ["23505", "23514", "P0001", "22P02", "42P01", "XX000"] {
            assert!(!is_transient_sqlstate(code), "{code}");
        }
        assert!(ApplyError::Database(sqlx::Error::PoolTimedOut).is_transient());
        assert!(!ApplyError::Unreadable("x".into()).is_transient());
    }
}
