//! The Kubernetes manifests (deploy/k8s) and the NATS Helm values (deploy/nats) can't run here (no cluster): they
//! are checked against the code. Every variable the manifests set is one the binaries read and loads, their ports,
//! probes, scrape target and grace periods agree with the code, and the NATS users of the Helm values can do what
//! ingest and the applier do, on a real nats-server, and no more. (scripts/check_deploy.sh validates the manifests
//! against the Kubernetes API's schemas.)

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::str::FromStr as _;
use std::time::Duration;

use secrecy::ExposeSecret as _;
use serde::Deserialize as _;
use serde_yaml_ng::Value;
use stripe_sync_applier::settings::Settings as ApplierSettings;
use stripe_sync_ingest::settings::Settings as IngestSettings;
use stripe_sync_shared::settings::{
    MetricsSettings, NatsSettings, PlainEnv, SHARED_PLAIN_ENV, StreamSettings,
};
use stripe_sync_testkit::nats::TestNats;
use stripe_sync_testkit::tls::TestCa;
use stripe_sync_testkit::{eventually, stripe};

use crate::deploy::{read, repo};
use crate::helpers::{PATIENCE, TestEnv, customer_event, post_signed};
/// The binary a container runs, known by the container's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Binary {
    Ingest,
    Applier,
}

/// The sections both binaries have, as one of them loaded them.
struct Shared {
    nats: NatsSettings,
    stream: StreamSettings,
    metrics: MetricsSettings,
}

impl Binary {
    fn of(container: &Value) -> Self {
        match container["name"].as_str() {
            Some("ingest") => Self::Ingest,
            Some("applier") => Self::Applier,
            other => panic!("container {other:?} runs neither binary"),
        }
    }

    fn plain_env(self) -> &'static [PlainEnv] {
        match self {
            Self::Ingest => stripe_sync_ingest::settings::PLAIN_ENV,
            Self::Applier => stripe_sync_applier::settings::PLAIN_ENV,
        }
    }

    /// Loads the binary's settings from `env` with its own loader, as it does at start.
    fn load(self, env: &HashMap<String, String>) -> Result<Shared, String> {
        match self {
            Self::Ingest => IngestSettings::load_from(env).map(|s| Shared {
                nats: s.nats,
                stream: s.stream,
                metrics: s.metrics,
            }),
            Self::Applier => ApplierSettings::load_from(env).map(|s| Shared {
                nats: s.nats,
                stream: s.stream,
                metrics: s.metrics,
            }),
        }
        .map_err(|e| e.to_string())
    }
}

/// Every YAML document of the files under `dir`, with the file it is in.
fn yaml_documents(dir: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut dirs = vec![repo().join(dir)];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                let file = path
                    .strip_prefix(repo())
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                let text = std::fs::read_to_string(&path).unwrap();
                for document in serde_yaml_ng::Deserializer::from_str(&text) {
                    let value =
                        Value::deserialize(document).unwrap_or_else(|e| panic!("{file}: {e}"));
                    if !value.is_null() {
                        out.push((file.clone(), value));
                    }
                }
            }
        }
    }
    out
}

/// The example Secrets' values, by Secret and key (deploy/k8s/secrets.example.yaml).
fn example_secrets() -> HashMap<String, HashMap<String, String>> {
    yaml_documents("deploy/k8s")
        .into_iter()
        .filter(|(file, doc)| {
            file.ends_with("secrets.example.yaml") && doc["kind"].as_str() == Some("Secret")
        })
        .map(|(_, doc)| {
            let keys = doc["stringData"]
                .as_mapping()
                .unwrap()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().unwrap().to_owned(),
                        v.as_str().unwrap().to_owned(),
                    )
                })
                .collect();
            (doc["metadata"]["name"].as_str().unwrap().to_owned(), keys)
        })
        .collect()
}

