//! Planning a batch (pure): which row each new event becomes, keeping only the newest event of each object, in the
//! same order rule the database guard applies. No I/O, so every ordering case is unit-tested here.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use crate::event::Incoming;
use crate::registry::{DeletePolicy, Key, ObjectSpec, Registry};

/// One row to upsert, from one event.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectRow<'a> {
    /// `_account_id`.
    pub account: &'a str,
    /// `id`: the object's id (or the event's, the account's, a field's: see [`crate::registry::Key`]).
    pub id: Cow<'a, str>,
    /// `livemode` of the event.
    pub livemode: Option<bool>,
    /// Tombstone?
    pub deleted: bool,
    /// Event that produced the row.
    pub event_id: &'a str,
    /// Its `created`.
    pub created: i64,
    /// Its stream sequence.
    pub seq: i64,
}

/// The rows of one table.
#[derive(Debug)]
pub struct TableRows<'a> {
    /// The table.
    pub spec: &'a ObjectSpec,
    /// Rows in rounds applied one after the other; each round has at most one row per key, sorted by key (a
    /// stable lock order). One round (the newest state of each object) unless the table's objects embed lists.
    pub rounds: Vec<Vec<ObjectRow<'a>>>,
}

/// What a batch changes.
#[derive(Debug, Default)]
pub struct Plan<'a> {
    /// Tables in registry order.
    pub tables: Vec<TableRows<'a>>,
    /// New events that change no table (unknown object type, or an object without id): kept in `stripe.events`.
    pub unrouted: usize,
}

/// Does a row from event `new` (created, stream sequence, tombstone) replace state from event `old`? Events are
/// ordered by `(created, tombstone, seq)`: newer `created` wins; in the same second a tombstone wins over an update
/// (so a tombstone yields only to a strictly newer event), and otherwise the later event in the stream wins. A total
/// order: the newest state is the same whatever order events are applied in (redeliveries, parked events, replays,
/// lists embedded in another partition's objects). Mirrored by the SQL guard.
pub fn supersedes(new: (i64, i64, bool), old: (i64, i64, bool)) -> bool {
    let (new_created, new_seq, new_deleted) = new;
    let (old_created, old_seq, old_deleted) = old;
    (new_created, new_deleted, new_seq) >= (old_created, old_deleted, old_seq)
}

