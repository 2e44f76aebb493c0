//! Stripe webhook signatures: `Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>...]`, where each `v1` is
//! hex(HMAC-SHA256(key = the whole `whsec_...` secret, message = `"<t>." + raw body`)).
//!
//! Pure: no I/O, the clock is an argument. Any `v1` under any configured secret (several during a rotation)
//! accepts the body; comparisons are constant-time.

use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a request's signature was refused. The messages are safe to return to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No `Stripe-Signature` header.
    #[error("missing Stripe-Signature header")]
    Missing,
    /// The header is not `t=...,v1=...`.
    #[error("malformed Stripe-Signature header: {0}")]
    Malformed(&'static str),
    /// The timestamp is older than the tolerance.
    #[error("signature timestamp is {age_secs}s old, beyond the {tolerance_secs}s tolerance")]
    Stale {
        /// Age of the timestamp.
        age_secs: u64,
        /// Configured tolerance.
        tolerance_secs: u64,
    },
    /// The timestamp is further in the future than the tolerance.
    #[error(
        "signature timestamp is {ahead_secs}s in the future, beyond the {tolerance_secs}s tolerance"
    )]
    Future {
        /// How far ahead of our clock.
        ahead_secs: u64,
        /// Configured tolerance.
        tolerance_secs: u64,
    },
    /// No `v1` matches under any configured secret: wrong secret, or the body was altered.
    #[error("no v1 signature matches the body under the configured secret(s)")]
    Mismatch,
}

/// Verifies signatures against one or more secrets (several while a secret is rolled).
#[derive(Clone)]
pub struct Verifier {
    // Keyed HMAC states, prepared once; each request clones one instead of redoing the key schedule.
    keys: Vec<HmacSha256>,
    tolerance: Duration,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("secrets", &self.keys.len())
            .field("tolerance", &self.tolerance)
            .finish()
    }
}

/// Parsed `Stripe-Signature` header.
#[derive(Debug, PartialEq, Eq)]
pub struct SignatureHeader {
    /// `t`, unix seconds.
    pub timestamp: i64,
    /// Every well-formed `v1` signature (32 bytes each).
    pub v1: Vec<[u8; 32]>,
}

impl SignatureHeader {
    /// Parses the header. Unknown schemes (`v0`, future ones) are ignored; a `v1` that is not 64 hex digits is
    /// ignored too, as long as another one is usable.
    pub fn parse(header: &str) -> Result<Self, SignatureError> {
        let mut timestamp = None;
        let mut v1 = Vec::new();
        let mut saw_v1 = false;
        for item in header.split(',') {
            let Some((key, value)) = item.trim().split_once('=') else {
                return Err(SignatureError::Malformed("items must be key=value"));
            };
            match key.trim() {
                "t" => {
                    if timestamp.is_some() {
                        return Err(SignatureError::Malformed("more than one timestamp"));
                    }
                    let t = value
                        .trim()
                        .parse::<i64>()
                        .map_err(|_| SignatureError::Malformed("timestamp is not an integer"))?;
                    timestamp = Some(t);
                }
                "v1" => {
                    saw_v1 = true;
                    let mut sig = [0u8; 32];
                    if hex::decode_to_slice(value.trim(), &mut sig).is_ok() {
                        v1.push(sig);
                    }
                }
                _ => {}
            }
        }
        let timestamp = timestamp.ok_or(SignatureError::Malformed("no timestamp (t=)"))?;
        if v1.is_empty() {
            return Err(SignatureError::Malformed(if saw_v1 {
                "no v1 signature is 64 hex digits"
            } else {
                "no v1 signature"
            }));
        }
        Ok(Self { timestamp, v1 })
    }
}

impl Verifier {
    /// Builds a verifier; `secrets` must not be empty.
    pub fn new(secrets: &[SecretString], tolerance: Duration) -> Result<Self, &'static str> {
        if secrets.is_empty() {
            return Err("no webhook secret configured");
        }
        let keys = secrets
            .iter()
            .map(|s| {
                HmacSha256::new_from_slice(s.expose_secret().as_bytes())
                    .map_err(|_| "invalid key length")
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { keys, tolerance })
    }

