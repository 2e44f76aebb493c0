//! The Stripe API client of the API side: one place for the key, the pinned API version, Connect headers, the rate
//! budget (the account's and each endpoint's, shared by every caller in the process) and retries. A 429 backs off
//! with jitter (Stripe documents no `Retry-After`), `Stripe-Should-Retry` is honoured, a 429 `lock_timeout` is
//! contention on one object rather than a rate limit, a 401 stops everything at once with a clear error, and a 403 (a
//! restricted key without this resource's permission, an account that revoked access) is refused at once, never
//! retried: the caller skips what it may not read.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use crate::settings::StripeSettings;

/// Why a request did not give an object.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The key was refused: nothing else will work either.
    #[error(
        "Stripe refused the API key ({status}: {message}); check STRIPE_API_KEY (a secret key sk_... or a \
         restricted key rk_... with read access)"
    )]
    Unauthorized {
        /// 401.
        status: u16,
        /// Stripe's message.
        message: String,
    },
    /// Stripe answered an error retrying can't fix (400, 402, 403, 404, 409): a product not enabled, a permission
    /// the key lacks, an object gone.
    #[error("{status} {code}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Stripe's error code (`resource_missing`...), if any.
        code: String,
        /// Stripe's message.
        message: String,
    },
    /// A well-formed answer that isn't what Stripe sends (a list page without `data`, an item without an id):
    /// never taken for the end of a list.
    #[error("Stripe's answer can't be read: {0}")]
    Unreadable(String),
    /// Retries ran out.
    #[error("gave up after {attempts} attempts: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
}

impl ApiError {
    /// Stripe says the object (or the list's parent) does not exist: a 404 with code `resource_missing`. Any other
    /// 404 (a path Stripe doesn't know, an API not enabled) says nothing about the object.
    #[must_use]
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Refused { status: 404, code, .. } if code == "resource_missing")
    }
}

/// An object id as one segment of a request path: percent-encoded, so an id from a payload (`../`, `?`, `#`, a
/// space) can only ever name one object.
#[must_use]
pub fn path_segment(id: &str) -> String {
    const ID: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'_').remove(b'-');
    percent_encoding::utf8_percent_encode(id, ID).to_string()
}

/// What to do with one response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A JSON object: done.
    Done,
    /// Try again after a backoff; the reason is logged.
    Retry(String),
    /// Stop: the key is refused.
    Unauthorized,
    /// Stop: an error retrying can't fix.
    Refused,
}

/// Classifies a response (pure, unit-tested): `should_retry` is the `Stripe-Should-Retry` header, `code` the
/// error's `code`, `rate_limited_reason` the `Stripe-Rate-Limited-Reason` header.
#[must_use]
pub fn classify(
    status: u16,
    should_retry: Option<bool>,
    code: &str,
    rate_limited_reason: Option<&str>,
) -> Outcome {
    if status == 401 {
        return Outcome::Unauthorized;
    }
    if status == 403 {
        return Outcome::Refused;
    }
    if (200..300).contains(&status) {
        return Outcome::Done;
    }
    let retry = match should_retry {
        Some(header) => header,
        None => status == 429 || status >= 500,
    };
    if !retry {
        return Outcome::Refused;
    }
    if status == 429 && code == "lock_timeout" {
        return Outcome::Retry("lock_timeout: another request holds the object".into());
    }
    match rate_limited_reason {
        Some(reason) => Outcome::Retry(format!("rate limited ({reason})")),
        None => Outcome::Retry(format!("status {status}")),
    }
}

/// True for a `sk_live_`/`rk_live_` key: live mode's budget (100 requests/s) applies; else test mode's (25/s).
#[must_use]
pub fn is_live_key(key: &str) -> bool {
    key.starts_with("sk_live_") || key.starts_with("rk_live_")
}

