//! A generated account history: products, prices, customers, subscriptions with their items and invoices, changing
//! over days, as the webhook events Stripe would send (and a few snapshots read from the API), in the order the
//! changes happened. The history tests deliver it in that order and shuffled; the history benchmark loads it.
//!
//! Each object changes at most once per second, except on purpose: a customer updated twice within one second (the
//! second event's `previous_attributes` name the first's change), and invoices finalized and paid within the second
//! they were created. Both are ordered by the ordering rule whatever the delivery order, so the history is the same
//! in any order.

use serde_json::{Value, json};

use crate::stripe;

/// The generated events, in the order the changes happened.
#[derive(Debug, Clone)]
pub struct History {
    pub events: Vec<Value>,
    /// Unix second of the first change.
    pub start: i64,
    /// Unix second of the last change.
    pub end: i64,
}

/// `total` events (about) over `days` days from `start`, from `seed`.
#[must_use]
pub fn generate(seed: u64, total: usize, start: i64, days: i64) -> History {
    let mut g = Generator {
        rng: fastrand::Rng::with_seed(seed),
        events: Vec::with_capacity(total + 64),
        start,
        span: days * 86_400,
        next_item: 0,
        next_invoice: 0,
        last_change: std::collections::HashMap::new(),
    };
    g.catalog();
    let mut customers: Vec<Value> = Vec::new();
    let mut subscriptions: Vec<Value> = Vec::new();
    while g.events.len() < total {
        match g.rng.u32(0..100) {
            0..12 => customers.push(g.new_customer(customers.len())),
            12..30 if !customers.is_empty() => {
                let i = g.rng.usize(0..customers.len());
                g.change_customer(&mut customers[i]);
            }
            30..42 if !customers.is_empty() => {
                // The first subscriptions are the first customers' (the docs' examples name them).
                let n = subscriptions.len();
                let owner = match n {
                    0..3 => customers.get(n).cloned().unwrap_or_default(),
                    _ => customers[g.rng.usize(0..customers.len())].clone(),
                };
                if owner.is_object() && (owner["deleted"] != json!(true) || n < 3) {
                    subscriptions.push(g.new_subscription(subscriptions.len(), &owner));
                }
            }
            42..80 if !subscriptions.is_empty() => {
                let i = g.rng.usize(0..subscriptions.len());
                g.change_subscription(&mut subscriptions[i]);
            }
            80..100 if !subscriptions.is_empty() => {
                let i = g.rng.usize(0..subscriptions.len());
                let s = subscriptions[i].clone();
                g.invoice(&s);
            }
            _ => {}
        }
    }
    g.events
        .sort_by_key(|e| e["created"].as_i64().unwrap_or_default());
    let end = g
        .events
        .iter()
        .filter_map(|e| e["created"].as_i64())
        .max()
        .unwrap_or(start);
    History {
        events: g.events,
        start,
        end,
    }
}

/// A snapshot of `object` read from the API at `at`, as the applier's API side publishes it.
fn snapshot(object: &Value, at: i64) -> Value {
    json!({
        "id": format!("snap_{at}_{}", object["id"].as_str().unwrap_or_default()),
        "object": "stripe_sync.snapshot",
        "type": "stripe_sync.snapshot",
        "created": at,
        "livemode": false,
        "api_version": "2026-07-29.dahlia",
        "data": { "object": object },
    })
}

/// The ids the generator gives.
#[must_use]
pub fn customer_id(i: usize) -> String {
    format!("cus_{i:04}")
}

#[must_use]
pub fn subscription_id(i: usize) -> String {
    format!("sub_{i:04}")
}

/// Prices: `price_<product>_<monthly|yearly>`, products `prod_00`..`prod_09`.
const PRODUCTS: usize = 10;

struct Generator {
    rng: fastrand::Rng,
    events: Vec<Value>,
    start: i64,
    span: i64,
    next_item: usize,
    next_invoice: usize,
    /// Per object id, the second of its last change: the next one comes strictly later.
    last_change: std::collections::HashMap<String, i64>,
}

impl Generator {
    /// A second for the next change of `id`: random within the span, after its last change.
    fn when(&mut self, id: &str) -> i64 {
        let last = self.last_change.get(id).copied().unwrap_or(self.start);
        let at = (self.start + self.rng.i64(0..self.span)).max(last + 1);
        self.last_change.insert(id.to_owned(), at);
        at
    }

    fn emit(&mut self, event_type: &str, created: i64, object: &Value) {
        let id = format!("evt_{:06}", self.events.len());
        self.events
            .push(stripe::event(&id, event_type, created, object.clone()));
    }

