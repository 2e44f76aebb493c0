//! A private Postgres cluster (initdb in a temporary folder, on a free port) that a test can restart, for outages
//! the shared server must not suffer. Runs as the `postgres` user when the tests run as root.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A private Postgres server, stopped and removed on drop.
#[derive(Debug)]
pub struct TestPostgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
}

fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .filter(|p| p.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().expect("no Postgres server binaries (initdb) in /usr/lib/postgresql: run scripts/test.sh, or set PG_BIN_DIR")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `tool` from `bin` with `args`, run as the `postgres` user when we are root (Postgres refuses to run as root).
fn command(bin: &Path, tool: &str, args: &[&str]) -> Command {
    let program = bin.join(tool);
    if is_root() {
        let mut command = Command::new("runuser");
        command
            .args(["-u", "postgres", "--"])
            .arg(program)
            .args(args);
        command
    } else {
        let mut command = Command::new(program);
        command.args(args);
        command
    }
}

fn run(bin: &Path, tool: &str, args: &[&str]) {
    let status = command(bin, tool, args)
        .status()
        .unwrap_or_else(|e| panic!("running {tool}: {e}"));
    assert!(status.success(), "{tool} {args:?} failed");
}

impl TestPostgres {
    /// Creates and starts a cluster with trust authentication on 127.0.0.1.
    #[must_use]
    pub fn start() -> Self {
        let pg = Self::init();
        pg.resume();
        pg
    }

    /// Creates and starts a cluster that refuses connections without TLS, presenting the PEM certificate `cert`
    /// and its key `key`.
    ///
    /// # Panics
    /// When the files can't be copied into the cluster (a broken test machine).
    #[must_use]
    pub fn start_tls_only(cert: &Path, key: &Path) -> Self {
        use std::io::Write as _;
        use std::os::unix::fs::PermissionsExt as _;
        let pg = Self::init();
        let data = PathBuf::from(pg.data());
        std::fs::copy(cert, data.join("server.crt")).unwrap();
        std::fs::copy(key, data.join("server.key")).unwrap();
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap()
            .write_all(b"ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
            .unwrap();
        let hba = std::fs::read_to_string(data.join("pg_hba.conf")).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            format!("hostnossl all all all reject\n{hba}"),
        )
        .unwrap();
        if is_root() {
            for file in ["server.crt", "server.key", "pg_hba.conf"] {
                assert!(
                    Command::new("chown")
                        .arg("postgres")
                        .arg(data.join(file))
                        .status()
                        .unwrap()
                        .success()
                );
            }
        }
        pg.resume();
        pg
    }

    /// A new cluster, not started.
    fn init() -> Self {
        let bin = bin_dir();
        let dir = std::env::temp_dir().join(crate::unique_name("stripe-sync-pg"));
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            assert!(
                Command::new("chown")
                    .arg("postgres")
                    .arg(&dir)
                    .status()
                    .unwrap()
                    .success()
            );
        }
        let data = dir.join("data");
        run(
            &bin,
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        Self {
            bin,
            dir,
            port: crate::nats::free_port(),
        }
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn data(&self) -> String {
        self.dir.join("data").to_string_lossy().into_owned()
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn resume(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("postgres.log");
        run(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
    }

    /// Stops the server the way a crash or an operator's fast restart does: connections are cut.
    pub fn stop(&self) {
        run(
            &self.bin,
            "pg_ctl",
            &["-D", &self.data(), "-m", "fast", "-w", "stop"],
        );
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let data = self.data();
        let _ = command(
            &self.bin,
            "pg_ctl",
            &["-D", &data, "-m", "immediate", "-w", "stop"],
        )
        .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