/// A container's environment as its pod gets it, Secret keys filled from the example Secrets (an optional key they
/// lack stays unset, as in the pod).
fn environment(
    container: &Value,
    secrets: &HashMap<String, HashMap<String, String>>,
) -> HashMap<String, String> {
    let mut env = HashMap::new();
    for var in container["env"].as_sequence().into_iter().flatten() {
        let name = var["name"].as_str().unwrap().to_owned();
        let value = match var["value"].as_str() {
            Some(value) => Some(value.to_owned()),
            None => {
                let source = &var["valueFrom"]["secretKeyRef"];
                let (secret, key) = (
                    source["name"].as_str().unwrap(),
                    source["key"].as_str().unwrap(),
                );
                let value = secrets.get(secret).and_then(|s| s.get(key)).cloned();
                assert!(
                    value.is_some() || source["optional"].as_bool() == Some(true),
                    "{name} reads key {key} of Secret {secret}, which the example Secrets lack"
                );
                value
            }
        };
        if let Some(value) = value {
            env.insert(name, value);
        }
    }
    env
}

/// The base Deployment running `binary`, and its container.
fn base_deployment(binary: Binary) -> (Value, Value) {
    yaml_documents("deploy/k8s/base")
        .into_iter()
        .filter(|(_, doc)| doc["kind"].as_str() == Some("Deployment"))
        .find_map(|(_, doc)| {
            let container = doc["spec"]["template"]["spec"]["containers"][0].clone();
            (Binary::of(&container) == binary).then_some((doc, container))
        })
        .unwrap_or_else(|| panic!("no base Deployment runs {binary:?}"))
}

/// The container's ports by name.
fn container_ports(container: &Value) -> HashMap<String, u16> {
    container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            let number = u16::try_from(p["containerPort"].as_u64().unwrap()).unwrap();
            (p["name"].as_str().unwrap().to_owned(), number)
        })
        .collect()
}

/// The Secret and key a file of the container comes from, through its volume mounts.
fn secret_behind(deployment: &Value, container: &Value, file: &Path) -> (String, String) {
    let dir = file.parent().and_then(Path::to_str).unwrap();
    let name = file.file_name().and_then(|n| n.to_str()).unwrap();
    let mount = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(dir))
        .unwrap_or_else(|| panic!("nothing is mounted at {dir} for {}", file.display()));
    let volume = deployment["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let secret = &volume["secret"];
    let key = secret["items"]
        .as_sequence()
        .and_then(|items| items.iter().find(|i| i["path"].as_str() == Some(name)))
        .map_or(name, |item| item["key"].as_str().unwrap());
    (
        secret["secretName"].as_str().unwrap().to_owned(),
        key.to_owned(),
    )
}

fn nats_values() -> Value {
    serde_yaml_ng::from_str(&read("deploy/nats/values.yaml")).unwrap()
}

/// The NATS users of the values, with the variable each one's password is read from.
fn nats_users(values: &Value) -> Vec<(String, String)> {
    values["config"]["merge"]["authorization"]["users"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|u| {
            let password = u["password"].as_str().unwrap();
            let var = password
                .strip_prefix("<< $")
                .and_then(|p| p.strip_suffix(" >>"))
                .unwrap_or_else(|| {
                    panic!("{password}: a password comes from the environment (a Secret)")
                });
            (u["user"].as_str().unwrap().to_owned(), var.to_owned())
        })
        .collect()
}

