//! Shared test harness: private `redis-server` processes, a small Redis
//! Cluster, and a counting HTTP origin.
//!
//! Every `RedisProcess` starts its own server on a free loopback port with
//! its own scratch directory, so tests can run in parallel and never touch a
//! Redis the developer may be running on 6379. If `redis-server` is missing
//! the harness panics with an install hint: these tests are never skipped
//! silently.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bb8_redis::{bb8, redis, RedisConnectionManager};

/// How many times a server that dies at once (usually a port race) is
/// started again before giving up.
const SPAWN_ATTEMPTS: usize = 5;
/// How long a freshly spawned server gets to answer PING.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a freshly created cluster gets to report `cluster_state:ok`
/// (and, with replicas, to have every replica in sync).
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(20);
/// `cluster-node-timeout` of a cluster without replicas: nothing fails
/// over, so it only needs to be long enough not to flap on a busy machine.
const CLUSTER_NODE_TIMEOUT_MS: u64 = 2000;
/// `cluster-node-timeout` of a cluster with replicas: short, so that a
/// killed master is failed over in a few seconds, yet long enough that a
/// busy two-core machine does not make healthy nodes look dead.
const REPLICATED_NODE_TIMEOUT_MS: u64 = 1000;
/// Polling step while waiting; short so a sync wait inside a
/// `#[tokio::test]` never blocks the runtime for long at a time.
const POLL_STEP: Duration = Duration::from_millis(20);

const MISSING_SERVER_HINT: &str = "redis-server not found: the tests start their own Redis \
servers. Install it with `sudo apt-get install redis-server` (Debian/Ubuntu) or `brew install \
redis` (macOS), or set REDIS_SERVER_BIN to its path.";

const MISSING_CLI_HINT: &str = "redis-cli not found: the cluster tests create their own Redis \
Cluster with `redis-cli --cluster create`. Install it with `sudo apt-get install redis-server` \
(Debian/Ubuntu) or `brew install redis` (macOS), or set REDIS_CLI_BIN to its path.";

// ---------------------------------------------------------------------------
// Small process-level helpers
// ---------------------------------------------------------------------------

fn server_bin() -> PathBuf {
    std::env::var_os("REDIS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

fn cli_bin() -> PathBuf {
    if let Some(cli) = std::env::var_os("REDIS_CLI_BIN") {
        return PathBuf::from(cli);
    }
    // Prefer the redis-cli that sits next to an explicitly chosen server.
    if let Some(server) = std::env::var_os("REDIS_SERVER_BIN") {
        if let Some(dir) = Path::new(&server).parent() {
            let sibling = dir.join("redis-cli");
            if sibling.is_file() {
                return sibling;
            }
        }
    }
    PathBuf::from("redis-cli")
}

/// Ports this test binary has already handed out, so two servers started
/// concurrently in the same process never get the same one.
fn reserved_ports() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A free loopback port: bind `127.0.0.1:0`, read the port, drop the
/// listener. Never 6379 and never one this process handed out before.
pub fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
            .expect("bind 127.0.0.1:0 to find a free port");
        let port = listener.local_addr().expect("local_addr").port();
        drop(listener);
        if port == 6379 {
            continue;
        }
        if reserved_ports().lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// A fresh, empty scratch directory under the system temp dir.
fn fresh_tmpdir(tag: &str, port: u16) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "tower-fence-{tag}-{}-{port}-{n}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("create scratch dir {}: {e}", dir.display()));
    dir
}

fn read_log(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(log) if !log.trim().is_empty() => log,
        Ok(_) => "<empty log>".to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "<no log file>".to_owned(),
        Err(e) => format!("<could not read {}: {e}>", path.display()),
    }
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap_or_else(|e| panic!("run `kill {sig} {pid}`: {e}"));
    assert!(status.success(), "`kill {sig} {pid}` failed: {status}");
}

fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

// ---------------------------------------------------------------------------
// Minimal RESP over a blocking TcpStream (used while waiting for readiness,
// where no async runtime may be available)
// ---------------------------------------------------------------------------

