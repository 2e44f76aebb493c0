//! Realistic events for benchmarks: Stripe's own example objects (testdata/stripe/fixtures3.json) with fresh ids,
//! a mix of types like a billing account's, and a share of updates to objects created earlier.

use serde_json::{Value, json};
use stripe_sync_testkit::stripe;

/// (event type of a create, event type of an update, fixture, weight): the mix of a subscription business.
const MIX: &[(&str, &str, &str, u32)] = &[
    ("customer.created", "customer.updated", "customer", 15),
    ("invoice.created", "invoice.paid", "invoice", 20),
    (
        "customer.subscription.created",
        "customer.subscription.updated",
        "subscription",
        12,
    ),
    (
        "payment_intent.created",
        "payment_intent.succeeded",
        "payment_intent",
        18,
    ),
    ("charge.succeeded", "charge.captured", "charge", 18),
    ("price.created", "price.updated", "price", 5),
    ("product.created", "product.updated", "product", 4),
    (
        "payment_method.attached",
        "payment_method.updated",
        "payment_method",
        8,
    ),
];

/// `n` event bodies: `update_share` of them (0.3 = 30 %) update an object created earlier.
pub(crate) fn generate(n: usize, update_share: f64, seed: u64) -> Vec<Vec<u8>> {
    let mut generator = Generator::new(update_share, seed);
    (0..n).map(|_| generator.next_body()).collect()
}

/// Generates events one at a time (for backlogs too big to hold in memory).
pub(crate) struct Generator {
    rng: fastrand::Rng,
    update_share: f64,
    total: u32,
    templates: Vec<Value>,
    created: Vec<(usize, String)>,
    i: usize,
}

impl Generator {
    pub(crate) fn new(update_share: f64, seed: u64) -> Self {
        Self {
            rng: fastrand::Rng::with_seed(seed),
            update_share,
            total: MIX.iter().map(|m| m.3).sum(),
            templates: MIX.iter().map(|m| stripe::fixture(m.2)).collect(),
            created: Vec::new(),
            i: 0,
        }
    }

    /// The next event's body.
    pub(crate) fn next_body(&mut self) -> Vec<u8> {
        let (rng, update_share, total, templates, created) = (
            &mut self.rng,
            self.update_share,
            self.total,
            &self.templates,
            &mut self.created,
        );
        let start = 1_750_000_000i64;
        let i = self.i;
        self.i += 1;
        {
            let update = !created.is_empty() && rng.f64() < update_share;
            let (kind, id) = if update {
                created[rng.usize(..created.len())].clone()
            } else {
                let mut pick = rng.u32(..total);
                let kind = MIX
                    .iter()
                    .position(|m| {
                        if pick < m.3 {
                            true
                        } else {
                            pick -= m.3;
                            false
                        }
                    })
                    .unwrap_or(0);
                let id = format!("{}_bench{i:08}", MIX[kind].2);
                created.push((kind, id.clone()));
                (kind, id)
            };
            let mut object = templates[kind].clone();
            object["id"] = json!(id);
            unique_list_items(&mut object, &id);
            object["metadata"] = json!({ "bench_seq": i.to_string(), "plan": "pro" });
            let event_type = if update { MIX[kind].1 } else { MIX[kind].0 };
            let event = stripe::event(
                &format!("evt_bench{i:09}"),
                event_type,
                start + i as i64 / 50,
                object,
            );
            serde_json::to_vec(&event).unwrap_or_default()
        }
    }
}

/// Gives the items of every embedded list (`lines`, `items`, `refunds`...) ids of their own parent, as Stripe does:
/// the fixture's item ids would otherwise make every invoice share one line item, and every transaction contend
/// for that one row.
fn unique_list_items(object: &mut Value, parent_id: &str) {
    let Some(fields) = object.as_object_mut() else {
        return;
    };
    for value in fields.values_mut() {
        if value.get("object").and_then(Value::as_str) != Some("list") {
            continue;
        }
        let Some(items) = value.get_mut("data").and_then(Value::as_array_mut) else {
            continue;
        };
        for item in items {
            if let Some(id) = item.get("id").and_then(Value::as_str) {
                item["id"] = json!(format!("{id}_{parent_id}"));
            }
        }
    }
}

/// `n` generated events, parsed as the applier reads them (stream sequences from 1).
pub(crate) fn parsed(n: usize) -> anyhow::Result<Vec<stripe_sync_applier::event::Incoming>> {
    generate(n, 0.3, 3)
        .iter()
        .enumerate()
        .map(|(i, b)| stripe_sync_applier::event::Incoming::parse(i as u64 + 1, b))
        .collect::<Result<_, _>>()
        .map_err(Into::into)
}
