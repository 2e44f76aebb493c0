//! docker-compose.yml can't run here (no Docker engine), so it is checked against the code: services, images,
//! ports, and every environment variable loaded through the binaries' own settings loaders.

use std::collections::HashMap;
use std::path::Path;

use secrecy::ExposeSecret;
use serde_yaml_ng::Value;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn compose() -> Value {
    serde_yaml_ng::from_str(&std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap())
        .unwrap()
}

/// What an operator sets `var` to (compose refuses to start without the required ones).
fn operator_value(var: &str) -> String {
    if var.ends_with("WEBHOOK_SECRET") {
        "whsec_set_by_the_operator".to_owned()
    } else {
        format!(
            "{}0set0by0the0operator",
            var.to_lowercase().replace('_', "")
        )
    }
}

/// Each `${VAR:-default}` resolves to its default, as compose does when VAR is unset; `${VAR:?message}` (compose
/// refuses to start while VAR is unset) and `${VAR}` to a value the operator would have set.
fn interpolate(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = start + rest[start..].find('}').expect("closed ${...}");
        let inner = &rest[start + 2..end];
        out.push_str(&match (inner.find(":-"), inner.find(":?")) {
            (Some(i), _) => inner[i + 2..].to_owned(),
            (None, Some(i)) => operator_value(&inner[..i]),
            (None, None) => operator_value(inner),
        });
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn environment(service: &Value) -> HashMap<String, String> {
    service["environment"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let value = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => panic!("unexpected env value {other:?}"),
            };
            (k.as_str().unwrap().to_owned(), interpolate(&value))
        })
        .collect()
}

/// Every variable must be one a binary reads: a plain name it honours, or a `STRIPE_SYNC__` one.
fn assert_known_variables(
    env: &HashMap<String, String>,
    plain: &[stripe_sync_shared::settings::PlainEnv],
    service: &str,
) {
    for name in env.keys() {
        let known = name.starts_with("STRIPE_SYNC__")
            || stripe_sync_shared::settings::SHARED_PLAIN_ENV
                .iter()
                .chain(plain)
                .any(|p| p.var == name);
        assert!(known, "{service}: {name} is read by nothing");
    }
}

#[test]
fn compose_runs_the_four_parts_on_the_ports_and_variables_the_code_uses() {
    let compose = compose();
    let services = &compose["services"];
    for name in ["postgres", "nats", "ingest", "applier"] {
        assert!(services.get(name).is_some(), "service {name} missing");
    }

    // NATS >= 2.11, JetStream on, payloads big enough for ingest's body limit.
    let image = services["nats"]["image"].as_str().unwrap();
    let version = image.split(':').nth(1).unwrap().split('-').next().unwrap();
    let (major, minor) = version
        .split_once('.')
        .map(|(a, b)| (a.parse::<u32>().unwrap(), b.parse::<u32>().unwrap()))
        .unwrap();
    assert!((major, minor) >= (2, 11), "{image}");
    let conf = std::fs::read_to_string(repo().join("deploy/nats.conf")).unwrap();
    assert!(conf.contains("jetstream"), "JetStream enabled");
    let mounted = services["nats"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|v| v.as_str().unwrap().starts_with("./deploy/nats.conf:"));
    assert!(mounted, "nats.conf is mounted");
    // NATS admits no anonymous client: the users' passwords come from variables compose requires.
    for var in ["NATS_INGEST_PASSWORD", "NATS_APPLIER_PASSWORD"] {
        assert!(
            conf.contains(&format!("password: ${var}")),
            "nats.conf takes {var}"
        );
        let set = services["nats"]["environment"][var].as_str().unwrap();
        assert!(
            set.starts_with(&format!("${{{var}:?")),
            "compose requires {var}: {set}"
        );
    }
    let max_payload_mb: usize = conf
        .lines()
        .find_map(|l| l.trim().strip_prefix("max_payload:"))
        .map(|v| v.trim().trim_end_matches("MB").parse().unwrap())
        .unwrap();

    // Locked down: only ingest is reachable from other hosts, and there is no default webhook secret.
    for service in ["postgres", "nats", "jaeger"] {
        for port in services[service]["ports"].as_sequence().unwrap() {
            let port = port.as_str().unwrap();
            assert!(
                port.starts_with("127.0.0.1:"),
                "{service} publishes {port} on localhost only"
            );
        }
    }
    let secret = services["ingest"]["environment"]["STRIPE_WEBHOOK_SECRET"]
        .as_str()
        .unwrap();
    assert!(
        secret.starts_with("${STRIPE_WEBHOOK_SECRET:?"),
        "compose refuses to start without a webhook secret: {secret}"
    );

    // Ingest: its settings load from the compose environment and match the published port.
    let ingest_env = environment(&services["ingest"]);
    assert_known_variables(
        &ingest_env,
        stripe_sync_ingest::settings::PLAIN_ENV,
        "ingest",
    );
    let ingest = stripe_sync_ingest::settings::Settings::load_from(&ingest_env)
        .expect("ingest settings from compose");
    let ports: Vec<&str> = services["ingest"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(
        ports.contains(&format!("8080:{}", ingest.http.port).as_str()),
        "{ports:?}"
    );
    assert!(
        !ingest.webhook.secrets.is_empty(),
        "a webhook secret is configured"
    );
    assert_eq!(
        ingest.nats.url.expose_secret(),
        format!(
            "nats://ingest:{}@nats:4222",
            operator_value("NATS_INGEST_PASSWORD")
        )
    );
    assert!(
        ingest.http.body_limit + 16 * 1024 <= max_payload_mb * 1024 * 1024,
        "body limit fits NATS max_payload"
    );

    // Applier: database URL matches the postgres service's credentials and database.
    let applier_env = environment(&services["applier"]);
    assert_known_variables(
        &applier_env,
        stripe_sync_applier::settings::PLAIN_ENV,
        "applier",
    );
    let applier = stripe_sync_applier::settings::Settings::load_from(&applier_env)
        .expect("applier settings from compose");
    let pg = environment(&services["postgres"]);
    let expected = format!(
        "postgres://{}:{}@postgres:5432/{}",
        pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"]
    );
    assert_eq!(applier.database.url.expose_secret(), expected);
    assert_eq!(
        applier.nats.url.expose_secret(),
        format!(
            "nats://applier:{}@nats:4222",
            operator_value("NATS_APPLIER_PASSWORD")
        )
    );
    assert!(
        applier.database.run_migrations,
        "docker compose up runs the migrations"
    );
    assert_eq!(
        applier.stream.name, ingest.stream.name,
        "both use one stream"
    );

    // Both images come from the Dockerfile's targets, and start after what they need.
    let dockerfile = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    for (service, needs) in [
        ("ingest", &["nats"][..]),
        ("applier", &["postgres", "nats"][..]),
    ] {
        let target = services[service]["build"]["target"].as_str().unwrap();
        assert!(
            dockerfile.contains(&format!("AS {target}")),
            "Dockerfile has target {target}"
        );
        for need in needs {
            assert!(
                services[service]["depends_on"].get(*need).is_some(),
                "{service} waits for {need}"
            );
        }
    }
    if let Some(endpoint) = ingest.telemetry.otlp_endpoint {
        let host = endpoint
            .trim_start_matches("http://")
            .split(':')
            .next()
            .unwrap()
            .to_owned();
        assert!(
            services.get(host.as_str()).is_some(),
            "trace collector {host} is a service"
        );
    }
}
