//! A fake Stripe API that behaves like Stripe where the API side depends on it (`testdata/stripe/api-notes.md`):
//! cursor pagination (`limit` up to 100, `starting_after`, `has_more`, newest first), `created[gte|gt|lte|lt]`
//! filters, subscriptions hidden when canceled unless `status=all`, embedded lists cut at 10 with `has_more` and a
//! `url` that pages the rest, retrieve by id (404 `resource_missing`), `GET /v1/events` (30 days, newest first,
//! `delivery_success=false`), `Stripe-Account` scoping, API keys (401), products not enabled on an account (400),
//! rate limits (429 with `Stripe-Rate-Limited-Reason`), and faults on demand: latency, 500s, malformed JSON,
//! connection resets.
//!
//! Objects are stored as JSON text; a large synthetic data set (the benchmark's million objects) is stored as a
//! template per type and rendered on request, so memory stays small.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::time::Instant;

/// The platform's own data: requests without `Stripe-Account`.
pub const PLATFORM: &str = "";

/// Embedded lists hold this many items, as Stripe's do.
pub const EMBEDDED_PAGE: usize = 10;

/// Faults and limits a test turns on.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Requests per second over all endpoints; past it, 429 `global-rate`.
    pub global_rate: Option<u32>,
    /// Requests per second per endpoint (method and path template); past it, 429 `endpoint-rate`.
    pub endpoint_rate: Option<u32>,
    /// Added to every request.
    pub latency: Duration,
    /// Every n-th request answers 500.
    pub server_error_every: Option<u64>,
    /// Every n-th request answers with a body that is not JSON.
    pub malformed_every: Option<u64>,
    /// Every n-th request has its connection cut mid-body.
    pub reset_every: Option<u64>,
    /// The next n requests answer 429 whatever the rate (a storm).
    pub rate_limit_storm: u64,
}

/// One stored object: enough to sort and filter without parsing it.
#[derive(Debug, Clone)]
struct Entry {
    id: String,
    created: i64,
    status: Option<String>,
    body: Body_,
}

#[derive(Debug, Clone)]
enum Body_ {
    /// The object's JSON.
    Json(Arc<str>),
    /// Rendered from the type's template with this id and created.
    Synthetic,
}

#[derive(Debug, Default)]
struct AccountData {
    /// Object type -> entries, newest first (created desc, id desc).
    objects: HashMap<String, Vec<Entry>>,
    /// Object type -> id -> created: where a `starting_after` cursor sits in `objects`, found by bisection.
    created_of: HashMap<String, HashMap<String, i64>>,
    /// `(list url)` -> every item of an embedded list, in order.
    lists: HashMap<String, Vec<Arc<str>>>,
    /// Events, newest first, with whether their webhook was delivered.
    events: Vec<(Entry, bool)>,
}

#[derive(Debug, Default)]
struct Fake {
    keys: HashSet<String>,
    /// List path -> object type (`/v1/customers` -> `customer`).
    paths: HashMap<String, String>,
    accounts: HashMap<String, AccountData>,
    templates: HashMap<String, Value>,
    /// Paths answering 400 "not set up" (a product not enabled on the account).
    disabled: HashSet<String>,
    forbidden: HashSet<String>,
    behaviour: Behaviour,
    /// Every request: (method and path template, account).
    log: Vec<(String, String)>,
    counter: u64,
    global_window: Vec<Instant>,
    endpoint_windows: HashMap<String, Vec<Instant>>,
    now: Option<i64>,
}

