//! The benchmark's world: release builds of both binaries run as their own processes (so their memory is theirs),
//! against a private NATS and a fresh database, with their peak RSS read from /proc.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::Context as _;
use stripe_sync_testkit::eventually;

/// Paths of the release binaries.
pub(crate) struct Binaries {
    pub ingest: PathBuf,
    pub applier: PathBuf,
    pub bench: PathBuf,
}

/// The repository root.
pub(crate) fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where logs and raw results go.
pub(crate) fn out_dir() -> PathBuf {
    let dir = repo().join("bench/out");
    let _ = std::fs::create_dir_all(dir.join("logs"));
    dir
}

/// Builds the release binaries of ingest and applier (cargo does nothing when they are up to date).
pub(crate) fn build_binaries() -> anyhow::Result<Binaries> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // `cargo run` gives this process its package's variables (`CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR`...). Build
    // scripts (ring's) rerun when those change, so passing them on would rebuild half the dependency tree here, and
    // again at the next `cargo run`.
    let package_vars = std::env::vars().map(|(k, _)| k).filter(|k| {
        [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_PACKAGE",
        ]
        .iter()
        .any(|prefix| k.starts_with(prefix))
    });
    let mut command = Command::new(cargo);
    for var in package_vars {
        command.env_remove(var);
    }
    let status = command
        .current_dir(repo())
        .args([
            "build",
            "--release",
            "-p",
            "stripe-sync-ingest",
            "-p",
            "stripe-sync-applier",
        ])
        .status()
        .context("running cargo build")?;
    anyhow::ensure!(status.success(), "building the release binaries failed");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join("target"));
    Ok(Binaries {
        ingest: target.join("release/stripe-sync-ingest"),
        applier: target.join("release/stripe-sync-applier"),
        bench: std::env::current_exe()?,
    })
}

/// A child process, killed on drop.
pub(crate) struct Proc {
    child: Option<Child>,
}

impl Proc {
    /// Starts `bin` with `args` and `env`, logging to `bench/out/logs/<name>.log`.
    pub(crate) fn spawn(
        bin: &Path,
        args: &[&str],
        env: &HashMap<String, String>,
        name: &str,
    ) -> anyhow::Result<Self> {
        let log = std::fs::File::create(out_dir().join(format!("logs/{name}.log")))?;
        // BENCH_EXTRA_ENV="K=V,K2=V2" adds settings to every process, to measure their effect.
        let extra: Vec<(String, String)> = std::env::var("BENCH_EXTRA_ENV")
            .unwrap_or_default()
            .split(',')
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
            })
            .collect();
        let child = Command::new(bin)
            .args(args)
            .envs(env)
            .envs(extra)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self { child: Some(child) })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn status_field(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with(field))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// Peak resident memory so far, in MiB (VmHWM).
    pub(crate) fn peak_rss_mib(&self) -> f64 {
        self.status_field("VmHWM:").unwrap_or(0) as f64 / 1024.0
    }

    /// Resident memory now, in MiB.
    pub(crate) fn rss_mib(&self) -> f64 {
        self.status_field("VmRSS:").unwrap_or(0) as f64 / 1024.0
    }

    /// Waits for a process that exits by itself.
    pub(crate) async fn wait(mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        tokio::task::spawn_blocking(move || child.wait().ok()?.code())
            .await
            .ok()?
    }

    /// SIGTERM and wait (bounded) for the exit.
    pub(crate) async fn stop(mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    return status.code();
                }
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .await
        .ok()?
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until `http://127.0.0.1:<port><path>` answers 200.
pub(crate) async fn wait_http_ok(port: u16, path: &str) {
    eventually(
        Duration::from_secs(60),
        &format!("port {port} {path} answers 200"),
        || async { (get_status(port, path).await.ok()? == 200).then_some(()) },
    )
    .await;
}

/// The body of `GET http://127.0.0.1:<port><path>` when it answers 200 (e.g. `/metrics`).
pub(crate) async fn get_text(port: u16, path: &str) -> anyhow::Result<String> {
    use http_body_util::BodyExt as _;
    let response = get(port, path).await?;
    anyhow::ensure!(
        response.status() == 200,
        "{path} answered {}",
        response.status()
    );
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

async fn get_status(port: u16, path: &str) -> anyhow::Result<u16> {
    Ok(get(port, path).await?.status().as_u16())
}

/// `GET http://127.0.0.1:<port><path>` on a connection of its own.
async fn get(port: u16, path: &str) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header("host", "127.0.0.1")
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    Ok(sender.send_request(request).await?)
}