#[test]
fn every_variable_the_manifests_set_is_read_by_its_binary_and_loads() {
    let secrets = example_secrets();
    let mut checked = BTreeSet::new();
    for (file, doc) in yaml_documents("deploy/k8s") {
        if doc["kind"].as_str() != Some("Deployment") {
            continue;
        }
        for container in doc["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .unwrap()
        {
            let binary = Binary::of(container);
            let env = environment(container, &secrets);
            for name in env.keys() {
                if let Some(rest) = name.strip_prefix("STRIPE_SYNC__") {
                    // Each binary accepts the other's sections and ignores them: a variable of such a section is
                    // dead here. A binary refuses a made-up field only in a section it reads.
                    let section = rest.split("__").next().unwrap();
                    let probe = HashMap::from([(
                        format!("STRIPE_SYNC__{section}__NO_SUCH_FIELD"),
                        "1".to_owned(),
                    )]);
                    assert!(
                        binary.load(&probe).is_err(),
                        "{file}: {name}: {binary:?} ignores section {section}"
                    );
                } else {
                    assert!(
                        SHARED_PLAIN_ENV
                            .iter()
                            .chain(binary.plain_env())
                            .any(|p| p.var == name),
                        "{file}: {binary:?} reads no {name}"
                    );
                }
            }
            // Settings deny unknown fields: a misspelt STRIPE_SYNC__ variable fails here as it would at start.
            binary
                .load(&env)
                .unwrap_or_else(|e| panic!("{file}: {binary:?} refuses its environment: {e}"));
            checked.insert(format!("{file}: {binary:?}"));
        }
    }
    assert!(
        checked.len() >= 2,
        "both base Deployments are checked: {checked:?}"
    );
}

#[test]
fn both_binaries_reach_the_three_nats_servers_over_tls_as_their_own_user_and_postgres_verified() {
    let secrets = example_secrets();
    let values = nats_values();
    let replicas = values["config"]["cluster"]["replicas"].as_u64().unwrap();
    let client_port = values["config"]["nats"]["port"].as_u64().unwrap();
    let users: BTreeSet<String> = nats_users(&values)
        .into_iter()
        .map(|(user, _)| user)
        .collect();
    for binary in [Binary::Ingest, Binary::Applier] {
        let (deployment, container) = base_deployment(binary);
        let env = environment(&container, &secrets);
        let shared = binary.load(&env).unwrap();
        assert_eq!(
            shared.stream.replicas as u64, replicas,
            "{binary:?}: one stream replica per NATS server"
        );
        assert!(shared.nats.tls_required, "{binary:?} insists on TLS");
        let ca = shared
            .nats
            .tls_ca_file
            .as_deref()
            .expect("the NATS CA is given");
        let (secret, key) = secret_behind(&deployment, &container, ca);
        assert!(
            secrets[&secret].contains_key(&key),
            "{binary:?}: the CA comes from Secret {secret} key {key}"
        );

        let url = shared.nats.url.expose_secret();
        let servers: Vec<reqwest::Url> =
            url.split(',').map(|u| u.trim().parse().unwrap()).collect();
        let hosts: BTreeSet<_> = servers
            .iter()
            .map(|u| u.host_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            hosts.len() as u64,
            replicas,
            "{binary:?} names every server: {hosts:?}"
        );
        let user = format!("{binary:?}").to_lowercase();
        for server in &servers {
            assert_eq!(
                server.username(),
                user,
                "{binary:?} connects as its own user"
            );
            assert!(server.password().is_some(), "{binary:?} gives a password");
            assert_eq!(u64::from(server.port().unwrap()), client_port);
        }
        assert!(
            users.contains(&user),
            "user {user} is one of the NATS values' users {users:?}"
        );

        if binary == Binary::Applier {
            let database = ApplierSettings::load_from(&env).unwrap().database.url;
            let database = database.expose_secret();
            let options = sqlx::postgres::PgConnectOptions::from_str(database).unwrap();
            assert!(
                matches!(
                    options.get_ssl_mode(),
                    sqlx::postgres::PgSslMode::VerifyFull
                ),
                "the applier checks Postgres's certificate and host name"
            );
            let root = reqwest::Url::parse(database)
                .unwrap()
                .query_pairs()
                .find(|(k, _)| k == "sslrootcert")
                .map(|(_, v)| v.into_owned())
                .expect("sslrootcert names the CA file");
            let (secret, key) = secret_behind(&deployment, &container, Path::new(&root));
            assert!(
                secrets[&secret].contains_key(&key),
                "Postgres's CA comes from Secret {secret} key {key}"
            );
        }
    }

    // ingest's largest body fits NATS's max_payload (the values write it unquoted: `<< 4MB >>`).
    let max_payload = values["config"]["merge"]["max_payload"].as_str().unwrap();
    let mb: usize = max_payload
        .trim_matches(['<', '>', ' '])
        .trim_end_matches("MB")
        .parse()
        .unwrap();
    let ingest =
        IngestSettings::load_from(&environment(&base_deployment(Binary::Ingest).1, &secrets))
            .unwrap();
    assert!(
        ingest.http.body_limit + 16 * 1024 <= mb * 1024 * 1024,
        "body limit fits max_payload"
    );
}

#[test]
fn ports_probes_and_the_scrape_target_are_where_the_code_serves_them() {
    let secrets = example_secrets();
    let documents = yaml_documents("deploy/k8s/base");
    let monitor = &documents
        .iter()
        .find(|(_, doc)| doc["kind"].as_str() == Some("ServiceMonitor"))
        .expect("a ServiceMonitor")
        .1;
    for binary in [Binary::Ingest, Binary::Applier] {
        let (_, container) = base_deployment(binary);
        let env = environment(&container, &secrets);
        let ports = container_ports(&container);
        let shared = binary.load(&env).unwrap();
        assert_eq!(
            ports["metrics"], shared.metrics.port,
            "{binary:?} serves /metrics there"
        );
        let serving = match binary {
            Binary::Ingest => {
                assert_eq!(
                    ports["http"],
                    IngestSettings::load_from(&env).unwrap().http.port
                );
                "http"
            }
            Binary::Applier => {
                assert_eq!(
                    ports["admin"],
                    ApplierSettings::load_from(&env).unwrap().admin.port
                );
                "metrics"
            }
        };
        // Liveness must not depend on NATS or Postgres (/readyz does): an outage would restart every pod. The
        // end-to-end test below checks the paths answer on these listeners.
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &container[probe]["httpGet"];
            assert_eq!(get["path"].as_str(), Some(path), "{binary:?} {probe}");
            assert_eq!(
                get["port"].as_str(),
                Some(serving),
                "{binary:?} {probe} on the listener serving it"
            );
        }

        // The ServiceMonitor scrapes, through this binary's Service, the container port where metrics are served.
        let component = format!("{binary:?}").to_lowercase();
        let service = &documents
            .iter()
            .find(|(_, doc)| {
                doc["kind"].as_str() == Some("Service")
                    && doc["metadata"]["labels"]["app.kubernetes.io/component"].as_str()
                        == Some(&component)
            })
            .unwrap_or_else(|| panic!("a Service of {component}"))
            .1;
        let endpoint = &monitor["spec"]["endpoints"][0];
        assert_eq!(endpoint["path"].as_str(), Some("/metrics"));
        let port = service["spec"]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"] == endpoint["port"])
            .unwrap_or_else(|| {
                panic!("{component}'s Service has the port the ServiceMonitor scrapes")
            });
        let target = port["targetPort"].as_str().unwrap();
        assert_eq!(
            ports[target], shared.metrics.port,
            "{component}: scraped where metrics are served"
        );
        let selector = &monitor["spec"]["selector"];
        assert_eq!(
            selector["matchLabels"]["app.kubernetes.io/name"],
            service["metadata"]["labels"]["app.kubernetes.io/name"]
        );
        assert!(
            selector["matchExpressions"][0]["values"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|v| v.as_str() == Some(&component)),
            "the ServiceMonitor selects {component}'s Service"
        );
    }
}

