//! The registry: Stripe object type → table spec, read from `applier/registry.toml` (embedded at build time).
//! It is the only per-type knowledge in the applier; everything else is one generic path.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde::Deserialize;

/// What a `*.deleted` event does to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeletePolicy {
    /// Keep the row with `deleted = true`; only a strictly newer event can bring it back.
    Tombstone,
    /// An ordinary state change (the object lives on at Stripe).
    Upsert,
}

/// How rows of a table are keyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Key {
    /// One row per object: `(_account_id, id)` with the object's id; newer events replace older state.
    #[default]
    Object,
    /// One row per event (objects without an id, like `balance`): history, never replaced.
    Event,
    /// One row per account (per-account settings without an id, like `tax.settings`): `id` is the account id.
    Account,
    /// One row per value of the object's `key_field` (e.g. `customer` for `cash_balance`).
    Field,
}

/// A list a parent object embeds (`subscription.items`), kept in this table too.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedIn {
    /// Parent's object type.
    #[serde(rename = "type")]
    pub parent_type: String,
    /// Parent's field holding the list.
    pub field: String,
    /// The parent owns the items: the table has `_parent_id`, and items missing from a complete list are deleted.
    #[serde(default)]
    pub owned: bool,
}

/// One object type.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectSpec {
    /// Stripe's object type (`data.object.object`).
    #[serde(rename = "type")]
    pub object_type: String,
    /// Table in schema `stripe`.
    pub table: String,
    /// What `*.deleted` does.
    pub on_delete: DeletePolicy,
    /// How rows are keyed.
    #[serde(default)]
    pub key: Key,
    /// The field keying rows when `key = "field"`.
    #[serde(default)]
    pub key_field: Option<String>,
    /// Parents that embed lists of this object.
    #[serde(default)]
    pub embedded_in: Vec<EmbeddedIn>,
    /// How the API lists it, if it can be listed on its own.
    #[serde(default)]
    pub list: Option<ListEndpoint>,
    /// Lifecycle fields ([`crate::version::FORWARD_CANDIDATES`]) that only move forward in this type: within one
    /// second, the state with more of them set is the later one.
    #[serde(default)]
    pub forward_only: Vec<String>,
    /// Lifecycle fields this type has that can move back (so they order nothing), each with the reason.
    #[serde(default)]
    pub moves_back: std::collections::BTreeMap<String, String>,
}

/// An API operation listing an object type.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListEndpoint {
    /// `/v1/customers`; `{account}` stands for a connected account's id.
    pub path: String,
    /// Query parameters it always takes (`status = "all"`).
    #[serde(default)]
    pub query: std::collections::BTreeMap<String, String>,
    /// Whether it filters by `created` (so it can be split into ranges).
    #[serde(default = "yes")]
    pub created: bool,
    /// The field naming the connected account an object belongs to, when the list is the platform's view.
    #[serde(default)]
    pub account_field: Option<String>,
}

fn yes() -> bool {
    true
}

/// An embedded list, seen from the parent.
#[derive(Debug, Clone)]
pub struct ChildList {
    /// Field of the parent holding the list.
    pub field: String,
    /// Spec of the items' table.
    pub child: ObjectSpec,
    /// Whether the parent owns the items.
    pub owned: bool,
}

/// Event types we deliberately keep only in `stripe.events`, each with the reason.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Skipped {
    /// The object type.
    #[serde(rename = "type")]
    pub object_type: String,
    /// Why it has no table.
    pub reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    object: Vec<ObjectSpec>,
    #[serde(default)]
    skipped: Vec<Skipped>,
}

/// The registry, with lookups.
#[derive(Debug)]
pub struct Registry {
    objects: Vec<ObjectSpec>,
    by_type: HashMap<String, usize>,
    children: HashMap<String, Vec<ChildList>>,
    skipped: Vec<Skipped>,
}

/// The registry's source, as shipped.
pub const SOURCE: &str = include_str!("../registry.toml");