/// The Stripe API, rate-limited and retrying.
#[derive(Debug)]
pub struct StripeClient {
    http: reqwest::Client,
    base: String,
    key: SecretString,
    version: String,
    global: DefaultDirectRateLimiter,
    endpoints: DefaultKeyedRateLimiter<String>,
    max_attempts: u32,
    backoff_initial: Duration,
    backoff_max: Duration,
}

/// A budget of `n` requests per second: never more than n + 1 in any one-second window, so a budget set just under
/// Stripe's limit (100/s, 25/s per endpoint) never meets it, whatever the concurrency. Requests are spaced at
/// 1/(n + 1 - b) s with a burst of b = n/25 (1 to 4): the burst absorbs a waiter's wake-up coming late (timers fire
/// up to a millisecond after the slot, and a waiter may be busy), which with no burst at all loses the slot for
/// good: about 10 % of the budget at 100/s.
fn per_second(n: u32) -> Quota {
    let burst = (n / 25).clamp(1, 4);
    let rate = (n + 1).saturating_sub(burst).max(1);
    Quota::per_second(NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN))
        .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN))
}

impl StripeClient {
    /// A client with the settings' key, base, version and budget. Fails without a key.
    pub fn new(settings: &StripeSettings) -> anyhow::Result<Self> {
        let key = settings
            .api_key
            .clone()
            .filter(|k| !k.expose_secret().is_empty())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no Stripe API key: set STRIPE_API_KEY (a restricted key rk_... with read access is enough)"
                )
            })?;
        let live = is_live_key(key.expose_secret());
        let rate = if live {
            settings.live_requests_per_second
        } else {
            settings.test_requests_per_second
        };
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(settings.request_timeout)
                .user_agent(concat!("stripe-sync/", env!("CARGO_PKG_VERSION")))
                .build()?,
            base: settings.api_base.trim_end_matches('/').to_owned(),
            key,
            version: settings.api_version.clone(),
            global: RateLimiter::direct(per_second(rate.get())),
            endpoints: RateLimiter::keyed(per_second(settings.endpoint_requests_per_second.get())),
            max_attempts: settings.max_attempts.get(),
            backoff_initial: Duration::from_millis(500).min(settings.retry_max_wait),
            backoff_max: settings.retry_max_wait,
        })
    }

    /// True for a live key: it reads live objects only.
    #[must_use]
    pub fn is_live(&self) -> bool {
        is_live_key(self.key.expose_secret())
    }

    /// The pinned API version.
    pub fn api_version(&self) -> &str {
        &self.version
    }

    /// GETs `path` (counted against `endpoint`, e.g. `/v1/customers/{id}`) for `account` (a connected account,
    /// or `None` for the platform), retrying what can pass; the JSON object Stripe answered.
    pub async fn get(
        &self,
        endpoint: &str,
        path: &str,
        query: &[(String, String)],
        account: Option<&str>,
    ) -> Result<Value, ApiError> {
        let mut last = String::new();
        for attempt in 1..=self.max_attempts {
            self.ready(endpoint).await;
            let mut request = self
                .http
                .get(format!("{}{path}", self.base))
                .bearer_auth(self.key.expose_secret())
                .header("Stripe-Version", &self.version)
                .query(query);
            if let Some(account) = account {
                request = request.header("Stripe-Account", account);
            }
            match self.send(endpoint, request).await {
                Ok(value) => return Ok(value),
                Err(Err(err)) => return Err(err),
                Err(Ok(reason)) => last = reason,
            }
            let wait = self.backoff(attempt);
            tracing::warn!(endpoint, attempt, reason = %last, retry_in = ?wait, "Stripe request failed; retrying");
            tokio::time::sleep(wait).await;
        }
        Err(ApiError::GaveUp {
            attempts: self.max_attempts,
            last,
        })
    }

    /// Every connected account's id, from `GET /v1/accounts`.
    pub async fn connected_accounts(&self) -> Result<Vec<String>, ApiError> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut query = vec![("limit".to_owned(), "100".to_owned())];
            if let Some(after) = &cursor {
                query.push(("starting_after".into(), after.clone()));
            }
            let page = self
                .get("/v1/accounts", "/v1/accounts", &query, None)
                .await?;
            let Some(data) = page["data"].as_array() else {
                return Err(ApiError::Unreadable(
                    "GET /v1/accounts answered a page without a data array".into(),
                ));
            };
            out.extend(
                data.iter()
                    .filter_map(|a| a["id"].as_str().map(str::to_owned)),
            );
            cursor = data
                .last()
                .and_then(|a| a["id"].as_str().map(str::to_owned));
            if page["has_more"] != Value::Bool(true) || cursor.is_none() {
                return Ok(out);
            }
        }
    }

    /// Waits until a request to `endpoint` fits both budgets: its endpoint's slot first, then the account's.
    /// While the account's budget binds (many types at once), a request waiting for it holds only an endpoint slot
    /// nobody else needed. The price: a request may go out up to its wait for the account's slot after its endpoint
    /// slot, so an endpoint's requests can arrive a little bunched; keep the endpoint budget a request or two under
    /// Stripe's 25 (the default is 20). Taking both at the same moment instead (a slot given up when the other is
    /// not free at once) was measured slower: 0.80 and 0.66 of Stripe's bound against 0.92 (docs/benchmarks.md).
    async fn ready(&self, endpoint: &str) {
        self.endpoints.until_key_ready(&endpoint.to_owned()).await;
        self.global.until_ready().await;
    }

    /// One attempt: the object, or `Err(Ok(reason))` to retry, or `Err(Err(error))` to stop.
    async fn send(
        &self,
        endpoint: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<Value, Result<String, ApiError>> {
        use stripe_sync_shared::metrics::names;
        let response = request.send().await.map_err(|e| {
            metrics::counter!(names::STRIPE_REQUESTS, "endpoint" => endpoint.to_owned(), "status" => "error")
                .increment(1);
            Ok(format!("request failed: {e}"))
        })?;
        let status = response.status().as_u16();
        metrics::counter!(names::STRIPE_REQUESTS, "endpoint" => endpoint.to_owned(), "status" => status.to_string())
            .increment(1);
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let should_retry = header("stripe-should-retry").map(|v| v == "true");
        let reason = header("stripe-rate-limited-reason");
        let body = response
            .bytes()
            .await
            .map_err(|e| Ok(format!("reading the response failed: {e}")))?;
        let json: Option<Value> = serde_json::from_slice(&body).ok();
        let error = json.as_ref().map(|j| &j["error"]);
        let text = |field: &str| {
            error
                .and_then(|e| e[field].as_str())
                .unwrap_or_default()
                .to_owned()
        };
        if status == 429 {
            let why = reason.clone().unwrap_or_else(|| match text("code") {
                code if code.is_empty() => "unknown".to_owned(),
                code => code,
            });
            metrics::counter!(names::RATE_LIMITED, "reason" => why).increment(1);
        }
        match classify(status, should_retry, &text("code"), reason.as_deref()) {
            Outcome::Done => match json {
                Some(value) if value.is_object() => Ok(value),
                _ => Err(Ok(format!(
                    "status {status} with a body that is not a JSON object"
                ))),
            },
            Outcome::Retry(why) => Err(Ok(why)),
            Outcome::Unauthorized => Err(Err(ApiError::Unauthorized {
                status,
                message: text("message"),
            })),
            Outcome::Refused => Err(Err(ApiError::Refused {
                status,
                code: text("code"),
                message: text("message"),
            })),
        }
    }

    /// The `attempt`th wait: doubling from 0.5 s up to `stripe.retry_max_wait` (20 s), between half and all of it.
    fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .backoff_initial
            .saturating_mul(1 << attempt.saturating_sub(1).min(10))
            .min(self.backoff_max);
        ceiling.mul_f64(0.5f64.mul_add(fastrand::f64(), 0.5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_stripes_resource_missing_means_the_object_is_gone() {
        let refused = |status: u16, code: &str| ApiError::Refused {
            status,
            code: code.into(),
            message: String::new(),
        };
        assert!(refused(404, "resource_missing").is_not_found());
        // A path Stripe doesn't route (no code), or an API the account lacks, says nothing about the object.
        assert!(!refused(404, "").is_not_found());
        assert!(!refused(400, "resource_missing").is_not_found());
    }

    #[test]
    fn an_id_is_one_path_segment_whatever_it_holds() {
        assert_eq!(path_segment("cus_Ab-9"), "cus_Ab-9");
        assert_eq!(
            path_segment("../v1/accounts?x=1#y z"),
            "%2E%2E%2Fv1%2Faccounts%3Fx%3D1%23y%20z"
        );
        assert!(!path_segment("a/b").contains('/'));
    }

    #[test]
    fn responses_are_retried_refused_or_fatal_as_stripe_documents() {
        assert_eq!(classify(200, None, "", None), Outcome::Done);
        assert_eq!(classify(401, Some(true), "", None), Outcome::Unauthorized);
        assert_eq!(
            classify(403, Some(true), "", None),
            Outcome::Refused,
            "a permission the key lacks: never retried, the caller skips"
        );
        for status in [400, 402, 404, 409] {
            assert_eq!(
                classify(status, None, "resource_missing", None),
                Outcome::Refused
            );
        }
        assert_eq!(
            classify(429, None, "rate_limit", Some("endpoint-rate")),
            Outcome::Retry("rate limited (endpoint-rate)".into())
        );
        assert!(
            matches!(classify(429, None, "lock_timeout", None), Outcome::Retry(r) if r.contains("lock_timeout"))
        );
        assert!(matches!(classify(503, None, "", None), Outcome::Retry(_)));
        assert_eq!(
            classify(500, Some(false), "", None),
            Outcome::Refused,
            "Stripe-Should-Retry: false wins"
        );
        assert!(matches!(
            classify(409, Some(true), "", None),
            Outcome::Retry(_)
        ));
    }

    #[test]
    fn live_keys_get_the_live_budget() {
        assert!(is_live_key("sk_live_x") && is_live_key("rk_live_x"));
        assert!(!is_live_key("sk_test_x") && !is_live_key("rk_test_x"));
    }

    /// A greedy client never puts more than n + 1 requests in any one-second window, and sustains nearly n per
    /// second even when every wake-up comes up to 2 ms late (a timer's resolution, a busy task): with a budget of
    /// 99/s, Stripe's 100/s is never met and little of it is lost.
    #[test]
    fn the_budget_never_exceeds_the_rate_in_any_second_and_sustains_it_despite_late_wake_ups() {
        use governor::clock::{Clock as _, FakeRelativeClock, Reference as _};
        let mut rng = fastrand::Rng::with_seed(7);
        for n in [1, 8, 20, 25, 80, 98] {
            let clock = FakeRelativeClock::default();
            let start = clock.now();
            let limiter = RateLimiter::direct_with_clock(per_second(n), clock.clone());
            let mut sent: Vec<Duration> = Vec::new();
            while clock.now().duration_since(start) < Duration::from_secs(10).into() {
                match limiter.check() {
                    Ok(()) => sent.push(clock.now().duration_since(start).into()),
                    Err(not_until) => {
                        let late = Duration::from_micros(rng.u64(0..2_000));
                        clock.advance(not_until.wait_time_from(clock.now()) + late);
                    }
                }
            }
            let most = (0..sent.len())
                .map(|i| {
                    sent[i..]
                        .iter()
                        .take_while(|t| **t < sent[i] + Duration::from_secs(1))
                        .count()
                })
                .max()
                .unwrap();
            assert!(most <= n as usize + 1, "{n}/s: {most} in one second");
            let sustained = sent.len() as f64 / 10.0;
            assert!(
                sustained >= f64::from(n).mul_add(0.95, -1.0),
                "{n}/s: only {sustained}/s sustained"
            );
        }
    }
}