    fn catalog(&mut self) {
        for p in 0..PRODUCTS {
            let id = format!("prod_{p:02}");
            let mut product = stripe::object("product", &id);
            product["name"] = json!(format!("Plan {p}"));
            product["created"] = json!(self.start);
            product["livemode"] = json!(false);
            self.last_change.insert(id.clone(), self.start);
            self.emit("product.created", self.start, &product);
            for (interval, factor) in [("month", 1), ("year", 10)] {
                let price_id = format!("price_{p:02}_{interval}ly");
                let mut price = stripe::object("price", &price_id);
                price["product"] = json!(id);
                price["unit_amount"] = json!((p as i64 + 1) * 1000 * factor);
                price["recurring"]["interval"] = json!(interval);
                price["created"] = json!(self.start);
                price["livemode"] = json!(false);
                self.last_change.insert(price_id, self.start);
                self.emit("price.created", self.start, &price);
            }
        }
    }

    fn price(&mut self) -> Value {
        let p = self.rng.usize(0..PRODUCTS);
        let interval = if self.rng.u8(0..4) == 0 {
            "year"
        } else {
            "month"
        };
        let mut price = stripe::object("price", &format!("price_{p:02}_{interval}ly"));
        price["product"] = json!(format!("prod_{p:02}"));
        price["unit_amount"] =
            json!((p as i64 + 1) * 1000 * if interval == "year" { 10 } else { 1 });
        price["recurring"]["interval"] = json!(interval);
        price["livemode"] = json!(false);
        price
    }

    fn new_customer(&mut self, i: usize) -> Value {
        let id = customer_id(i);
        // The first ones at the start (the docs' examples name them).
        let at = if i < 3 {
            self.last_change.insert(id.clone(), self.start + i as i64);
            self.start + i as i64
        } else {
            self.when(&id)
        };
        let mut c = stripe::object("customer", &id);
        c["email"] = json!(format!("{id}@example.com"));
        c["created"] = json!(at);
        c["livemode"] = json!(false);
        c["metadata"] = json!({});
        self.emit("customer.created", at, &c);
        c
    }

    fn change_customer(&mut self, c: &mut Value) {
        if c["deleted"] == json!(true) {
            return;
        }
        let id = c["id"].as_str().unwrap_or_default().to_owned();
        let at = self.when(&id);
        match self.rng.u8(0..10) {
            // Deleted: a tombstone.
            0 => {
                *c = json!({ "id": id, "object": "customer", "deleted": true, "livemode": false });
                self.emit("customer.deleted", at, c);
            }
            // Two changes within one second, the second naming the first's in `previous_attributes`.
            1..=3 => {
                c["email"] = json!(format!("{id}.{at}a@example.com"));
                self.emit("customer.updated", at, c);
                let middle = c["email"].clone();
                c["email"] = json!(format!("{id}.{at}b@example.com"));
                let mut event = stripe::event(
                    &format!("evt_{:06}", self.events.len()),
                    "customer.updated",
                    at,
                    c.clone(),
                );
                event["data"]["previous_attributes"] = json!({ "email": middle });
                self.events.push(event);
            }
            // A snapshot read from the API: the same state, a version of its own.
            4 => {
                self.events.push(snapshot(c, at));
            }
            _ => {
                c["email"] = json!(format!("{id}.{at}@example.com"));
                c["metadata"] = json!({ "changed_at": at.to_string() });
                self.emit("customer.updated", at, c);
            }
        }
    }

    fn item(&mut self, subscription: &str, at: i64) -> Value {
        self.next_item += 1;
        let mut item = stripe::object("subscription_item", &format!("si_{:05}", self.next_item));
        item["subscription"] = json!(subscription);
        item["price"] = self.price();
        item["quantity"] = json!(self.rng.i64(1..5));
        item["created"] = json!(at);
        item
    }

    fn set_items(s: &mut Value, items: Vec<Value>) {
        let id = s["id"].as_str().unwrap_or_default().to_owned();
        s["items"] = json!({
            "object": "list", "data": items, "has_more": false, "total_count": items.len(),
            "url": format!("/v1/subscription_items?subscription={id}"),
        });
    }