    /// Checks a request: the header, the timestamp against `now_unix` and the tolerance, then the signatures.
    pub fn verify(
        &self,
        header: Option<&str>,
        body: &[u8],
        now_unix: i64,
    ) -> Result<(), SignatureError> {
        let header = SignatureHeader::parse(header.ok_or(SignatureError::Missing)?)?;
        let tolerance = self.tolerance.as_secs();
        let age = now_unix.saturating_sub(header.timestamp);
        if age > 0 && age.unsigned_abs() > tolerance {
            return Err(SignatureError::Stale {
                age_secs: age.unsigned_abs(),
                tolerance_secs: tolerance,
            });
        }
        if age < 0 && age.unsigned_abs() > tolerance {
            return Err(SignatureError::Future {
                ahead_secs: age.unsigned_abs(),
                tolerance_secs: tolerance,
            });
        }
        let prefix = format!("{}.", header.timestamp);
        for key in &self.keys {
            let mut mac = key.clone();
            mac.update(prefix.as_bytes());
            mac.update(body);
            for sig in &header.v1 {
                // verify_slice compares in constant time.
                if mac.clone().verify_slice(sig).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
        format!(
            "t={timestamp},v1={}",
            signature_hex(secret, timestamp, body)
        )
    }

    fn signature_hex(secret: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac =
            HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
        mac.update(format!("{timestamp}.").as_bytes());
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    const NOW: i64 = 1_700_000_000;
    const BODY: &[u8] = br#"{"id":"evt_1","type":"customer.created"}"#;

    fn verifier(secrets: &[&str]) -> Verifier {
        let secrets: Vec<SecretString> = secrets.iter().map(|s| SecretString::from(*s)).collect();
        Verifier::new(&secrets, Duration::from_secs(300)).unwrap()
    }

    #[test]
    fn matches_stripes_reference_vector() {
        // Computed independently with Python: hmac.new(b"whsec_test", b"1700000000." + BODY, sha256).hexdigest()
        assert_eq!(
            signature_hex("whsec_test", NOW, BODY),
            "727c09138c261236068b520ff908aecb224c08d253eb2d0fcc71eda5643fc665"
        );
    }

    #[test]
    fn accepts_a_valid_signature() {
        let v = verifier(&["whsec_a"]);
        assert_eq!(
            v.verify(Some(&sign("whsec_a", NOW, BODY)), BODY, NOW),
            Ok(())
        );
    }

    #[test]
    fn accepts_when_any_of_several_v1_matches() {
        let v = verifier(&["whsec_a"]);
        let header = format!(
            "t={NOW},v1={},v1={},v0=abc",
            signature_hex("whsec_old", NOW, BODY),
            signature_hex("whsec_a", NOW, BODY)
        );
        assert_eq!(v.verify(Some(&header), BODY, NOW), Ok(()));
    }

    #[test]
    fn accepts_any_configured_secret_during_rotation() {
        let v = verifier(&["whsec_new", "whsec_old"]);
        assert_eq!(
            v.verify(Some(&sign("whsec_old", NOW, BODY)), BODY, NOW),
            Ok(())
        );
        assert_eq!(
            v.verify(Some(&sign("whsec_new", NOW, BODY)), BODY, NOW),
            Ok(())
        );
    }

    #[test]
    fn refuses_a_wrong_secret_and_a_tampered_body() {
        let v = verifier(&["whsec_a"]);
        assert_eq!(
            v.verify(Some(&sign("whsec_b", NOW, BODY)), BODY, NOW),
            Err(SignatureError::Mismatch)
        );
        let tampered = br#"{"id":"evt_1","type":"customer.deleted"}"#;
        assert_eq!(
            v.verify(Some(&sign("whsec_a", NOW, BODY)), tampered, NOW),
            Err(SignatureError::Mismatch)
        );
        // The timestamp is signed too: changing it breaks the signature.
        let moved = sign("whsec_a", NOW, BODY).replace(&NOW.to_string(), &(NOW + 1).to_string());
        assert_eq!(
            v.verify(Some(&moved), BODY, NOW),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn refuses_stale_and_future_timestamps_at_the_tolerance_edge() {
        let v = verifier(&["whsec_a"]);
        assert_eq!(
            v.verify(Some(&sign("whsec_a", NOW - 300, BODY)), BODY, NOW),
            Ok(())
        );
        assert!(matches!(
            v.verify(Some(&sign("whsec_a", NOW - 301, BODY)), BODY, NOW),
            Err(SignatureError::Stale { age_secs: 301, .. })
        ));
        assert_eq!(
            v.verify(Some(&sign("whsec_a", NOW + 300, BODY)), BODY, NOW),
            Ok(())
        );
        assert!(matches!(
            v.verify(Some(&sign("whsec_a", NOW + 301, BODY)), BODY, NOW),
            Err(SignatureError::Future {
                ahead_secs: 301,
                ..
            })
        ));
    }

    #[test]
    fn refuses_missing_and_malformed_headers() {
        let v = verifier(&["whsec_a"]);
        assert_eq!(v.verify(None, BODY, NOW), Err(SignatureError::Missing));
        for header in [
            "",
            "garbage",
            "t=abc,v1=00",
            "v1=00",
            "t=1700000000",
            "t=1700000000,v1=xyz",
            "t=1,t=2,v1=00",
        ] {
            assert!(
                matches!(
                    v.verify(Some(header), BODY, NOW),
                    Err(SignatureError::Malformed(_))
                ),
                "{header:?} should be malformed"
            );
        }
    }

    #[test]
    fn tolerates_spaces_and_unknown_schemes() {
        let v = verifier(&["whsec_a"]);
        let header = format!(
            " t={NOW} , v2=zzz , v1={} ",
            signature_hex("whsec_a", NOW, BODY)
        );
        assert_eq!(v.verify(Some(&header), BODY, NOW), Ok(()));
    }

    #[test]
    fn needs_at_least_one_secret() {
        assert!(Verifier::new(&[], Duration::from_secs(1)).is_err());
    }

    proptest::proptest! {
        #[test]
        fn the_header_parser_never_panics(header in ".{0,300}") {
            let _ = SignatureHeader::parse(&header);
        }

        #[test]
        fn header_shaped_input_never_panics(header in "( ?(t|v1|v0|x)=[0-9a-fA-F,=-]{0,70} ?,?){0,6}") {
            let _ = verifier(&["whsec_a"]).verify(Some(&header), b"{}", NOW);
        }

        #[test]
        fn verify_never_panics_on_any_input(
            header in proptest::option::of(".{0,200}"),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            now in proptest::prelude::any::<i64>(),
        ) {
            let _ = verifier(&["whsec_a", "whsec_b"]).verify(header.as_deref(), &body, now);
        }

        #[test]
        fn what_stripe_signs_is_accepted(secret in "whsec_[a-zA-Z0-9]{1,40}", body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512), skew in -300i64..=300) {
            let header = sign(&secret, NOW + skew, &body);
            proptest::prop_assert_eq!(verifier(&[&secret]).verify(Some(&header), &body, NOW), Ok(()));
        }
    }
}