impl Registry {
    /// Parses a registry file.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        let file: File = toml::from_str(text)?;
        let by_type = file
            .object
            .iter()
            .enumerate()
            .map(|(i, o)| (o.object_type.clone(), i))
            .collect();
        let mut children: HashMap<String, Vec<ChildList>> = HashMap::new();
        for spec in &file.object {
            for parent in &spec.embedded_in {
                children
                    .entry(parent.parent_type.clone())
                    .or_default()
                    .push(ChildList {
                        field: parent.field.clone(),
                        child: spec.clone(),
                        owned: parent.owned,
                    });
            }
        }
        Ok(Self {
            objects: file.object,
            by_type,
            children,
            skipped: file.skipped,
        })
    }

    /// The shipped registry.
    #[allow(clippy::expect_used)]
    pub fn shipped() -> &'static Self {
        static REGISTRY: OnceLock<Registry> = OnceLock::new();
        REGISTRY.get_or_init(|| {
            Self::parse(SOURCE).expect("registry.toml is valid (checked by a unit test)")
        })
    }

    /// Spec of an object type, if it has a table.
    #[must_use]
    pub fn get(&self, object_type: &str) -> Option<&ObjectSpec> {
        self.by_type.get(object_type).map(|&i| &self.objects[i])
    }

    /// Position of an object type in the registry (a stable order for statements).
    #[must_use]
    pub fn index_of(&self, object_type: &str) -> Option<usize> {
        self.by_type.get(object_type).copied()
    }

    /// Every object spec, in file order.
    #[must_use]
    pub fn objects(&self) -> &[ObjectSpec] {
        &self.objects
    }

    /// Lists embedded in objects of this type.
    pub fn children_of(&self, object_type: &str) -> &[ChildList] {
        self.children
            .get(object_type)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Object types deliberately kept only in `stripe.events`.
    #[must_use]
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_registry_parses_and_names_each_type_and_table_once() {
        let registry = Registry::parse(SOURCE).unwrap();
        let mut tables = std::collections::HashSet::new();
        for spec in registry.objects() {
            assert!(
                tables.insert(spec.table.clone()),
                "table {} appears twice",
                spec.table
            );
            assert!(
                spec.table
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "table name {} must be a plain identifier",
                spec.table
            );
            for parent in &spec.embedded_in {
                assert!(
                    registry.get(&parent.parent_type).is_some(),
                    "{} embedded in unknown {}",
                    spec.table,
                    parent.parent_type
                );
            }
        }
        assert_eq!(
            registry.objects().len(),
            registry.by_type.len(),
            "an object type appears twice"
        );
    }

    #[test]
    fn every_lifecycle_field_of_stripes_example_objects_is_declared_forward_only_or_moving_back() {
        use crate::version::FORWARD_CANDIDATES;
        let registry = Registry::shipped();
        let fixtures: serde_json::Value =
            serde_json::from_str(include_str!("../../testdata/stripe/fixtures3.json")).unwrap();
        let examples = fixtures["resources"].as_object().unwrap();
        let mut checked = 0;
        for example in examples.values() {
            let Some(spec) = example["object"].as_str().and_then(|t| registry.get(t)) else {
                continue;
            };
            for field in FORWARD_CANDIDATES
                .iter()
                .filter(|f| example.get(**f).is_some())
            {
                checked += 1;
                let forward = spec.forward_only.iter().any(|f| f == field);
                let back = spec.moves_back.contains_key(*field);
                assert!(
                    forward != back,
                    "{}.{field}: declare it in exactly one of forward_only and moves_back",
                    spec.object_type
                );
            }
        }
        assert!(
            checked >= 20,
            "the examples have lifecycle fields ({checked})"
        );
        for spec in registry.objects() {
            for field in spec.forward_only.iter().chain(spec.moves_back.keys()) {
                assert!(
                    FORWARD_CANDIDATES.contains(&field.as_str()),
                    "{}.{field} is not a field the event reader counts",
                    spec.object_type
                );
            }
        }
    }

    #[test]
    fn every_snapshot_event_type_is_mapped_or_skipped_with_a_reason() {
        let registry = Registry::shipped();
        let text = include_str!("../../testdata/stripe/event-types.json");
        let types: std::collections::BTreeMap<String, serde_json::Value> =
            serde_json::from_str(text).unwrap();
        let mut unmapped = Vec::new();
        let mut events = 0;
        for (event_type, object) in types.iter().filter(|(k, _)| !k.starts_with('_')) {
            events += 1;
            // Polymorphic events (`customer.source.*`) carry one of several types: each needs a table.
            for object_type in object.as_str().unwrap().split('|') {
                let skipped = registry
                    .skipped()
                    .iter()
                    .any(|s| s.object_type == object_type && !s.reason.trim().is_empty());
                if registry.get(object_type).is_none() && !skipped {
                    unmapped.push(format!("{event_type} -> {object_type}"));
                }
            }
        }
        assert_eq!(events, 265);
        assert!(
            unmapped.is_empty(),
            "neither mapped nor skipped with a reason: {unmapped:#?}"
        );
    }

    #[test]
    fn list_endpoints_are_the_ones_stripes_sdk_names() {
        let text = include_str!("../../testdata/stripe/list-endpoints.json");
        let sdk: std::collections::BTreeMap<String, serde_json::Value> =
            serde_json::from_str(text).unwrap();
        let mut listable = 0;
        for spec in Registry::shipped().objects() {
            let operations = sdk.get(&spec.object_type).and_then(|v| v.as_array());
            let Some(list) = &spec.list else {
                // Not listed: the SDK has no list of its own without a parent id (or none at all).
                let top_level = operations.is_some_and(|ops| {
                    ops.iter().any(|op| {
                        op["path_params"].as_array().is_some_and(Vec::is_empty)
                            && op["required"].as_array().is_some_and(Vec::is_empty)
                    })
                });
                assert!(
                    !top_level,
                    "{} has a list endpoint the registry lacks",
                    spec.object_type
                );
                continue;
            };
            listable += 1;
            let op = operations
                .and_then(|ops| ops.iter().find(|op| op["path"] == list.path.as_str()))
                .unwrap_or_else(|| {
                    panic!(
                        "{}: {} is not an SDK list operation",
                        spec.object_type, list.path
                    )
                });
            assert_eq!(
                op["created_filter"].as_bool().unwrap_or(false),
                list.created,
                "{}: created filter",
                spec.object_type
            );
            for key in list.query.keys() {
                assert_eq!(key, "status");
                assert!(
                    op["status_values"]
                        .as_array()
                        .unwrap()
                        .contains(&"all".into())
                );
            }
        }
        assert!(listable >= 50, "{listable}");
        assert_eq!(
            Registry::shipped()
                .get("subscription")
                .unwrap()
                .list
                .as_ref()
                .unwrap()
                .query["status"],
            "all",
            "canceled subscriptions are listed too"
        );
    }

    #[test]
    fn field_keyed_types_name_their_field() {
        for spec in Registry::shipped().objects() {
            assert_eq!(
                spec.key == Key::Field,
                spec.key_field.is_some(),
                "{}: key = \"field\" goes with key_field",
                spec.object_type
            );
        }
    }

    #[test]
    fn subscriptions_own_their_items() {
        let registry = Registry::shipped();
        let children = registry.children_of("subscription");
        assert_eq!(children.len(), 1);
        assert_eq!(
            (
                children[0].field.as_str(),
                children[0].child.table.as_str(),
                children[0].owned
            ),
            ("items", "subscription_items", true)
        );
        assert_eq!(
            registry.get("subscription").unwrap().on_delete,
            DeletePolicy::Upsert
        );
        assert_eq!(
            registry.get("customer").unwrap().on_delete,
            DeletePolicy::Tombstone
        );
    }
}