/// Sends one command to `127.0.0.1:port` and returns the reply as text:
/// simple strings, errors (prefixed with `-`), integers and bulk strings.
/// Every step is bounded by `timeout`.
pub fn raw_command(port: u16, args: &[&str], timeout: Duration) -> std::io::Result<String> {
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into();
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;

    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        let _ = write!(request, "${}\r\n{arg}\r\n", arg.len());
    }
    stream.write_all(request.as_bytes())?;

    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let line = line.trim_end_matches(['\r', '\n']);
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    match line.as_bytes().first() {
        Some(b'+' | b':') => Ok(line[1..].to_owned()),
        Some(b'-') => Ok(line.to_owned()),
        Some(b'$') => {
            let len: i64 = line[1..].parse().map_err(|_| bad("bad bulk length"))?;
            // A negative length is the RESP2 nil bulk string.
            let Ok(len) = usize::try_from(len) else {
                return Ok(String::new());
            };
            let mut body = vec![0u8; len + 2];
            reader.read_exact(&mut body)?;
            body.truncate(len);
            String::from_utf8(body).map_err(|_| bad("non-UTF-8 bulk reply"))
        }
        None => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before a reply",
        )),
        Some(_) => Err(bad("unsupported RESP reply")),
    }
}

/// The `process_id` reported by `INFO server` on `port`, if it answers.
fn server_pid(port: u16) -> Option<u32> {
    let info = raw_command(port, &["INFO", "server"], Duration::from_millis(500)).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}

enum Ready {
    Yes,
    /// The child exited before answering (typically: port already taken).
    Exited(String),
    TimedOut,
}

/// Waits until *our* child answers PING on `port`: a PONG from some other
/// process that won a port race does not count (checked via `INFO`).
fn wait_ready(child: &mut Child, port: u16, timeout: Duration) -> Ready {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Ready::Exited(status.to_string());
        }
        let pong = raw_command(port, &["PING"], Duration::from_millis(200))
            .is_ok_and(|reply| reply == "PONG");
        if pong && server_pid(port) == Some(child.id()) {
            return Ready::Yes;
        }
        if Instant::now() >= deadline {
            return Ready::TimedOut;
        }
        std::thread::sleep(POLL_STEP);
    }
}

// ---------------------------------------------------------------------------
// RedisProcess
// ---------------------------------------------------------------------------

/// Cluster-mode settings for one node.
#[derive(Clone, Copy, Debug)]
struct ClusterMode {
    bus_port: u16,
    node_timeout_ms: u64,
}

/// A private `redis-server` on a free loopback port, killed and cleaned up on
/// drop.
#[derive(Debug)]
pub struct RedisProcess {
    port: u16,
    dir: PathBuf,
    cluster: Option<ClusterMode>,
    child: Mutex<Option<Child>>,
}

impl RedisProcess {
    /// Starts a standalone server and waits until it answers PING.
    ///
    /// Blocking, but only in short sleeps, so it is fine to call from inside
    /// a `#[tokio::test]`.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// [`RedisProcess::start`] on a blocking thread, for tests that must not
    /// block the runtime (e.g. while other tasks are running).
    pub async fn start_async() -> Self {
        tokio::task::spawn_blocking(Self::start)
            .await
            .expect("RedisProcess::start panicked")
    }

    fn start_cluster_node(node_timeout_ms: u64) -> Self {
        Self::start_with(Some(node_timeout_ms))
    }