    fn new_subscription(&mut self, i: usize, customer: &Value) -> Value {
        let id = subscription_id(i);
        let customer_id = customer["id"].as_str().unwrap_or_default().to_owned();
        // The first ones early in the span, so they have a long history.
        let at = if i < 3 {
            self.start + 3_600 + i as i64
        } else {
            self.when(&id)
        }
        .max(self.last_change.get(&customer_id).copied().unwrap_or(0) + 1);
        self.last_change.insert(id.clone(), at);
        let mut s = stripe::object("subscription", &id);
        s["customer"] = json!(customer_id);
        s["created"] = json!(at);
        s["start_date"] = json!(at);
        s["livemode"] = json!(false);
        s["status"] = json!(if self.rng.bool() {
            "trialing"
        } else {
            "active"
        });
        s["canceled_at"] = Value::Null;
        s["ended_at"] = Value::Null;
        let items = (0..self.rng.usize(1..3))
            .map(|_| self.item(&id, at))
            .collect();
        Self::set_items(&mut s, items);
        self.emit("customer.subscription.created", at, &s);
        s
    }

    fn change_subscription(&mut self, s: &mut Value) {
        if s["status"] == json!("canceled") {
            return;
        }
        let id = s["id"].as_str().unwrap_or_default().to_owned();
        let at = self.when(&id);
        let mut items: Vec<Value> = s["items"]["data"].as_array().cloned().unwrap_or_default();
        let event_type = match self.rng.u8(0..10) {
            0 => {
                s["status"] = json!("canceled");
                s["canceled_at"] = json!(at);
                s["ended_at"] = json!(at);
                "customer.subscription.deleted"
            }
            1 | 2 => {
                s["status"] = json!(match s["status"].as_str() {
                    Some("trialing") => "active",
                    Some("active") => "past_due",
                    _ => "active",
                });
                "customer.subscription.updated"
            }
            3 | 4 => {
                let i = self.rng.usize(0..items.len().max(1));
                if let Some(item) = items.get_mut(i) {
                    item["quantity"] = json!(self.rng.i64(1..10));
                }
                "customer.subscription.updated"
            }
            5 | 6 if items.len() > 1 => {
                items.remove(self.rng.usize(0..items.len()));
                "customer.subscription.updated"
            }
            _ => {
                // A plan change: one item replaced by a new one on another price.
                if !items.is_empty() {
                    items.remove(self.rng.usize(0..items.len()));
                }
                items.push(self.item(&id, at));
                "customer.subscription.updated"
            }
        };
        Self::set_items(s, items);
        self.emit(event_type, at, s);
    }

    /// An invoice created as a draft, finalized and paid: within one second, or a finalization later.
    fn invoice(&mut self, s: &Value) {
        self.next_invoice += 1;
        let id = format!("in_{:05}", self.next_invoice);
        let sub_at = self
            .last_change
            .get(s["id"].as_str().unwrap_or_default())
            .copied()
            .unwrap_or(self.start);
        let at = self.when(&id).max(sub_at);
        self.last_change.insert(id.clone(), at);
        let amount: i64 = s["items"]["data"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .map(|i| {
                        i["price"]["unit_amount"].as_i64().unwrap_or(0)
                            * i["quantity"].as_i64().unwrap_or(1)
                    })
                    .sum()
            })
            .unwrap_or(0);
        let mut inv = stripe::object("invoice", &id);
        inv["customer"] = s["customer"].clone();
        inv["subscription"] = s["id"].clone();
        inv["created"] = json!(at);
        inv["livemode"] = json!(false);
        inv["status"] = json!("draft");
        inv["paid"] = json!(false);
        inv["amount_due"] = json!(amount);
        inv["status_transitions"] = json!({ "finalized_at": null, "marked_uncollectible_at": null, "paid_at": null, "voided_at": null });
        let mut line = stripe::object("line_item", &format!("il_{:05}", self.next_invoice));
        line["amount"] = json!(amount);
        line["invoice"] = json!(id);
        inv["lines"] = json!({ "object": "list", "data": [line], "has_more": false, "total_count": 1,
            "url": format!("/v1/invoices/{id}/lines") });
        self.emit("invoice.created", at, &inv);
        let finalized = if self.rng.bool() { at } else { self.when(&id) };
        inv["status"] = json!("open");
        inv["status_transitions"]["finalized_at"] = json!(finalized);
        self.emit("invoice.finalized", finalized, &inv);
        if self.rng.u8(0..5) > 0 {
            let paid = if self.rng.bool() {
                finalized
            } else {
                self.when(&id)
            };
            inv["status"] = json!("paid");
            inv["paid"] = json!(true);
            inv["status_transitions"]["paid_at"] = json!(paid);
            self.emit("invoice.paid", paid, &inv);
        }
    }
}