/// A running fake Stripe API on 127.0.0.1.
#[derive(Debug)]
pub struct FakeStripe {
    base: String,
    state: Arc<Mutex<Fake>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeStripe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn sort_key(e: &Entry) -> (std::cmp::Reverse<i64>, std::cmp::Reverse<String>) {
    (
        std::cmp::Reverse(e.created),
        std::cmp::Reverse(e.id.clone()),
    )
}

impl FakeStripe {
    /// Starts a fake accepting `key`, serving the list `paths` (path -> object type, as the registry has them).
    pub async fn start(key: &str, paths: impl IntoIterator<Item = (String, String)>) -> Self {
        let state = Arc::new(Mutex::new(Fake {
            keys: HashSet::from([key.to_owned()]),
            paths: paths.into_iter().collect(),
            ..Fake::default()
        }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = Router::new().fallback(handle).with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { base, state, task }
    }

    /// `http://127.0.0.1:<port>`, for `STRIPE_API_BASE`.
    #[must_use]
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sets faults and limits.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        self.state.lock().unwrap().behaviour = behaviour;
    }

    /// Makes `path` answer 400 as for a product the account has not enabled.
    pub fn disable(&self, path: &str) {
        self.state.lock().unwrap().disabled.insert(path.to_owned());
    }

    /// Makes `path` answer 403 as for a restricted key without that resource's read permission.
    pub fn forbid(&self, path: &str) {
        self.state.lock().unwrap().forbidden.insert(path.to_owned());
    }

    /// Freezes the fake's clock (for `/v1/events`' 30 days) at this unix second.
    pub fn set_now(&self, now: i64) {
        self.state.lock().unwrap().now = Some(now);
    }

    /// Adds or replaces an object of `account` (`PLATFORM` for the platform). Lists it embeds (`{"object":
    /// "list"}`) are kept whole and embedded cut at [`EMBEDDED_PAGE`], with `has_more` and their `url`.
    pub fn put(&self, account: &str, object: &Value) {
        let mut state = self.state.lock().unwrap();
        let data = state.accounts.entry(account.to_owned()).or_default();
        let mut object = object.clone();
        let kind = object["object"].as_str().unwrap_or_default().to_owned();
        let id = object["id"].as_str().unwrap_or_default().to_owned();
        if let Some(fields) = object.as_object_mut() {
            for (field, value) in fields.iter_mut() {
                if value["object"] != "list" {
                    continue;
                }
                let items: Vec<Value> = value["data"].as_array().cloned().unwrap_or_default();
                let url = value["url"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("/v1/{kind}s/{id}/{field}"));
                value["url"] = json!(url);
                value["has_more"] = json!(items.len() > EMBEDDED_PAGE);
                value["data"] = json!(items.iter().take(EMBEDDED_PAGE).collect::<Vec<_>>());
                value["total_count"] = json!(items.len());
                data.lists.insert(
                    url,
                    items.iter().map(|i| Arc::from(i.to_string())).collect(),
                );
            }
        }
        let entry = Entry {
            id: id.clone(),
            created: object["created"].as_i64().unwrap_or(0),
            status: object["status"].as_str().map(str::to_owned),
            body: Body_::Json(Arc::from(object.to_string())),
        };
        data.created_of
            .entry(kind.clone())
            .or_default()
            .insert(id.clone(), entry.created);
        let entries = data.objects.entry(kind).or_default();
        entries.retain(|e| e.id != id);
        let at = entries.partition_point(|e| sort_key(e) < sort_key(&entry));
        entries.insert(at, entry);
    }

    /// Removes an object (deleted at Stripe: retrieving it answers 404).
    pub fn remove(&self, account: &str, kind: &str, id: &str) {
        let mut state = self.state.lock().unwrap();
        if let Some(data) = state.accounts.get_mut(account) {
            if let Some(entries) = data.objects.get_mut(kind) {
                entries.retain(|e| e.id != id);
            }
            if let Some(ids) = data.created_of.get_mut(kind) {
                ids.remove(id);
            }
        }
    }

    /// Adds `count` synthetic objects of `template`'s type (ids `<prefix>_<n>`, `created` from `first_created`
    /// going up one second every `per_second` objects), rendered on request.
    pub fn put_synthetic(
        &self,
        account: &str,
        template: &Value,
        prefix: &str,
        count: usize,
        first_created: i64,
        per_second: usize,
    ) {
        let mut state = self.state.lock().unwrap();
        let kind = template["object"].as_str().unwrap_or_default().to_owned();
        state.templates.insert(kind.clone(), template.clone());
        let data = state.accounts.entry(account.to_owned()).or_default();
        let mut entries: Vec<Entry> = (0..count)
            .map(|n| Entry {
                id: format!("{prefix}_{n:09}"),
                created: first_created + (n / per_second.max(1)) as i64,
                status: template["status"].as_str().map(str::to_owned),
                body: Body_::Synthetic,
            })
            .collect();
        entries.sort_by_key(sort_key);
        data.created_of.insert(
            kind.clone(),
            entries.iter().map(|e| (e.id.clone(), e.created)).collect(),
        );
        data.objects.insert(kind, entries);
    }

    /// Adds an event to `GET /v1/events`; `delivered` false makes it match `delivery_success=false`.
    pub fn put_event(&self, account: &str, event: &Value, delivered: bool) {
        let mut state = self.state.lock().unwrap();
        let data = state.accounts.entry(account.to_owned()).or_default();
        let entry = Entry {
            id: event["id"].as_str().unwrap_or_default().to_owned(),
            created: event["created"].as_i64().unwrap_or(0),
            status: None,
            body: Body_::Json(Arc::from(event.to_string())),
        };
        let at = data
            .events
            .partition_point(|(e, _)| sort_key(e) < sort_key(&entry));
        data.events.insert(at, (entry, delivered));
    }

    /// The objects of a type as the API would list them all (newest first), rendered.
    #[must_use]
    pub fn objects(&self, account: &str, kind: &str) -> Vec<Value> {
        let state = self.state.lock().unwrap();
        let Some(data) = state.accounts.get(account) else {
            return Vec::new();
        };
        data.objects
            .get(kind)
            .map(|entries| entries.iter().map(|e| state.render(kind, e)).collect())
            .unwrap_or_default()
    }

    /// Requests served so far (method and path template, `Stripe-Account`), in order.
    #[must_use]
    pub fn requests(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().log.clone()
    }

    /// How many requests got a 429.
    #[must_use]
    pub fn rate_limited(&self) -> usize {
        self.state
            .lock()
            .unwrap()
            .log
            .iter()
            .filter(|(e, _)| e.starts_with("429 "))
            .count()
    }
}

impl Fake {
    fn render(&self, kind: &str, e: &Entry) -> Value {
        match &e.body {
            Body_::Json(text) => serde_json::from_str(text).unwrap_or(Value::Null),
            Body_::Synthetic => {
                let mut v = self.templates.get(kind).cloned().unwrap_or(Value::Null);
                v["id"] = json!(e.id);
                v["created"] = json!(e.created);
                v
            }
        }
    }

