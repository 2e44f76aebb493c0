//! Planning a batch (pure): which row each new event becomes, and in which rounds the rows are written. The ordering
//! rule itself lives in SQL (`store::newer`, with `stripe.tie_break`): the plan only drops writes that a newer
//! [`Version`] of the same row in the batch makes pointless, and puts every other write of one row in its own round,
//! oldest first, so the database decides each one. No I/O, so every case is unit-tested here.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use crate::event::Incoming;
use crate::registry::{DeletePolicy, Key, ObjectSpec, Registry};
use crate::version::{Kind, Rank, Version};

/// One row to upsert, from one event.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectRow<'a> {
    /// `_account_id`.
    pub account: &'a str,
    /// `livemode`: part of the key, so test data never overwrites live data.
    pub livemode: bool,
    /// `id`: the object's id (or the event's, the account's, a field's: see [`crate::registry::Key`]).
    pub id: Cow<'a, str>,
    /// Tombstone?
    pub deleted: bool,
    /// Event that produced the row.
    pub event_id: &'a str,
    /// Its place in the object's history.
    pub version: Version,
    /// Its place in the stream's total order: the last tie-break.
    pub seq: i64,
}

impl ObjectRow<'_> {
    /// The row's key in its table.
    #[must_use]
    pub fn key(&self) -> (&str, bool, &str) {
        (self.account, self.livemode, &self.id)
    }
}

/// The rows of one table.
#[derive(Debug)]
pub struct TableRows<'a> {
    /// Position of the table in the registry (and in the statements).
    pub index: usize,
    /// The table.
    pub spec: &'a ObjectSpec,
    /// Rows in rounds written one after the other; each round has at most one row per key, sorted by key (a
    /// stable lock order).
    pub rounds: Vec<Vec<ObjectRow<'a>>>,
    /// Events whose write a newer version of the same row in the batch made pointless (counted as stale).
    pub superseded: usize,
}

/// What a batch changes.
#[derive(Debug, Default)]
pub struct Plan<'a> {
    /// Tables in registry order.
    pub tables: Vec<TableRows<'a>>,
    /// New events that change no table (unknown object type, or an object without id): kept in `stripe.events`.
    pub unrouted: usize,
}

/// Plans the rows of `new_events`: events not applied before (or applied again, with `replay --force`), each with
/// its place in the stream's order.
pub fn plan<'a>(
    new_events: impl IntoIterator<Item = (&'a Incoming, i64)>,
    registry: &'a Registry,
    platform_account: &'a str,
) -> Plan<'a> {
    // Per table, per row key: every write, in stream order.
    let mut by_table: BTreeMap<usize, HashMap<(&'a str, bool, String), Vec<ObjectRow<'a>>>> =
        BTreeMap::new();
    let mut unrouted = 0;
    for (event, seq) in new_events {
        let Some((index, row)) = route(event, seq, registry, platform_account) else {
            unrouted += 1;
            continue;
        };
        by_table
            .entry(index)
            .or_default()
            .entry((row.account, row.livemode, row.id.clone().into_owned()))
            .or_default()
            .push(row);
    }
    let tables = by_table
        .into_iter()
        .map(|(index, objects)| {
            let spec = &registry.objects()[index];
            // A parent of embedded lists is written in every state the batch has, oldest first: an older state's
            // list still adds the items it names (see store::LISTS). Otherwise only the newest version can win;
            // writes of equal versions all go to the database's tie-break.
            let every_state = !registry.children_of(&spec.object_type).is_empty();
            let mut rounds: Vec<Vec<ObjectRow<'a>>> = Vec::new();
            let mut superseded = 0;
            for mut writes in objects.into_values() {
                writes.sort_by_key(|w| (w.version, w.seq));
                if !every_state && let Some(newest) = writes.last().map(|w| w.version) {
                    let before = writes.len();
                    writes.retain(|w| w.version == newest);
                    superseded += before - writes.len();
                }
                for (round, write) in writes.into_iter().enumerate() {
                    if rounds.len() <= round {
                        rounds.push(Vec::new());
                    }
                    rounds[round].push(write);
                }
            }
            for round in &mut rounds {
                round.sort_by(|a, b| a.key().cmp(&b.key()));
            }
            TableRows {
                index,
                spec,
                rounds,
                superseded,
            }
        })
        .collect();
    Plan { tables, unrouted }
}