    /// Starts a server; in cluster mode with `cluster-node-timeout` set to
    /// `cluster_node_timeout_ms` when that is given.
    fn start_with(cluster_node_timeout_ms: Option<u64>) -> Self {
        let mut last_failure = String::new();
        for _ in 0..SPAWN_ATTEMPTS {
            let port = free_port();
            let cluster = cluster_node_timeout_ms.map(|node_timeout_ms| ClusterMode {
                bus_port: free_port(),
                node_timeout_ms,
            });
            let dir = fresh_tmpdir(
                if cluster.is_some() {
                    "cluster"
                } else {
                    "redis"
                },
                port,
            );
            let mut process = RedisProcess {
                port,
                dir,
                cluster,
                child: Mutex::new(None),
            };
            let mut child = process.spawn();
            match wait_ready(&mut child, port, READY_TIMEOUT) {
                Ready::Yes => {
                    *process.child.get_mut().unwrap() = Some(child);
                    return process;
                }
                Ready::Exited(status) => {
                    // Most likely lost a port race: try a fresh port. Drop
                    // removes this attempt's scratch dir.
                    last_failure = format!(
                        "redis-server on port {port} exited at once ({status}); log:\n{}",
                        process.log()
                    );
                }
                Ready::TimedOut => {
                    kill_and_reap(&mut child);
                    panic!(
                        "redis-server on port {port} did not answer PING within {:?}; log:\n{}",
                        READY_TIMEOUT,
                        process.log()
                    );
                }
            }
        }
        panic!("redis-server failed to start {SPAWN_ATTEMPTS} times; last failure: {last_failure}");
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    fn output_path(&self) -> PathBuf {
        self.dir.join("redis.out")
    }

    fn spawn(&self) -> Child {
        let mut cmd = Command::new(server_bin());
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.log_path())
            .args(["--enable-debug-command", "yes"]);
        if let Some(cluster) = self.cluster {
            cmd.args(["--cluster-enabled", "yes"])
                .arg("--cluster-config-file")
                .arg(self.dir.join("nodes.conf"))
                .arg("--cluster-node-timeout")
                .arg(cluster.node_timeout_ms.to_string())
                // A replica may take over however long its link to the
                // master was down: a test that kills a master wants the
                // failover, whatever the machine's load did to the link.
                .args(["--cluster-replica-validity-factor", "0"])
                .arg("--cluster-port")
                .arg(cluster.bus_port.to_string());
        }
        // Errors before the log file is open (bad options, bad paths) go to
        // stderr: keep them next to the log so failures can show them.
        let output = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.output_path())
            .unwrap_or_else(|e| panic!("open {}: {e}", self.output_path().display()));
        let output_err = output.try_clone().expect("clone output file handle");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(output))
            .stderr(Stdio::from(output_err));
        match cmd.spawn() {
            Ok(child) => child,
            Err(e) => panic!("{MISSING_SERVER_HINT} (spawning {:?}: {e})", server_bin()),
        }
    }

    /// The port the server listens on (stable across [`restart`](Self::restart)).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's scratch directory (holds `redis.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server log so far, plus anything the server wrote to
    /// stdout/stderr (startup errors land there, before the log is open).
    pub fn log(&self) -> String {
        let mut log = read_log(&self.log_path());
        if let Ok(output) = std::fs::read_to_string(self.output_path()) {
            if !output.trim().is_empty() {
                log.push_str("\n--- stdout/stderr ---\n");
                log.push_str(&output);
            }
        }
        log
    }

    /// The OS pid of the running server, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(Child::id)
    }

    /// A bb8 pool to this server: `max_size` 8, `connection_timeout` 2 s.
    pub async fn pool(&self) -> bb8::Pool<RedisConnectionManager> {
        let manager = RedisConnectionManager::new(self.url()).expect("valid redis url");
        bb8::Pool::builder()
            .max_size(8)
            .connection_timeout(Duration::from_secs(2))
            .build(manager)
            .await
            .unwrap_or_else(|e| panic!("build bb8 pool for {}: {e}", self.url()))
    }

    /// A fresh multiplexed connection, or the error (e.g. after [`stop`](Self::stop)).
    pub async fn try_conn(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await
    }

    /// A fresh multiplexed connection; panics if the server is unreachable.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.try_conn()
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url()))
    }

    /// Kills the server and waits for it. Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.get_mut().unwrap().take() {
            kill_and_reap(&mut child);
        }
    }

    /// Starts the server again on the same port (and scratch dir) and waits
    /// for PING. Stops it first if it is still running. The data set starts
    /// empty: persistence is off.
    pub fn restart(&mut self) {
        self.stop();
        let mut last_failure = String::new();
        for attempt in 0..SPAWN_ATTEMPTS {
            if attempt > 0 {
                // The port is fixed now, so back off instead of moving.
                std::thread::sleep(Duration::from_millis(100));
            }
            let mut child = self.spawn();
            match wait_ready(&mut child, self.port, READY_TIMEOUT) {
                Ready::Yes => {
                    *self.child.get_mut().unwrap() = Some(child);
                    return;
                }
                Ready::Exited(status) => {
                    last_failure = format!("exited at once ({status})");
                }
                Ready::TimedOut => {
                    kill_and_reap(&mut child);
                    last_failure = format!("did not answer PING within {READY_TIMEOUT:?}");
                    break;
                }
            }
        }
        panic!(
            "redis-server restart on port {} failed: {last_failure}; log:\n{}",
            self.port,
            self.log()
        );
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        let pid = self.pid().expect("pause: redis-server is not running");
        signal(pid, "-STOP");
    }

    /// Thaws a [`pause`](Self::pause)d server (SIGCONT).
    pub fn resume(&self) {
        let pid = self.pid().expect("resume: redis-server is not running");
        signal(pid, "-CONT");
    }

    /// Whether the server process is alive (a paused server counts as
    /// running).
    pub fn is_running(&self) -> bool {
        match self.child.lock().unwrap().as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Zeroes the server's command statistics (`CONFIG RESETSTAT`).
    pub async fn reset_stats(&self) {
        let mut conn = self.conn().await;
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut conn)
            .await
            .expect("CONFIG RESETSTAT");
    }

    /// How many times the server ran `command` (lowercase, as `INFO
    /// commandstats` names it: `get`, `ping`) since its statistics were
    /// last reset ([`reset_stats`](Self::reset_stats)).
    pub async fn command_calls(&self, command: &str) -> u64 {
        let mut conn = self.conn().await;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .expect("INFO commandstats");
        let prefix = format!("cmdstat_{command}:");
        info.lines()
            .find(|line| line.starts_with(&prefix))
            .and_then(|line| line.split("calls=").nth(1))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().expect("a count of calls"))
    }

    /// `DBSIZE` of the current database.
    pub async fn dbsize(&self) -> usize {
        let mut conn = self.conn().await;
        redis::cmd("DBSIZE")
            .query_async(&mut conn)
            .await
            .expect("DBSIZE")
    }

    /// All keys matching `pattern` (glob, as in `SCAN MATCH`), sorted and
    /// without duplicates. Uses `SCAN`, never `KEYS`.
    pub async fn keys_matching(&self, pattern: &str) -> Vec<String> {
        let mut conn = self.conn().await;
        let mut cursor: u64 = 0;
        let mut keys = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .expect("SCAN");
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.sort();
        keys.dedup();
        keys
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        if let Ok(slot) = self.child.get_mut() {
            if let Some(mut child) = slot.take() {
                kill_and_reap(&mut child);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------
// RedisCluster
// ---------------------------------------------------------------------------

/// A Redis Cluster on free loopback ports, all killed on drop: `masters`
/// primaries, each with as many replicas as asked for (none by default).
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisProcess>,
}

impl RedisCluster {
    /// Starts `masters` cluster-enabled servers, joins them with
    /// `redis-cli --cluster create`, and waits until every node reports
    /// `cluster_state:ok`.
    pub fn start(masters: usize) -> Self {
        Self::create(masters, 0, CLUSTER_NODE_TIMEOUT_MS)
    }

    /// Starts `masters` primaries with `replicas` replicas each, with a
    /// short `cluster-node-timeout` (1 s) so that a killed master fails over
    /// within seconds, and waits until every node reports
    /// `cluster_state:ok` and every replica's link to its master is up.
    /// Which node became a master is for [`masters`](Self::masters) to say.
    pub fn start_with_replicas(masters: usize, replicas: usize) -> Self {
        assert!(
            replicas >= 1,
            "start_with_replicas needs at least one replica per master"
        );
        Self::create(masters, replicas, REPLICATED_NODE_TIMEOUT_MS)
    }

    fn create(masters: usize, replicas: usize, node_timeout_ms: u64) -> Self {
        assert!(masters >= 3, "a Redis Cluster needs at least 3 masters");
        let total = masters * (1 + replicas);
        let nodes: Vec<RedisProcess> = (0..total)
            .map(|_| RedisProcess::start_cluster_node(node_timeout_ms))
            .collect();
        let cluster = RedisCluster { nodes };

        let output = Command::new(cli_bin())
            .args(["--cluster", "create"])
            .args(
                cluster
                    .nodes
                    .iter()
                    .map(|n| format!("127.0.0.1:{}", n.port)),
            )
            .arg("--cluster-replicas")
            .arg(replicas.to_string())
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{MISSING_CLI_HINT} (spawning {:?}: {e})", cli_bin()));
        if !output.status.success() {
            panic!(
                "redis-cli --cluster create failed ({}):\nstdout:\n{}\nstderr:\n{}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                cluster.logs()
            );
        }

        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let all_ok = cluster.nodes.iter().all(|n| {
                let info = raw_command(n.port, &["CLUSTER", "INFO"], Duration::from_millis(500));
                info.is_ok_and(|info| {
                    info_field(&info, "cluster_state") == Some("ok")
                        && info_field(&info, "cluster_known_nodes") == Some(&total.to_string())
                })
            });
            let replicated = replicas == 0 || cluster.replicas_linked(masters, replicas);
            if all_ok && replicated {
                return cluster;
            }
            if Instant::now() >= deadline {
                panic!(
                    "cluster did not reach cluster_state:ok{} within {CLUSTER_TIMEOUT:?}\n{}",
                    if replicas > 0 {
                        " with every replica linked"
                    } else {
                        ""
                    },
                    cluster.logs()
                );
            }
            std::thread::sleep(POLL_STEP);
        }
    }

    /// Whether there are `masters` masters with `replicas` linked replicas
    /// each.
    fn replicas_linked(&self, masters: usize, replicas: usize) -> bool {
        let mut seen_masters = 0;
        for node in &self.nodes {
            let Some(info) = replication_info(node.port) else {
                return false;
            };
            match info_field(&info, "role") {
                Some("master") => {
                    let slaves: usize = info_field(&info, "connected_slaves")
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    if slaves < replicas {
                        return false;
                    }
                    seen_masters += 1;
                }
                Some("slave") => {
                    if info_field(&info, "master_link_status") != Some("up") {
                        return false;
                    }
                }
                _ => return false,
            }
        }
        seen_masters == masters
    }

    /// `redis://127.0.0.1:<port>` for every node (killed ones included).
    pub fn nodes(&self) -> Vec<String> {
        self.nodes.iter().map(RedisProcess::url).collect()
    }

    /// The node processes, for per-node inspection or fault injection.
    pub fn processes(&self) -> &[RedisProcess] {
        &self.nodes
    }

    /// Indexes into [`processes`](Self::processes) of the running nodes
    /// that are masters now (a failover changes this).
    pub fn masters(&self) -> Vec<usize> {
        self.running_with_role("master")
    }

    /// Indexes into [`processes`](Self::processes) of the running nodes
    /// that are replicas now.
    pub fn replicas(&self) -> Vec<usize> {
        self.running_with_role("slave")
    }

    fn running_with_role(&self, role: &str) -> Vec<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, node)| node.is_running())
            .filter(|(_, node)| {
                replication_info(node.port)
                    .is_some_and(|info| info_field(&info, "role") == Some(role))
            })
            .map(|(index, _)| index)
            .collect()
    }

    /// Kills node `index` (SIGKILL) and waits for it. The others carry on:
    /// a killed master's replica takes its slots over once the others
    /// agree it failed (see [`wait_failed_over`](Self::wait_failed_over)).
    pub fn kill(&mut self, index: usize) {
        self.nodes[index].stop();
    }

    /// Waits until every running replica has acknowledged everything its
    /// master had written when this was called (replication offsets), so
    /// that what was written before is still there after a failover.
    /// Panics with the logs after `timeout`.
    pub fn wait_replicas_synced(&self, timeout: Duration) {
        let targets: Vec<(u16, u64)> = self
            .masters()
            .into_iter()
            .filter_map(|index| {
                let port = self.nodes[index].port;
                let info = replication_info(port)?;
                let offset = info_field(&info, "master_repl_offset")?.parse().ok()?;
                Some((port, offset))
            })
            .collect();
        let deadline = Instant::now() + timeout;
        loop {
            let synced = targets.iter().all(|&(port, target)| {
                let Some(info) = replication_info(port) else {
                    return false;
                };
                let replicas: Vec<&str> = info
                    .lines()
                    .filter(|l| l.starts_with("slave") && l.contains("offset="))
                    .collect();
                !replicas.is_empty()
                    && replicas.iter().all(|line| {
                        let offset = line
                            .split(',')
                            .find_map(|f| f.strip_prefix("offset="))
                            .and_then(|o| o.trim().parse::<u64>().ok());
                        line.contains("state=online") && offset.is_some_and(|o| o >= target)
                    })
            });
            if synced {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "replicas did not catch up with their masters within {timeout:?}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(POLL_STEP);
        }
    }

    /// Whether some running node flags the node on `port` as failed
    /// (`fail`: the cluster agreed; not the local suspicion `fail?`).
    pub fn is_flagged_failed(&self, port: u16) -> bool {
        self.running_ports().iter().any(|&own| {
            cluster_nodes(own).is_some_and(|nodes| {
                nodes
                    .iter()
                    .any(|node| node.port == port && node.flags.iter().any(|flag| flag == "fail"))
            })
        })
    }

    /// Waits until the cluster works without the killed nodes: every
    /// running node reports `cluster_state:ok` and sees every slot served
    /// by a running master. Returns how long it waited; panics with the
    /// logs after `timeout`.
    pub fn wait_failed_over(&self, timeout: Duration) -> Duration {
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            let running = self.running_ports();
            let ok = running.iter().all(|&port| {
                let state_ok = raw_command(port, &["CLUSTER", "INFO"], Duration::from_millis(500))
                    .is_ok_and(|info| info_field(&info, "cluster_state") == Some("ok"));
                state_ok
                    && cluster_nodes(port).is_some_and(|nodes| {
                        nodes.iter().filter(|node| node.serves_slots).all(|node| {
                            node.flags.iter().any(|f| f == "master") && running.contains(&node.port)
                        })
                    })
            });
            if ok {
                return started.elapsed();
            }
            if Instant::now() >= deadline {
                panic!(
                    "the cluster did not fail over within {timeout:?}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(POLL_STEP);
        }
    }

    fn running_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|node| node.is_running())
            .map(|node| node.port)
            .collect()
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- node {} log ---\n{}", n.port, n.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The value of `name:` in an `INFO` or `CLUSTER INFO` reply.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.trim()
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
    })
}