    fn now(&self) -> i64 {
        self.now.unwrap_or_else(crate::stripe::now)
    }

    /// Counts the request against the limits; the reason of a 429, if any.
    fn rate_limit(&mut self, endpoint: &str) -> Option<&'static str> {
        if self.behaviour.rate_limit_storm > 0 {
            self.behaviour.rate_limit_storm -= 1;
            return Some("global-rate");
        }
        let now = Instant::now();
        let second_ago = now - Duration::from_secs(1);
        self.global_window.retain(|t| *t > second_ago);
        if let Some(limit) = self.behaviour.global_rate
            && self.global_window.len() >= limit as usize
        {
            return Some("global-rate");
        }
        let window = self
            .endpoint_windows
            .entry(endpoint.to_owned())
            .or_default();
        window.retain(|t| *t > second_ago);
        if let Some(limit) = self.behaviour.endpoint_rate
            && window.len() >= limit as usize
        {
            return Some("endpoint-rate");
        }
        window.push(now);
        self.global_window.push(now);
        None
    }
}

fn error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({ "error": { "type": kind, "code": code, "message": message } })),
    )
        .into_response()
}

/// The `created` bounds of a query (`created[gte]` and friends, or `created=`), inclusive.
fn created_bounds(query: &HashMap<String, String>) -> (i64, i64) {
    let bound = |k: &str| query.get(k).and_then(|v| v.parse::<i64>().ok());
    let mut low = i64::MIN;
    let mut high = i64::MAX;
    if let Some(b) = bound("created[gte]") {
        low = low.max(b);
    }
    if let Some(b) = bound("created[gt]") {
        low = low.max(b.saturating_add(1));
    }
    if let Some(b) = bound("created[lte]") {
        high = high.min(b);
    }
    if let Some(b) = bound("created[lt]") {
        high = high.min(b.saturating_sub(1));
    }
    if let Some(b) = bound("created") {
        (low, high) = (low.max(b), high.min(b));
    }
    (low, high)
}