/// Where an event stands in history (`stripe.events._table`, `_row_id`, `_rank`): the table and row it writes and
/// its rank within its second; `None` for an event that writes no row.
#[must_use]
pub fn placement<'a>(
    event: &'a Incoming,
    registry: &'a Registry,
    platform_account: &'a str,
) -> Option<(&'a str, Cow<'a, str>, i32)> {
    let (index, row) = route(event, 0, registry, platform_account)?;
    Some((
        registry.objects()[index].table.as_str(),
        row.id,
        row.version.rank.get(),
    ))
}

/// The table and row an event writes, if any.
fn route<'a>(
    event: &'a Incoming,
    seq: i64,
    registry: &'a Registry,
    platform_account: &'a str,
) -> Option<(usize, ObjectRow<'a>)> {
    let object_type = event.object_type.as_deref()?;
    let index = registry.index_of(object_type)?;
    let spec = &registry.objects()[index];
    let object_json = event.object_json()?;
    let account = event.account.as_deref().unwrap_or(platform_account);
    let id = match spec.key {
        Key::Object => Cow::Borrowed(event.object_id.as_deref().filter(|id| !id.is_empty())?),
        Key::Event => Cow::Borrowed(event.id.as_str()),
        Key::Account => Cow::Borrowed(account),
        Key::Field => Cow::Owned(field_id(object_json, spec.key_field.as_deref()?)?),
    };
    // A `*.deleted` event ends the object where the registry says so; a snapshot of a deleted object (Stripe
    // answered 404: it is gone) always does, whatever the type's `*.deleted` event means.
    let deleted = event.is_delete()
        && (spec.on_delete == DeletePolicy::Tombstone || event.kind() == Kind::Snapshot);
    let row = ObjectRow {
        account,
        livemode: event.livemode(),
        id,
        deleted,
        event_id: &event.id,
        version: Version {
            created: event.created,
            rank: Rank::new(deleted, event.progress(spec), event.kind()),
        },
        seq,
    };
    Some((index, row))
}

