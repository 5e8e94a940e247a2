//! PostgreSQL stopped under load and started again, on a private server this test starts
//! (initdb + pg_ctl, as the `postgres` user when run as root; the shared test server is never
//! touched). While it is down, writes and the readiness check fail with `Unavailable` within
//! a bound; once it is back, the pool reconnects by itself and every write that was accepted
//! is there.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anywork_core::{ErrorKind, NewSession, NewTask, Page, TaskId, TaskRequest, TaskStore};
use anywork_store::PostgresStore;

/// A throw-away PostgreSQL cluster on a free loopback port.
struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// `runuser -u postgres --` when running as root (initdb refuses root).
    run_as: Vec<String>,
}

fn bindir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(bin) = versions.pop() {
        return bin;
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .find(|dir| dir.join("initdb").exists() && dir.join("pg_ctl").exists())
        })
        .expect(
            "this test starts a private PostgreSQL and needs initdb and pg_ctl (Debian: apt-get \
             install postgresql; scripts/test.sh installs it)",
        )
}

fn check(what: &str, out: std::io::Result<Output>) {
    let out = out.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn id_of(flag: &str) -> u32 {
    let out = Command::new("id")
        .args([flag, "postgres"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a `postgres` user exists (the Debian package makes it)")
}

impl PrivatePostgres {
    fn start() -> Self {
        let bin = bindir();
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut run_as = Vec::new();
        if Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
        {
            std::os::unix::fs::chown(dir.path(), Some(id_of("-u")), Some(id_of("-g"))).unwrap();
            run_as = ["runuser", "-u", "postgres", "--"]
                .map(String::from)
                .to_vec();
        }
        let pg = Self {
            dir,
            bin,
            port,
            run_as,
        };
        check(
            "initdb",
            pg.command("initdb")
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "-D",
                ])
                .arg(pg.data())
                .output(),
        );
        pg.start_again();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, tool: &str) -> Command {
        let program = self.bin.join(tool);
        match self.run_as.split_first() {
            Some((runner, args)) => {
                let mut c = Command::new(runner);
                c.args(args).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn pg_ctl(&self, args: &[&str]) -> std::io::Result<Output> {
        self.command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(args)
            .output()
    }

    fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        let log = log.to_str().unwrap();
        check(
            "pg_ctl start",
            self.pg_ctl(&["-l", log, "-w", "-t", "60", "-o", &options, "start"]),
        );
    }

    /// A fast shutdown: sessions are ended, the server goes away.
    fn stop(&self) {
        check("pg_ctl stop", self.pg_ctl(&["-m", "fast", "-w", "stop"]));
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-m", "immediate", "stop"]);
    }
}

async fn eventually<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !f().await {
        assert!(started.elapsed() < limit, "{what} did not happen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_is_unavailable_and_the_store_recovers_by_itself() {
    let pg = PrivatePostgres::start();
    let store = Arc::new(PostgresStore::connect(&pg.url(), 4).await.unwrap());
    store
        .check_ready()
        .await
        .expect("ready while the server runs");
    let session = store.create_session(NewSession::new("api")).await.unwrap();

    // Load: one task after another; what the store accepted is remembered.
    let accepted = Arc::new(Mutex::new(Vec::<TaskId>::new()));
    let failures = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (store, accepted, failures, stop) = (
            store.clone(),
            accepted.clone(),
            failures.clone(),
            stop.clone(),
        );
        let session = session.id.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let task = NewTask::from_request(session.clone(), TaskRequest::new("api", "hi"));
                match store.create_task(task).await {
                    Ok(t) => accepted.lock().unwrap().push(t.id),
                    Err(e) => {
                        assert!(
                            e.is_retryable(),
                            "a write while PostgreSQL is down must be retryable: {e:?}"
                        );
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    eventually("the first writes", Duration::from_secs(30), || async {
        accepted.lock().unwrap().len() >= 10
    })
    .await;

    pg.stop();
    let down = store.check_ready().await.unwrap_err();
    assert_eq!(down.kind(), ErrorKind::Unavailable, "{down}");
    let err = store
        .create_session(NewSession::new("api"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    eventually(
        "a write failing under load",
        Duration::from_secs(60),
        || async { failures.load(Ordering::Relaxed) > 0 },
    )
    .await;
    let before_restart = accepted.lock().unwrap().len();

    pg.start_again();
    eventually(
        "readiness after the restart",
        Duration::from_secs(60),
        || async { store.check_ready().await.is_ok() },
    )
    .await;
    eventually(
        "writes after the restart",
        Duration::from_secs(60),
        || async { accepted.lock().unwrap().len() >= before_restart + 10 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.expect("every failure was retryable");

    // Nothing accepted is lost.
    let accepted = accepted.lock().unwrap().clone();
    for id in &accepted {
        store
            .get_task(*id)
            .await
            .unwrap_or_else(|e| panic!("accepted task {id} lost: {e}\n{}", pg.log()));
    }
    let stored = store
        .tasks_by_session(&session.id, Page::first(100_000))
        .await
        .unwrap();
    assert!(stored.len() >= accepted.len());
    store.check_ready().await.unwrap();
}