/// One page of `items` (already filtered, in list order) after `starting_after`. (The error is the response to
/// send, built once per bad request: its size doesn't matter.)
#[allow(clippy::result_large_err)]
fn page<T>(
    items: &[T],
    id_of: impl Fn(&T) -> &str,
    query: &HashMap<String, String>,
) -> Result<(Vec<usize>, bool), Response> {
    let limit = limit_of(query)?;
    let start = match query.get("starting_after") {
        Some(after) => match items.iter().position(|i| id_of(i) == after) {
            Some(at) => at + 1,
            None => {
                return Err(missing_cursor());
            }
        },
        None => 0,
    };
    let end = (start + limit).min(items.len());
    Ok(((start..end).collect(), end < items.len()))
}

/// `limit`: 10 by default, 1 to 100.
#[allow(clippy::result_large_err)]
fn limit_of(query: &HashMap<String, String>) -> Result<usize, Response> {
    let limit: usize = query
        .get("limit")
        .map(|l| l.parse().unwrap_or(0))
        .unwrap_or(10);
    if (1..=100).contains(&limit) {
        Ok(limit)
    } else {
        Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "parameter_invalid_integer",
            "limit must be between 1 and 100",
        ))
    }
}

fn missing_cursor() -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "resource_missing",
        "starting_after: no such object",
    )
}

fn list_body(url: &str, data: Vec<Value>, has_more: bool) -> Value {
    json!({ "object": "list", "url": url, "has_more": has_more, "data": data })
}

async fn handle(
    State(state): State<Arc<Mutex<Fake>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let path = uri.path().to_owned();
    let account = headers
        .get("stripe-account")
        .and_then(|v| v.to_str().ok())
        .unwrap_or(PLATFORM)
        .to_owned();
    let (latency, fault) = {
        let mut s = state.lock().unwrap();
        s.counter += 1;
        let n = s.counter;
        let b = &s.behaviour;
        let every = |e: Option<u64>| e.is_some_and(|e| e > 0 && n % e == 0);
        let fault = if every(b.reset_every) {
            Some("reset")
        } else if every(b.server_error_every) {
            Some("500")
        } else if every(b.malformed_every) {
            Some("malformed")
        } else {
            None
        };
        (b.latency, fault)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let key = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    let mut s = state.lock().unwrap();
    let endpoint = endpoint_of(&s, &method, &path);
    if !s.keys.contains(&key) {
        s.log.push((format!("401 {endpoint}"), account));
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "api_key_invalid",
            "Invalid API Key provided",
        );
    }
    if let Some(reason) = s.rate_limit(&endpoint) {
        s.log.push((format!("429 {endpoint}"), account));
        let mut response = error(
            StatusCode::TOO_MANY_REQUESTS,
            "invalid_request_error",
            "rate_limit",
            "Request rate limit exceeded.",
        );
        response
            .headers_mut()
            .insert("stripe-rate-limited-reason", reason.parse().unwrap());
        return response;
    }
    s.log.push((endpoint, account.clone()));
    match fault {
        Some("500") => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "",
                "An unknown error occurred",
            );
        }
        Some("malformed") => {
            return (StatusCode::OK, "{\"object\": \"list\", \"da").into_response();
        }
        Some("reset") => {
            let stream = futures::stream::iter([
                Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"{\"object\":")),
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "reset",
                )),
            ]);
            return (StatusCode::OK, Body::from_stream(stream)).into_response();
        }
        _ => {}
    }
    if s.forbidden.contains(&path) {
        return error(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            "",
            "The provided key does not have the required permissions for this endpoint.",
        );
    }
    if s.disabled.contains(&path) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "",
            "Your account is not set up to use this product.",
        );
    }
    serve(&s, &path, &account, &query)
}

/// The endpoint a request counts against: its method and path, ids replaced by `{id}`.
fn endpoint_of(s: &Fake, method: &Method, path: &str) -> String {
    if s.paths.contains_key(path) || path == "/v1/events" {
        return format!("{method} {path}");
    }
    let generic: Vec<&str> = path
        .split('/')
        .map(|part| {
            if part.contains('_') && part.len() > 3 {
                "{id}"
            } else {
                part
            }
        })
        .collect();
    format!("{method} {}", generic.join("/"))
}