#[test]
fn pods_get_longer_to_stop_than_the_binaries_take() {
    let secrets = example_secrets();
    let grace = |deployment: &Value| {
        Duration::from_secs(
            deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap(),
        )
    };

    // Ingest: the preStop pause, then SIGTERM and in-flight publishes for up to http.shutdown_timeout.
    let (deployment, container) = base_deployment(Binary::Ingest);
    let ingest = IngestSettings::load_from(&environment(&container, &secrets)).unwrap();
    let command = &container["lifecycle"]["preStop"]["exec"]["command"];
    let pause = match command[0].as_str() {
        Some("sleep") => command[1].as_str().unwrap().parse().unwrap(),
        _ => 0,
    };
    assert!(
        grace(&deployment) > Duration::from_secs(pause) + ingest.http.shutdown_timeout,
        "ingest's grace period exceeds its preStop pause plus http.shutdown_timeout"
    );

    // The applier has no overall shutdown timeout: its stop reads out its open pulls (at most three pull expiries,
    // pin_timeout / 3 kept within 0.5-10 s: consumer::pull_timing), waits up to 5 s for hydration and 5 s for
    // the ack flush (startup.rs), and before that finishes the batch in hand (budgeted as one ack_wait).
    let (deployment, container) = base_deployment(Binary::Applier);
    let applier = ApplierSettings::load_from(&environment(&container, &secrets))
        .unwrap()
        .applier;
    let expires =
        (applier.pin_timeout / 3).clamp(Duration::from_millis(500), Duration::from_secs(10));
    let stop = expires * 3 + Duration::from_secs(5) + Duration::from_secs(5) + applier.ack_wait;
    assert!(
        grace(&deployment) > stop,
        "the applier's grace period exceeds its stop ({stop:?})"
    );
}