/// `INFO replication` of the server on `port`, if it answers.
fn replication_info(port: u16) -> Option<String> {
    raw_command(port, &["INFO", "replication"], Duration::from_millis(500)).ok()
}

/// One line of `CLUSTER NODES`.
struct ClusterNode {
    port: u16,
    flags: Vec<String>,
    serves_slots: bool,
}

/// `CLUSTER NODES` as seen by the server on `port`, if it answers.
fn cluster_nodes(port: u16) -> Option<Vec<ClusterNode>> {
    let reply = raw_command(port, &["CLUSTER", "NODES"], Duration::from_millis(500)).ok()?;
    if reply.starts_with('-') {
        return None;
    }
    let nodes = reply
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // `<id> <ip:port@cport[,hostname]> <flags> <master> <ping-sent>
            // <pong-recv> <config-epoch> <link-state> <slot> <slot> ...`
            let address = fields.get(1)?;
            let port = address
                .split('@')
                .next()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()?;
            let flags = fields.get(2)?.split(',').map(str::to_owned).collect();
            Some(ClusterNode {
                port,
                flags,
                serves_slots: fields.len() > 8,
            })
        })
        .collect();
    Some(nodes)
}

// ---------------------------------------------------------------------------
// Counting HTTP origin
// ---------------------------------------------------------------------------