fn serve(s: &Fake, path: &str, account: &str, query: &HashMap<String, String>) -> Response {
    let empty = AccountData::default();
    let data = s.accounts.get(account).unwrap_or(&empty);
    if path == "/v1/events" {
        let oldest = s.now() - 30 * 24 * 3600;
        if query
            .get("created[gte]")
            .and_then(|v| v.parse::<i64>().ok())
            .is_some_and(|t| t < oldest)
        {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "parameter_invalid_integer",
                "Events are kept for 30 days.",
            );
        }
        let undelivered = query.get("delivery_success").map(String::as_str) == Some("false");
        let (low, high) = created_bounds(query);
        let events: Vec<&Entry> = data
            .events
            .iter()
            .filter(|(e, delivered)| {
                e.created >= oldest
                    && (low..=high).contains(&e.created)
                    && !(undelivered && *delivered)
            })
            .map(|(e, _)| e)
            .collect();
        return match page(&events, |e| &e.id, query) {
            Ok((picked, has_more)) => axum::Json(list_body(
                path,
                picked
                    .iter()
                    .map(|&i| s.render("event", events[i]))
                    .collect(),
                has_more,
            ))
            .into_response(),
            Err(response) => response,
        };
    }
    if let Some(kind) = s.paths.get(path) {
        let hide_canceled = kind == "subscription" && !query.contains_key("status");
        let status = query.get("status").filter(|s| *s != "all");
        // Entries are kept newest first: the created bounds are a slice, found by bisection.
        let all = data.objects.get(kind).map_or(&[][..], Vec::as_slice);
        let (low, high) = created_bounds(query);
        let from = all.partition_point(|e| e.created > high);
        let to = all.partition_point(|e| e.created >= low).max(from);
        // The page starts just after the cursor, found by bisection on its (created, id): a page costs the
        // same at the end of a million objects as at the start.
        let begin = match query.get("starting_after") {
            None => from,
            Some(after) => match data.created_of.get(kind).and_then(|ids| ids.get(after)) {
                Some(&created) => {
                    let cursor = (std::cmp::Reverse(created), std::cmp::Reverse(after.clone()));
                    from + all[from..to].partition_point(|e| sort_key(e) <= cursor)
                }
                None => return missing_cursor(),
            },
        };
        let limit = match limit_of(query) {
            Ok(limit) => limit,
            Err(response) => return response,
        };
        let mut picked: Vec<&Entry> = all[begin..to]
            .iter()
            .filter(|e| !(hide_canceled && e.status.as_deref() == Some("canceled")))
            .filter(|e| status.is_none_or(|s| e.status.as_deref() == Some(s.as_str())))
            .take(limit + 1)
            .collect();
        let has_more = picked.len() > limit;
        picked.truncate(limit);
        return axum::Json(list_body(
            path,
            picked.iter().map(|e| s.render(kind, e)).collect(),
            has_more,
        ))
        .into_response();
    }
    if let Some(items) = data.lists.get(path) {
        let ids: Vec<String> = items
            .iter()
            .map(|i| {
                serde_json::from_str::<Value>(i).map_or(String::new(), |v| {
                    v["id"].as_str().unwrap_or_default().to_owned()
                })
            })
            .collect();
        return match page(&ids, String::as_str, query) {
            Ok((picked, has_more)) => axum::Json(list_body(
                path,
                picked
                    .iter()
                    .map(|&i| serde_json::from_str(&items[i]).unwrap_or(Value::Null))
                    .collect(),
                has_more,
            ))
            .into_response(),
            Err(response) => response,
        };
    }
    // Retrieve: `<list path>/<id>`.
    if let Some((list_path, id)) = path.rsplit_once('/')
        && let Some(kind) = s.paths.get(list_path)
    {
        let found = data
            .objects
            .get(kind)
            .and_then(|v| v.iter().find(|e| e.id == id));
        return match found {
            Some(e) => axum::Json(s.render(kind, e)).into_response(),
            None => error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "resource_missing",
                &format!("No such {kind}: '{id}'"),
            ),
        };
    }
    error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "",
        &format!("Unrecognized request URL (GET: {path})."),
    )
}

/// The fake's data, summarised per type, for comparing with tables: object type -> (id -> object).
#[must_use]
pub fn by_id(objects: &[Value]) -> BTreeMap<String, Value> {
    objects
        .iter()
        .map(|o| (o["id"].as_str().unwrap_or_default().to_owned(), o.clone()))
        .collect()
}
