//! Running the migrations, and adopting databases migrated before migrations 0001-0005 were squashed into 0001 (core)
//! and 0002 (the tables, generated). Such a database is upgraded in place, keeping its data, to exactly the schema a
//! fresh one gets, and its migration history rewritten to the squashed files; later migrations then apply as usual.

use sqlx::{AssertSqlSafe, Connection as _, PgConnection, PgPool};

use crate::registry::{DeletePolicy, Registry};
use crate::store::MIGRATOR;

/// Why migrating failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Postgres is not reachable (yet): waiting helps.
    #[error("Postgres is not reachable: {0}")]
    Unreachable(sqlx::Error),
    /// Anything else: an operator must look.
    #[error(transparent)]
    Failed(#[from] sqlx::migrate::MigrateError),
    /// Adopting a database migrated before the squash failed.
    #[error("upgrading a database migrated before the squash of migrations 0001-0005: {0}")]
    Adopt(sqlx::Error),
}

/// Runs pending migrations (safe from several processes at once: sqlx takes an advisory lock), adopting a database
/// migrated before the squash first.
pub async fn run(pool: &PgPool) -> Result<(), MigrateError> {
    let mut conn = pool.acquire().await.map_err(unreachable_or_failed)?;
    adopt_pre_squash(&mut conn).await.map_err(|err| match err {
        err if crate::error::is_outage(&err) => MigrateError::Unreachable(err),
        err => MigrateError::Adopt(err),
    })?;
    drop(conn);
    MIGRATOR.run(pool).await.map_err(|err| match err {
        sqlx::migrate::MigrateError::Execute(e) if crate::error::is_outage(&e) => {
            MigrateError::Unreachable(e)
        }
        other => MigrateError::Failed(other),
    })
}

fn unreachable_or_failed(err: sqlx::Error) -> MigrateError {
    if crate::error::is_outage(&err) {
        MigrateError::Unreachable(err)
    } else {
        MigrateError::Failed(sqlx::migrate::MigrateError::Execute(err))
    }
}

/// Pins the database to `account` (the `_account_id` of the platform's own objects) on first use, and refuses any
/// other afterwards: a process with another `STRIPE_ACCOUNT_ID` would write every platform object a second time.
pub async fn pin_account(pool: &PgPool, account: &str) -> anyhow::Result<()> {
    let pinned: String = sqlx::query_scalar(
        "with pin as (insert into stripe.sync_account (platform_account) values ($1) on conflict do nothing \
           returning platform_account) \
         select platform_account from pin union all select platform_account from stripe.sync_account limit 1",
    )
    .bind(account)
    .fetch_one(pool)
    .await?;
    anyhow::ensure!(
        pinned == account,
        "this database holds the platform's objects under the account id {pinned:?} (STRIPE_ACCOUNT_ID when it \
         was first synced), and this process has {account:?}: set STRIPE_ACCOUNT_ID={pinned}. To change it on \
         purpose, stop every applier and see docs/operations.md, \"Changing the account id\"."
    );
    Ok(())
}

/// Ok when every embedded migration has been applied (for `run_migrations = false`).
pub async fn check(pool: &PgPool) -> anyhow::Result<()> {
    let applied: Vec<i64> =
        sqlx::query_scalar("select version from _sqlx_migrations where success")
            .fetch_all(pool)
            .await
            .unwrap_or_default();
    let missing: Vec<i64> = MIGRATOR
        .iter()
        .map(|m| m.version)
        .filter(|v| !applied.contains(v))
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "the database lacks migrations {missing:?}: run `stripe-sync-applier migrate`"
    );
    Ok(())
}

/// The description sqlx recorded for migration 2 before the squash.
const PRE_SQUASH_2: &str = "billing objects";

