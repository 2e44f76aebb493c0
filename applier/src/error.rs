//! Applier errors, classified once into what retrying can do about them ([`crate::decision::Failure`]).

use crate::decision::Failure;

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
    /// and the batch is retried.
    #[error("a table changed; rebuilding statements: {0}")]
    SchemaChanged(sqlx::Error),
}

impl ApplyError {
    /// The error with the database's own message (constraint, trigger) and SQLSTATE when there is one.
    #[must_use]
    pub fn detail(&self) -> String {
        match self {
            Self::Database(sqlx::Error::Database(db))
            | Self::SchemaChanged(sqlx::Error::Database(db)) => {
                format!(
                    "{} (SQLSTATE {})",
                    db.message(),
                    db.code().unwrap_or_default()
                )
            }
            other => other.to_string(),
        }
    }

    /// What retrying can do: an outage (connection lost or refused, pool timeout, the server shutting down, out of
    /// resources, read-only during a failover) passes by itself; a recurring error (statement or lock timeout,
    /// serialization failure, deadlock, a table changed) usually passes but may come back every time; anything
    /// else (a constraint or trigger an operator added, an unreadable payload) is a rejection.
    #[must_use]
    pub fn failure(&self) -> Failure {
        match self {
            Self::Unreadable(_) => Failure::Rejected,
            Self::SchemaChanged(_) => Failure::Recurring,
            Self::Database(err) => classify_sqlx(err),
        }
    }
}

/// Errors a statement built from an older catalog gives after an operator dropped or retyped a typed column.
#[must_use]
pub fn is_schema_change(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if matches!(
        db.code().as_deref(),
        Some("42703" | "42804") // datatype_mismatch
    ))
}

/// Classifies a database error (see [`ApplyError::failure`]).
#[must_use]
pub fn classify_sqlx(err: &sqlx::Error) -> Failure {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => Failure::Outage,
        sqlx::Error::Database(db) => db
            .code()
            .map_or(Failure::Rejected, |code| classify_sqlstate(&code)),
        _ => Failure::Rejected,
    }
}

/// Classifies a SQLSTATE (see [`ApplyError::failure`]).
#[must_use]
pub fn classify_sqlstate(code: &str) -> Failure {
    let outage = code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources: disk full, out of memory, too many connections
        || code.starts_with("58") // system error (I/O)
        || matches!(
            code,
            "57P01" // admin_shutdown
            | "57P02" // crash_shutdown
            | "57P03" // cannot_connect_now (starting up)
            | "57P05" // idle_session_timeout
            | "25006" // read_only_sql_transaction (a replica during failover)
        );
    let recurring = matches!(
        code,
        "40001" // serialization_failure
        | "40P01" // deadlock_detected
        | "57014" // query_canceled (statement_timeout)
        | "55P03" // lock_not_available (lock_timeout)
        | "42703" // undefined_column (a trigger, or a column dropped under the applier)
        | "42804" // datatype_mismatch (likewise)
    );
    if outage {
        Failure::Outage
    } else if recurring {
        Failure::Recurring
    } else {
        Failure::Rejected
    }
}

/// True when waiting helps: Postgres is away (for waiting at start).
#[must_use]
pub fn is_outage(err: &sqlx::Error) -> bool {
    classify_sqlx(err) == Failure::Outage
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_recurring_errors_and_rejections_are_told_apart() {
        for code in [
            "08006", "08001", "57P01", "57P03", "53300", "25006", "58030",
        ] {
            assert_eq!(classify_sqlstate(code), Failure::Outage, "{code}");
        }
        for code in ["40001", "40P01", "57014", "55P03", "42703", "42804"] {
            assert_eq!(classify_sqlstate(code), Failure::Recurring, "{code}");
        }
        for code in ["23505", "23514", "P0001", "22P02", "42P01", "XX000"] {
            assert_eq!(classify_sqlstate(code), Failure::Rejected, "{code}");
        }
        assert_eq!(
            ApplyError::Database(sqlx::Error::PoolTimedOut).failure(),
            Failure::Outage
        );
        assert_eq!(
            ApplyError::Unreadable("x".into()).failure(),
            Failure::Rejected
        );
    }
}