/// The value of `field` in an object, as a row id: a string, or an expanded object's `id`.
fn field_id(object_json: &str, field: &str) -> Option<String> {
    let object: HashMap<&str, &serde_json::value::RawValue> =
        serde_json::from_str(object_json).ok()?;
    match serde_json::from_str::<serde_json::Value>(object.get(field)?.get()).ok()? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Object(o) => o.get("id")?.as_str().map(str::to_owned),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, id: &str, event_type: &str, created: i64, object: &str) -> Incoming {
        let (object_type, object_id) = object.split_once(':').unwrap();
        let body = serde_json::json!({
            "id": id, "type": event_type, "created": created,
            "data": { "object": { "id": object_id, "object": object_type, "v": id } }
        });
        Incoming::parse(seq, body.to_string().as_bytes()).unwrap()
    }

    fn plan_of(events: &[Incoming]) -> Plan<'_> {
        plan(
            events.iter().map(|e| (e, e.seq as i64)),
            Registry::shipped(),
            "platform",
        )
    }

    /// (table, rounds of event ids).
    fn rounds(plan: &Plan<'_>) -> Vec<(String, Vec<Vec<String>>)> {
        plan.tables
            .iter()
            .map(|t| {
                let rounds = t
                    .rounds
                    .iter()
                    .map(|r| r.iter().map(|row| row.event_id.to_owned()).collect())
                    .collect();
                (t.spec.table.clone(), rounds)
            })
            .collect()
    }

    fn only(table: &str, ids: &[&[&str]]) -> Vec<(String, Vec<Vec<String>>)> {
        let rounds = ids
            .iter()
            .map(|r| r.iter().map(|s| (*s).to_owned()).collect())
            .collect();
        vec![(table.to_owned(), rounds)]
    }

    #[test]
    fn history_places_each_event_at_the_row_it_writes_with_the_rank_the_row_gets() {
        let registry = Registry::shipped();
        let updated = event(1, "evt_u", "customer.updated", 10, "customer:cus_1");
        let deleted = event(2, "evt_d", "customer.deleted", 10, "customer:cus_1");
        let balance = event(3, "evt_b", "balance.available", 10, "balance:");
        let unknown = event(4, "evt_x", "thing.updated", 10, "thing:th_1");
        let rank_of =
            |e: &Incoming| route(e, 0, registry, "platform").map(|(_, row)| row.version.rank.get());
        assert_eq!(
            placement(&updated, registry, "platform"),
            Some((
                "customers",
                Cow::Borrowed("cus_1"),
                rank_of(&updated).unwrap()
            ))
        );
        let (_, _, tombstone) = placement(&deleted, registry, "platform").unwrap();
        assert!(
            tombstone > rank_of(&updated).unwrap(),
            "a tombstone ranks above a change"
        );
        assert_eq!(
            placement(&balance, registry, "platform").map(|p| (p.0, p.1.into_owned())),
            Some(("balances", "evt_b".to_owned())),
            "a row per event"
        );
        assert_eq!(placement(&unknown, registry, "platform"), None);
    }

    #[test]
    fn only_the_newest_event_of_an_object_is_written_whatever_the_arrival_order() {
        let events = [
            event(1, "evt_new", "customer.updated", 20, "customer:cus_1"),
            event(2, "evt_old", "customer.updated", 10, "customer:cus_1"),
            event(3, "evt_p", "product.created", 5, "product:prod_1"),
        ];
        let plan = plan_of(&events);
        assert_eq!(
            rounds(&plan),
            vec![
                ("customers".into(), vec![vec!["evt_new".into()]]),
                ("products".into(), vec![vec!["evt_p".into()]])
            ]
        );
        // The older event still has an outcome in the metrics: stale.
        let superseded: Vec<usize> = plan.tables.iter().map(|t| t.superseded).collect();
        assert_eq!(superseded, vec![1, 0]);
    }

    #[test]
    fn writes_of_equal_versions_all_go_to_the_database_oldest_stream_position_first() {
        let events = [
            event(2, "evt_b", "customer.updated", 10, "customer:cus_1"),
            event(1, "evt_a", "customer.updated", 10, "customer:cus_1"),
        ];
        assert_eq!(
            rounds(&plan_of(&events)),
            only("customers", &[&["evt_a"], &["evt_b"]])
        );
    }

    #[test]
    fn a_created_event_never_beats_a_change_of_the_same_second() {
        let events = [
            event(1, "evt_paid", "invoice.updated", 10, "invoice:in_1"),
            event(2, "evt_created", "invoice.created", 10, "invoice:in_1"),
        ];
        let plan = plan_of(&events);
        let last = plan.tables[0].rounds.last().unwrap();
        assert_eq!(last[0].event_id, "evt_paid");
    }

    #[test]
    fn within_a_second_the_state_with_more_forward_only_fields_set_wins() {
        let finalized = r#"{"id":"evt_fin","type":"invoice.finalized","created":10,"data":{"object":{"id":"in_1","object":"invoice","status_transitions":{"finalized_at":10,"paid_at":null}}}}"#;
        let paid = r#"{"id":"evt_paid","type":"invoice.paid","created":10,"data":{"object":{"id":"in_1","object":"invoice","status_transitions":{"finalized_at":10,"paid_at":10}}}}"#;
        let events = [
            Incoming::parse(1, paid.as_bytes()).unwrap(),
            Incoming::parse(2, finalized.as_bytes()).unwrap(),
        ];
        let plan = plan_of(&events);
        let written: Vec<&str> = plan.tables[0]
            .rounds
            .iter()
            .flatten()
            .map(|r| r.event_id)
            .collect();
        assert!(written.ends_with(&["evt_paid"]), "{written:?}");
    }

    #[test]
    fn a_tombstone_yields_only_to_a_strictly_newer_event() {
        let events = [
            event(1, "evt_del", "customer.deleted", 10, "customer:cus_1"),
            event(2, "evt_same", "customer.updated", 10, "customer:cus_1"),
        ];
        let plan = plan_of(&events);
        assert_eq!(rounds(&plan), only("customers", &[&["evt_del"]]));
        assert!(plan.tables[0].rounds[0][0].deleted);
        let events = [
            event(1, "evt_del", "product.deleted", 10, "product:prod_1"),
            event(2, "evt_recreated", "product.created", 11, "product:prod_1"),
        ];
        assert_eq!(
            rounds(&plan_of(&events)),
            only("products", &[&["evt_recreated"]])
        );
    }

    #[test]
    fn parents_of_embedded_lists_are_written_in_every_state_oldest_first() {
        let events = [
            event(
                1,
                "evt_1",
                "customer.subscription.updated",
                10,
                "subscription:sub_1",
            ),
            event(
                2,
                "evt_old",
                "customer.subscription.updated",
                5,
                "subscription:sub_1",
            ),
            event(
                3,
                "evt_2",
                "customer.subscription.updated",
                11,
                "subscription:sub_1",
            ),
            event(4, "evt_c1", "customer.updated", 10, "customer:cus_1"),
            event(5, "evt_c2", "customer.updated", 11, "customer:cus_1"),
        ];
        assert_eq!(
            rounds(&plan_of(&events)),
            vec![
                ("customers".into(), vec![vec!["evt_c2".into()]]),
                (
                    "subscriptions".into(),
                    vec![
                        vec!["evt_old".into()],
                        vec!["evt_1".into()],
                        vec!["evt_2".into()]
                    ]
                ),
            ],
            "a late older state still names its items; the database's guard keeps the newest parent"
        );
    }

    #[test]
    fn a_subscription_deleted_event_is_a_state_change_not_a_tombstone() {
        let events = [event(
            1,
            "evt_end",
            "customer.subscription.deleted",
            10,
            "subscription:sub_1",
        )];
        assert!(!plan_of(&events).tables[0].rounds[0][0].deleted);
    }

    #[test]
    fn accounts_and_modes_keep_objects_with_the_same_id_apart() {
        let mut a = event(1, "evt_a", "product.updated", 10, "product:gold");
        a.account = Some("acct_a".into());
        let b = event(2, "evt_b", "product.updated", 10, "product:gold");
        let mut c = event(3, "evt_c", "product.updated", 10, "product:gold");
        c.livemode = Some(true);
        let events = [a, b, c];
        let plan = plan_of(&events);
        let keys: Vec<(&str, bool)> = plan.tables[0].rounds[0]
            .iter()
            .map(|r| (r.account, r.livemode))
            .collect();
        assert_eq!(
            keys,
            vec![("acct_a", false), ("platform", false), ("platform", true)]
        );
    }

    #[test]
    fn objects_without_an_id_are_keyed_as_their_registry_entry_says() {
        let balance = Incoming::parse(1, br#"{"id":"evt_b","type":"balance.available","created":5,"data":{"object":{"object":"balance","available":[]}}}"#).unwrap();
        let cash = Incoming::parse(2, br#"{"id":"evt_c","type":"cash_balance.funds_available","created":5,"data":{"object":{"object":"cash_balance","customer":"cus_9"}}}"#).unwrap();
        let mut tax = Incoming::parse(3, br#"{"id":"evt_t","type":"tax.settings.updated","created":5,"data":{"object":{"object":"tax.settings"}}}"#).unwrap();
        tax.account = Some("acct_x".into());
        let events = [balance, cash, tax];
        let plan = plan_of(&events);
        let ids: Vec<(String, String)> = plan
            .tables
            .iter()
            .flat_map(|t| {
                t.rounds
                    .iter()
                    .flatten()
                    .map(|r| (t.spec.table.clone(), r.id.to_string()))
            })
            .collect();
        assert_eq!(
            ids,
            vec![
                ("balances".into(), "evt_b".into()),
                ("cash_balances".into(), "cus_9".into()),
                ("tax_settings".into(), "acct_x".into())
            ]
        );
    }

    #[test]
    fn unknown_object_types_are_counted_not_routed() {
        let events = [event(
            1,
            "evt_x",
            "quantum.created",
            10,
            "quantum_ledger:q_1",
        )];
        let plan = plan_of(&events);
        assert!(plan.tables.is_empty());
        assert_eq!(plan.unrouted, 1);
    }

    proptest::proptest! {
        /// The plan depends on the events, not on the order they arrive in, and each round writes a row once.
        #[test]
        fn the_plan_does_not_depend_on_the_order_of_arrival(
            events in proptest::collection::vec((0usize..3, 0i64..3, 0usize..4), 1..16),
            seed in proptest::prelude::any::<u64>(),
        ) {
            let kinds = ["customer.created", "customer.updated", "customer.deleted", "customer.subscription.updated"];
            let events: Vec<Incoming> = events.iter().enumerate().map(|(seq, (object, created, kind))| {
                let object = if *kind == 3 { format!("subscription:sub_{object}") } else { format!("customer:cus_{object}") };
                event(seq as u64 + 1, &format!("evt_{seq}"), kinds[*kind], *created, &object)
            }).collect();
            let mut shuffled = events.clone();
            fastrand::Rng::with_seed(seed).shuffle(&mut shuffled);
            let (a, b) = (plan_of(&events), plan_of(&shuffled));
            proptest::prop_assert_eq!(rounds(&a), rounds(&b));
            for table in &a.tables {
                for round in &table.rounds {
                    let mut keys: Vec<_> = round.iter().map(ObjectRow::key).collect();
                    keys.dedup();
                    proptest::prop_assert_eq!(keys.len(), round.len());
                }
            }
        }
    }
}