/// Upgrades a database whose history holds the pre-squash migrations 1-5, in one transaction.
async fn adopt_pre_squash(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::query(
        "select pg_advisory_xact_lock(hashtext('stripe-sync: adopt pre-squash migrations'))",
    )
    .execute(&mut *tx)
    .await?;
    let migrated: bool = sqlx::query_scalar("select to_regclass('_sqlx_migrations') is not null")
        .fetch_one(&mut *tx)
        .await?;
    if !migrated {
        return Ok(());
    }
    let history: Vec<(i64, String)> = sqlx::query_as(
        "select version, description from _sqlx_migrations where version between 1 and 5 order by version",
    )
    .fetch_all(&mut *tx)
    .await?;
    if !history.iter().any(|(v, d)| *v == 2 && d == PRE_SQUASH_2) {
        return Ok(());
    }
    if history.len() != 5 {
        return Err(sqlx::Error::Protocol(format!(
            "the database has only migrations {:?} of the five before the squash: migrate it with the release \
             that wrote them first",
            history.iter().map(|(v, _)| v).collect::<Vec<_>>()
        )));
    }
    tracing::info!(
        "upgrading a database migrated before migrations 0001-0005 were squashed; data is kept"
    );
    let core = MIGRATOR.iter().find(|m| m.version == 1);
    if let Some(core) = core {
        sqlx::raw_sql(AssertSqlSafe(core.sql.as_str().to_owned()))
            .execute(&mut *tx)
            .await?;
    }
    for statement in upgrade_statements(Registry::shipped()) {
        sqlx::raw_sql(AssertSqlSafe(statement))
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("delete from _sqlx_migrations where version between 1 and 5")
        .execute(&mut *tx)
        .await?;
    for migration in MIGRATOR.iter().filter(|m| m.version <= 2) {
        sqlx::query(
            "insert into _sqlx_migrations (version, description, success, checksum, execution_time) \
             values ($1, $2, true, $3, 0)",
        )
        .bind(migration.version)
        .bind(&*migration.description)
        .bind(&*migration.checksum)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// The statements that bring the pre-squash tables to the shape migrations/0002 creates.
fn upgrade_statements(registry: &Registry) -> Vec<String> {
    let owned: Vec<&str> = registry
        .objects()
        .iter()
        .filter(|spec| spec.embedded_in.iter().any(|e| e.owned))
        .map(|spec| spec.table.as_str())
        .collect();
    let mut out = Vec::new();
    for spec in registry.objects() {
        let table = &spec.table;
        let is_owned = owned.contains(&table.as_str());
        out.push(format!(
            "update stripe.\"{table}\" set livemode = coalesce(stripe.j_bool(_raw_data -> 'livemode'), false) \
             where livemode is null; \
             alter table stripe.\"{table}\" alter column livemode set not null, \
               add column _last_event_rank integer not null default 2, \
               add column _ambiguous boolean not null default false; \
             alter table stripe.\"{table}\" alter column _last_event_rank drop default;"
        ));
        // Rows written by a tombstone keep winning same-second ties, as they did before the upgrade.
        if spec.on_delete == DeletePolicy::Tombstone && !is_owned {
            out.push(format!(
                "update stripe.\"{table}\" set _last_event_rank = 100002 where deleted;"
            ));
        }
        let key = if is_owned {
            out.push(format!(
                "update stripe.\"{table}\" set _parent_id = '' where _parent_id is null; \
                 alter table stripe.\"{table}\" alter column _parent_id set not null; \
                 drop index if exists stripe.\"{table}_parent_idx\";"
            ));
            "_account_id, livemode, _parent_id, id"
        } else {
            "_account_id, livemode, id"
        };
        out.push(format!(
            "alter table stripe.\"{table}\" drop constraint \"{table}_pkey\", add primary key ({key}); \
             create index \"{table}_ambiguous_idx\" on stripe.\"{table}\" (_account_id) where _ambiguous;"
        ));
    }
    out.push(
        "alter table stripe.incomplete_lists add column livemode boolean; \
         do $$ declare parent text; begin \
           for parent in select distinct parent_table from stripe.incomplete_lists loop \
             execute format('update stripe.incomplete_lists l set livemode = p.livemode from stripe.%I p \
               where l.parent_table = %L and p._account_id = l._account_id and p.id = l.parent_id', parent, parent); \
           end loop; end $$; \
         update stripe.incomplete_lists set livemode = false where livemode is null; \
         alter table stripe.incomplete_lists alter column livemode set not null, \
           drop constraint incomplete_lists_pkey, \
           add primary key (_account_id, livemode, parent_table, parent_id, field);"
            .to_owned(),
    );
    out
}