/// Plans the rows of `new_events` (events not applied before, in stream order).
pub fn plan<'a>(
    new_events: impl IntoIterator<Item = &'a Incoming>,
    registry: &'a Registry,
    platform_account: &'a str,
) -> Plan<'a> {
    // Per table, per object: the chain of events each superseding the one before, in stream order.
    let mut by_table: BTreeMap<usize, HashMap<(&'a str, String), Vec<ObjectRow<'a>>>> =
        BTreeMap::new();
    let mut unrouted = 0;
    for event in new_events {
        let routed = (|| {
            let object_type = event.object_type.as_deref()?;
            let index = registry.index_of(object_type)?;
            let spec = registry.get(object_type)?;
            let object_json = event.object_json()?;
            let account = event.account.as_deref().unwrap_or(platform_account);
            let id = match spec.key {
                Key::Object => {
                    Cow::Borrowed(event.object_id.as_deref().filter(|id| !id.is_empty())?)
                }
                Key::Event => Cow::Borrowed(event.id.as_str()),
                Key::Account => Cow::Borrowed(account),
                Key::Field => Cow::Owned(field_id(object_json, spec.key_field.as_deref()?)?),
            };
            let row = ObjectRow {
                account,
                id,
                livemode: event.livemode,
                deleted: event.is_delete() && spec.on_delete == DeletePolicy::Tombstone,
                event_id: &event.id,
                created: event.created,
                seq: event.seq as i64,
            };
            Some((index, row))
        })();
        let Some((index, row)) = routed else {
            unrouted += 1;
            continue;
        };
        let chain = by_table
            .entry(index)
            .or_default()
            .entry((row.account, row.id.clone().into_owned()))
            .or_default();
        match chain.last() {
            Some(old)
                if !supersedes(
                    (row.created, row.seq, row.deleted),
                    (old.created, old.seq, old.deleted),
                ) => {}
            _ => chain.push(row),
        }
    }
    let tables = by_table
        .into_iter()
        .map(|(index, objects)| {
            let spec = &registry.objects()[index];
            let mut chains: Vec<Vec<ObjectRow<'a>>> = objects.into_values().collect();
            chains.sort_by(|a, b| (a[0].account, &a[0].id).cmp(&(b[0].account, &b[0].id)));
            // Without embedded lists only the newest state matters. With them, every state a parent went through
            // is applied, in order, so the lists' items (and their removal marks) don't depend on how events were
            // batched: a replay in other batches ends in the same tables.
            let rounds = if registry.children_of(&spec.object_type).is_empty() {
                vec![chains.into_iter().filter_map(|mut c| c.pop()).collect()]
            } else {
                let depth = chains.iter().map(Vec::len).max().unwrap_or(0);
                let mut rounds: Vec<Vec<ObjectRow<'a>>> = vec![Vec::new(); depth];
                for chain in chains {
                    for (round, row) in chain.into_iter().enumerate() {
                        rounds[round].push(row);
                    }
                }
                rounds
            };
            TableRows { spec, rounds }
        })
        .collect();
    Plan { tables, unrouted }
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

    fn winners(plan: &Plan) -> Vec<(String, String, bool)> {
        plan.tables
            .iter()
            .flat_map(|t| {
                t.rounds
                    .iter()
                    .flatten()
                    .map(|r| (t.spec.table.clone(), r.event_id.to_owned(), r.deleted))
            })
            .collect()
    }

    #[test]
    fn newest_event_of_each_object_wins_whatever_the_arrival_order() {
        let events = [
            event(1, "evt_new", "customer.updated", 20, "customer:cus_1"),
            event(2, "evt_old", "customer.updated", 10, "customer:cus_1"),
            event(3, "evt_p", "product.created", 5, "product:prod_1"),
        ];
        let plan = plan(&events, Registry::shipped(), "platform");
        assert_eq!(
            winners(&plan),
            vec![
                ("customers".into(), "evt_new".into(), false),
                ("products".into(), "evt_p".into(), false)
            ]
        );
    }

    #[test]
    fn same_second_events_follow_stream_order() {
        let events = [
            event(1, "evt_a", "customer.updated", 10, "customer:cus_1"),
            event(2, "evt_b", "customer.updated", 10, "customer:cus_1"),
        ];
        assert_eq!(
            winners(&plan(&events, Registry::shipped(), "p"))[0].1,
            "evt_b"
        );
    }

    #[test]
    fn a_tombstone_yields_only_to_a_strictly_newer_event() {
        let events = [
            event(1, "evt_del", "customer.deleted", 10, "customer:cus_1"),
            event(
                2,
                "evt_same_second",
                "customer.updated",
                10,
                "customer:cus_1",
            ),
        ];
        assert_eq!(
            winners(&plan(&events, Registry::shipped(), "p")),
            vec![("customers".into(), "evt_del".into(), true)]
        );
        let events = [
            event(1, "evt_del", "product.deleted", 10, "product:prod_1"),
            event(2, "evt_recreated", "product.created", 11, "product:prod_1"),
        ];
        assert_eq!(
            winners(&plan(&events, Registry::shipped(), "p"))[0].1,
            "evt_recreated"
        );
    }

    #[test]
    fn parents_of_embedded_lists_go_through_every_state_in_order() {
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
        let plan = plan(&events, Registry::shipped(), "p");
        let rounds: Vec<(String, Vec<Vec<&str>>)> = plan
            .tables
            .iter()
            .map(|t| {
                (
                    t.spec.table.clone(),
                    t.rounds
                        .iter()
                        .map(|r| r.iter().map(|row| row.event_id).collect())
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            rounds,
            vec![
                ("customers".into(), vec![vec!["evt_c2"]]),
                ("subscriptions".into(), vec![vec!["evt_1"], vec!["evt_2"]]),
            ],
            "a late older event is still dropped; the states that win follow one another"
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
        assert_eq!(
            winners(&plan(&events, Registry::shipped(), "p")),
            vec![("subscriptions".into(), "evt_end".into(), false)]
        );
    }

    #[test]
    fn accounts_keep_objects_with_the_same_id_apart() {
        let mut a = event(1, "evt_a", "product.updated", 10, "product:gold");
        a.account = Some("acct_a".into());
        let b = event(2, "evt_b", "product.updated", 10, "product:gold");
        let plan = plan([&a, &b], Registry::shipped(), "platform");
        let accounts: Vec<&str> = plan.tables[0].rounds[0].iter().map(|r| r.account).collect();
        assert_eq!(accounts, vec!["acct_a", "platform"]);
    }

    #[test]
    fn objects_without_an_id_are_keyed_as_their_registry_entry_says() {
        let balance = Incoming::parse(1, br#"{"id":"evt_b","type":"balance.available","created":5,"data":{"object":{"object":"balance","available":[]}}}"#).unwrap();
        let cash = Incoming::parse(2, br#"{"id":"evt_c","type":"cash_balance.funds_available","created":5,"data":{"object":{"object":"cash_balance","customer":"cus_9"}}}"#).unwrap();
        let mut tax = Incoming::parse(3, br#"{"id":"evt_t","type":"tax.settings.updated","created":5,"data":{"object":{"object":"tax.settings"}}}"#).unwrap();
        tax.account = Some("acct_x".into());
        let plan = plan([&balance, &cash, &tax], Registry::shipped(), "platform");
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
        let plan = plan(&events, Registry::shipped(), "p");
        assert!(plan.tables.is_empty());
        assert_eq!(plan.unrouted, 1);
    }

    #[test]
    fn supersedes_matches_the_documented_rule() {
        assert!(supersedes((11, 1, false), (10, 9, false)));
        assert!(!supersedes((9, 99, false), (10, 1, false)));
        assert!(supersedes((10, 2, false), (10, 1, false)));
        assert!(
            supersedes((10, 2, false), (10, 2, false)),
            "re-applying the same event is harmless"
        );
        assert!(!supersedes((10, 2, false), (10, 1, true)));
        assert!(supersedes((10, 2, true), (10, 1, false)));
        assert!(supersedes((11, 0, false), (10, 1, true)));
    }

    proptest::proptest! {
        /// Whatever order the events of one object are applied in, the same one ends up in the row.
        #[test]
        fn the_winner_does_not_depend_on_the_order_of_application(
            events in proptest::collection::vec((0i64..4, proptest::bool::ANY), 1..12),
            seed in proptest::prelude::any::<u64>(),
        ) {
            let events: Vec<(i64, i64, bool)> = events.iter().enumerate().map(|(seq, (c, d))| (*c, seq as i64, *d)).collect();
            let fold = |order: &[(i64, i64, bool)]| {
                order.iter().copied().reduce(|current, next| if supersedes(next, current) { next } else { current })
            };
            let mut shuffled = events.clone();
            fastrand::Rng::with_seed(seed).shuffle(&mut shuffled);
            proptest::prop_assert_eq!(fold(&events), fold(&shuffled));
        }
    }
}
