//! docs/schema.md lists every table and column; it is rendered from the migrated database, and this test fails when
//! the file and the migrations disagree. Regenerate with `UPDATE_SCHEMA_DOC=1 cargo test -p stripe-sync-applier schema_doc`.

use std::fmt::Write as _;

use stripe_sync_applier::registry::Registry;
use stripe_sync_testkit::db::TestDb;

fn describe_fixed(column: &str) -> &'static str {
    match column {
        "_account_id" => {
            "Connect account of the event, or `STRIPE_ACCOUNT_ID` (primary key, with `livemode` and `id`)"
        }
        "id" => "object id (or the event id, account id or key field, as the table's key says)",
        "_parent_id" => "id of the parent object whose list holds this item (part of the key)",
        "livemode" => "live or test mode (part of the key: test data never overwrites live data)",
        "deleted" => "true once deleted (tombstone), or removed from its parent's current list",
        "_raw_data" => "the whole object as Stripe sent it",
        "_last_event_id" => "event the row reflects",
        "_last_event_created" => "that event's `created` (ordering: newer second wins)",
        "_last_event_rank" => {
            "its rank within that second: tombstone, then forward-only fields set, then kind (ordering)"
        }
        "_last_event_seq" => {
            "its place in the stream (the last tie-break between same-second events of equal rank)"
        }
        "_ambiguous" => {
            "true when a same-second tie the payloads could not order decided the row (stream order did)"
        }
        "_updated_at" => "when the applier last wrote the row",
        "_table" => "the table whose row the event wrote (null: none), for history",
        "_row_id" => "the id of that row",
        "_rank" => "the write's rank within its second (null: recorded before history existed)",
        _ => "",
    }
}

async fn render() -> String {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    stripe_sync_applier::migrate::run(&pool).await.unwrap();
    let columns: Vec<(String, String, String)> = sqlx::query_as(
        "select table_name::text, column_name::text, data_type::text \
         from information_schema.columns c where table_schema = 'stripe' \
           and exists (select 1 from information_schema.tables t where t.table_schema = 'stripe' \
             and t.table_name = c.table_name and t.table_type = 'BASE TABLE') \
         order by table_name, ordinal_position",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let registry = Registry::shipped();
    let mut out = String::from(
        "# Schema `stripe`\n\n\
         Every table and column, rendered from the migrations (`UPDATE_SCHEMA_DOC=1 cargo test -p stripe-sync-applier \
         schema_doc` rewrites this file; the test fails when it and the migrations disagree).\n\n\
         Typed columns are written by the applier from `_raw_data` in the same statement and never fail an insert: a \
         value of an unexpected type or range reads as null (see migrations/0001_core.sql). Amounts and unix timestamps are `bigint`: \
         `to_timestamp(created)` gives a timestamptz.\n\n\
         Every object table `t` also has a view `t_history`: its columns, one row per version, plus `_valid_from`, \
         `_valid_to`, `_event_id` and `_event_type`; and `stripe.as_of(null::stripe.t, <timestamptz>)` gives the table \
         as it was then (docs/history.md).\n",
    );
    let mut current = String::new();
    for (table, column, data_type) in columns {
        if table != current {
            let object = registry.objects().iter().find(|o| o.table == table);
            let about = match (object, table.as_str()) {
                (Some(o), _) => format!(
                    "Stripe object `{}`; `*.deleted`: {:?}; keyed by {:?}",
                    o.object_type, o.on_delete, o.key
                )
                .to_lowercase(),
                (None, "events") => "every applied event, once per (account, id)".to_owned(),
                (None, "incomplete_lists") => {
                    "parents whose embedded list Stripe cut short (`has_more`)".to_owned()
                }
                (None, "history_lists") => {
                    "the embedded lists whose items' history comes from their parents' events".to_owned()
                }
                (None, "history_state") => {
                    "when history's retention last ran, and up to which second it pruned".to_owned()
                }
                (None, "stream_epochs") => {
                    "each incarnation of the events stream: events of a newer one order after an older one's"
                        .to_owned()
                }
                (None, _) => String::new(),
            };
            write!(
                out,
                "\n## stripe.{table}\n\n{about}\n\n| column | type | content |\n|---|---|---|\n"
            )
            .unwrap();
            current = table.clone();
        }
        let is_object_table = registry.objects().iter().any(|o| o.table == table);
        let content = match describe_fixed(&column) {
            "" if is_object_table => format!("`{column}` of the object"),
            fixed => fixed.to_owned(),
        };
        writeln!(out, "| {column} | {data_type} | {content} |").unwrap();
    }
    out
}

#[tokio::test]
async fn docs_schema_md_matches_the_migrations() {
    let rendered = render().await;
    let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/schema.md"));
    if std::env::var("UPDATE_SCHEMA_DOC").is_ok() {
        std::fs::write(path, &rendered).unwrap();
    }
    let on_disk = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        on_disk == rendered,
        "docs/schema.md is out of date with the migrations: run UPDATE_SCHEMA_DOC=1 cargo test -p stripe-sync-applier schema_doc"
    );
}