/// The values' `authorization` block as nats-server reads it once the chart has rendered it (`<< $VAR >>`
/// unquoted) and the pod's environment has given each `$VAR` its value: here a password of the test's.
fn authorization_conf(values: &Value, passwords: &HashMap<String, String>) -> String {
    let json = serde_json::to_string(&values["config"]["merge"]["authorization"]).unwrap();
    let (mut conf, mut rest) = (String::new(), json.as_str());
    while let Some(start) = rest.find("\"<< $") {
        let end = start + rest[start..].find(" >>\"").unwrap();
        conf.push_str(&rest[..start]);
        conf.push_str(&format!("{:?}", passwords[&rest[start + 5..end]]));
        rest = &rest[end + 4..];
    }
    format!("authorization: {conf}{rest}\n")
}

#[tokio::test]
async fn the_nats_users_of_the_helm_values_can_do_what_the_binaries_do_and_no_more() {
    let values = nats_values();
    let users = nats_users(&values);
    let passwords: HashMap<String, String> = users
        .iter()
        .map(|(_, var)| (var.clone(), format!("{:016x}", fastrand::u64(..))))
        .collect();
    let password_of = |user: &str| &passwords[&users.iter().find(|(u, _)| u == user).unwrap().1];
    let ca = TestCa::new();
    let nats = TestNats::start_with(&format!(
        "{}{}",
        authorization_conf(&values, &passwords),
        ca.nats_tls_block(false)
    ));
    let url_of = |user: &str| {
        format!(
            "nats://{user}:{}@127.0.0.1:{}",
            password_of(user),
            nats.port()
        )
    };

    // Each binary with its manifest's environment; what differs here: addresses, the CA file, one server (so one
    // stream replica), no Stripe API (no key) and no fixed admin port (no token).
    let secrets = example_secrets();
    let mut env = TestEnv::new().await;
    let database_url = env.db.url().to_owned();
    let run_env = |binary: Binary| {
        let mut run = environment(&base_deployment(binary).1, &secrets);
        run.remove("STRIPE_API_KEY");
        run.remove("STRIPE_SYNC_ADMIN_TOKEN");
        let user = format!("{binary:?}").to_lowercase();
        for (k, v) in [
            ("NATS_URL", url_of(&user)),
            (
                "STRIPE_SYNC__NATS__TLS_CA_FILE",
                ca.ca().display().to_string(),
            ),
            ("STRIPE_SYNC__STREAM__REPLICAS", "1".to_owned()),
            ("PORT", "0".to_owned()),
            ("METRICS_PORT", "0".to_owned()),
            ("STRIPE_SYNC__HTTP__HOST", "127.0.0.1".to_owned()),
            ("STRIPE_WEBHOOK_SECRET", stripe::SECRET.to_owned()),
            ("DATABASE_URL", database_url.clone()),
        ] {
            run.insert(k.to_owned(), v);
        }
        run
    };
    env.env = run_env(Binary::Ingest);
    let (ingest, ingest_metrics, ingest_task) = env.start_ingest_with_metrics().await;
    env.env = run_env(Binary::Applier);
    // The applier waits for what it needs as long as it takes: a permission it lacks would stall it, not fail it.
    let log_file = nats.dir().join("nats.log");
    let Ok(applier) = tokio::time::timeout(PATIENCE, env.start_applier()).await else {
        panic!(
            "the applier did not start as user applier:\n{}",
            std::fs::read_to_string(&log_file).unwrap()
        );
    };

    let event = customer_event(
        "evt_deploy_1",
        "customer.created",
        stripe::now(),
        "cus_deploy",
        "k8s@example.com",
    );
    let http = reqwest::Client::new();
    assert_eq!(
        post_signed(&http, &ingest, &serde_json::to_vec(&event).unwrap()).await,
        200
    );
    env.wait_count(
        "select count(*) from stripe.customers where id = 'cus_deploy'",
        1,
    )
    .await;

    // Every probe of the manifests, and the ServiceMonitor's path, answers on the listener its port names.
    let applier_metrics = format!("http://127.0.0.1:{}", applier.metrics_port);
    for (binary, listeners) in [
        (
            Binary::Ingest,
            HashMap::from([("http", &ingest), ("metrics", &ingest_metrics)]),
        ),
        (
            Binary::Applier,
            HashMap::from([("metrics", &applier_metrics)]),
        ),
    ] {
        let container = base_deployment(binary).1;
        let probes =
            ["startupProbe", "livenessProbe", "readinessProbe"].map(|p| &container[p]["httpGet"]);
        for get in probes.into_iter().filter(|g| !g.is_null()) {
            let url = format!(
                "{}{}",
                listeners[get["port"].as_str().unwrap()],
                get["path"].as_str().unwrap()
            );
            let status = http.get(&url).send().await.unwrap().status();
            assert_eq!(status, 200, "{binary:?}: {url}");
        }
        let body = http
            .get(format!("{}/metrics", listeners["metrics"]))
            .send()
            .await
            .unwrap();
        assert!(
            body.text().await.unwrap().contains("stripe_sync_"),
            "{binary:?} serves its metrics"
        );
    }
    applier.stop().await;
    ingest_task.abort();
    let log = std::fs::read_to_string(&log_file).unwrap();
    assert!(
        !log.contains("Violation"),
        "ingest and the applier did their work within their permissions:\n{log}"
    );

    // No more: neither may delete the events stream, nor ingest read it.
    for (user, subject) in [
        ("ingest", "$JS.API.STREAM.DELETE.STRIPE_EVENTS"),
        ("ingest", "$JS.API.CONSUMER.CREATE.STRIPE_EVENTS.x"),
        ("applier", "$JS.API.STREAM.DELETE.STRIPE_EVENTS"),
    ] {
        let settings = NatsSettings {
            url: url_of(user).into(),
            tls_ca_file: Some(ca.ca()),
            ..NatsSettings::default()
        };
        let client = stripe_sync_shared::nats::connect(&settings, "deploy-test", true)
            .await
            .unwrap();
        client.publish(subject, "{}".into()).await.unwrap();
        client.flush().await.unwrap();
        let refusal = format!("Publish Violation - User \"{user}\", Subject \"{subject}\"");
        eventually(PATIENCE, &refusal, || async {
            std::fs::read_to_string(&log_file)
                .unwrap()
                .contains(&refusal)
                .then_some(())
        })
        .await;
    }
}