/// A tiny axum origin that counts every request it serves.
#[derive(Clone, Debug, Default)]
pub struct Origin {
    calls: Arc<AtomicUsize>,
}

impl Origin {
    /// A fresh origin with a zero call count.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many requests the origin has served so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The shared counter, for handlers added elsewhere.
    pub fn counter(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.calls)
    }

    /// Counts one call and returns its 1-based number.
    pub fn hit(&self) -> usize {
        self.calls.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Routes (every handler counts one call):
    /// - `GET /slow/{*rest}`: sleeps 50 ms, body `slow:<rest>:<n>`
    /// - `GET /hello`: body `hello`
    /// - `GET /count/{*rest}`: body `<n>`
    ///
    /// where `<n>` is the call number (1-based).
    pub fn router(&self) -> axum::Router {
        use axum::extract::{Path, State};
        use axum::routing::get;

        async fn slow(State(origin): State<Origin>, Path(rest): Path<String>) -> String {
            let n = origin.hit();
            tokio::time::sleep(Duration::from_millis(50)).await;
            format!("slow:{rest}:{n}")
        }
        async fn hello(State(origin): State<Origin>) -> &'static str {
            origin.hit();
            "hello"
        }
        async fn count(State(origin): State<Origin>, Path(_rest): Path<String>) -> String {
            origin.hit().to_string()
        }

        axum::Router::new()
            .route("/slow/{*rest}", get(slow))
            .route("/hello", get(hello))
            .route("/count/{*rest}", get(count))
            .with_state(self.clone())
    }
}
