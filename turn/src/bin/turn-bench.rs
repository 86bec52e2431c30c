//! Side-by-side bench: coturn (`turnserver`, one relay thread) and our `turn-server`, each a
//! child process pinned to one core, driven by the same load generator (this process, pinned
//! to another core). Server CPU time is read from `/proc/<pid>/task/*/schedstat` (nanoseconds,
//! all threads). Prints ratios ours/coturn:
//!
//! 1. server CPU µs per relayed packet under the smooth generator, 500 allocations x 50 msg/s,
//!    160 B and 1200 B payloads (each message goes client -> relay -> peer -> relay -> client:
//!    two relayed packets), and at a light load, 100 allocations x 50 msg/s; with the relayed
//!    round trip of every message under each load (p50, p99: each message carries its send
//!    time), and of one message at a time on an idle server;
//! 2. the same under coturn's own bursty load generator, `turnutils_uclient` (100 allocations,
//!    a message every 2 ms each, through `turnutils_peer`): server CPU per relayed packet
//!    while it sends, and uclient's average round trip;
//! 3. highest echoed message rate with < 1 % loss (ramp of offered rates, few allocations);
//! 4. highest STUN Binding response rate with < 1 % loss.
//!
//! Run: `cargo build --release -p bedside-turn && target/release/turn-bench` (about 4 min).
//! `BENCH_QUICK=1` shortens every phase; `BENCH_COALESCE_US=N` sets our `coalesce-us`;
//! `BENCH_OFFLOAD=0` turns our `udp-offload` (GSO/GRO) off. Skips (exit 0) when `turnserver` is
//! not installed; the uclient rows are left out without `turnutils_uclient`/`turnutils_peer`.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bedside_turn::stun::{self, Builder, Class, Message, attr, method};

const SECRET: &str = "bench-secret";
const REALM: &str = "bedside";
const BATCH: usize = 64;

/// The bench's clock: messages carry nanoseconds since this instant (payload bytes 0..8).
fn clock() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity on the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Server CPU time in nanoseconds, all threads.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    rd.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Context switches of all the server's threads (voluntary ones are its sleeps in epoll_wait,
/// i.e. its wake-ups).
fn wakeups(pid: u32) -> u64 {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    rd.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// Counts the server's syscalls while `f` runs, with `perf stat` (None without perf or its
/// tracepoints).
fn count_syscalls<T>(pid: u32, f: impl FnOnce() -> T) -> (T, Option<u64>) {
    let perf = which("perf").and_then(|p| {
        Command::new(p)
            .args(["stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-p"])
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok()
    });
    std::thread::sleep(Duration::from_millis(300));
    let t = f();
    let Some(perf) = perf else {
        return (t, None);
    };
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
    let out = perf.wait_with_output().ok();
    let n = out.and_then(|o| {
        String::from_utf8_lossy(&o.stderr)
            .lines()
            .find(|l| l.contains("raw_syscalls:sys_enter"))
            .and_then(|l| l.split(',').next()?.trim().parse::<u64>().ok())
    });
    (t, n)
}

struct Server {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn stop(mut self) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_pinned(cmd: &mut Command, cpu: Option<usize>) -> io::Result<Child> {
    if let Some(cpu) = cpu {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let mut set: libc::cpu_set_t = zeroed();
                libc::CPU_SET(cpu, &mut set);
                libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
                Ok(())
            });
        }
    }
    cmd.spawn()
}

fn wait_ready(addr: SocketAddr) -> anyhow::Result<()> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut req = Vec::new();
    Builder::new(&mut req, method::BINDING, Class::Request, &[5; 12]).finish(None, false);
    let mut buf = [0u8; 512];
    for _ in 0..100 {
        s.send_to(&req, addr)?;
        if s.recv(&mut buf).is_ok() {
            return Ok(());
        }
    }
    bail!("server at {addr} did not answer a Binding request")
}

fn start_coturn(dir: &Path, cpu: Option<usize>) -> anyhow::Result<Server> {
    let port = free_port();
    let child = spawn_pinned(
        Command::new("turnserver")
            .args(["-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1"])
            .arg(format!("--listening-port={port}"))
            .args(["--min-port=44000", "--max-port=45999", "--relay-threads=1"])
            .args([
                "--use-auth-secret",
                &format!("--static-auth-secret={SECRET}"),
                &format!("--realm={REALM}"),
            ])
            .args([
                "--no-tls",
                "--no-dtls",
                "--no-tcp",
                "--no-tcp-relay",
                "--no-cli",
                "--no-rfc5780",
            ])
            .args([
                "--allow-loopback-peers",
                "--no-stdout-log",
                "--simple-log",
                "--no-software-attribute",
            ])
            .arg(format!("--log-file={}", dir.join("coturn.log").display()))
            .arg(format!("--userdb={}", dir.join("turndb").display()))
            .arg(format!("--pidfile={}", dir.join("coturn.pid").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        cpu,
    )
    .context("starting turnserver")?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let s = Server {
        name: "coturn",
        child,
        addr,
    };
    if let Err(e) = wait_ready(addr) {
        s.stop();
        return Err(e);
    }
    Ok(s)
}

fn start_ours(cpu: Option<usize>) -> anyhow::Result<Server> {
    let offload = std::env::var("BENCH_OFFLOAD")
        .map(|v| v != "0")
        .unwrap_or(true);
    start_ours_with(cpu, offload, "bedside")
}

fn start_ours_with(
    cpu: Option<usize>,
    offload: bool,
    name: &'static str,
) -> anyhow::Result<Server> {
    let exe = std::env::current_exe()?.with_file_name("turn-server");
    if !exe.is_file() {
        bail!(
            "{} not found: build with `cargo build --release -p bedside-turn`",
            exe.display()
        );
    }
    let port = free_port();
    let cfg = serde_json::json!({
        "auth-secret": SECRET, "realm": REALM,
        "listen-udp": [format!("127.0.0.1:{port}")], "listen-tcp": [],
        "relay-ips": ["127.0.0.1"], "relay-port-min": if offload { 46000 } else { 48000 }, "relay-port-max": if offload { 47999 } else { 49999 },
        "allow-loopback-peers": true, "user-quota": 100000, "total-quota": 100000, "source-quota": 100000,
        "max-bps-per-allocation": 0,
        "coalesce-us": std::env::var("BENCH_COALESCE_US").ok().and_then(|v| v.parse::<u32>().ok()).unwrap_or(200),
        "udp-offload": offload
    });
    let child = spawn_pinned(
        Command::new(exe)
            .arg("--json")
            .arg(cfg.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        cpu,
    )?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let s = Server { name, child, addr };
    if let Err(e) = wait_ready(addr) {
        s.stop();
        return Err(e);
    }
    Ok(s)
}

/// Blocking TURN client setup: Allocate (after the 401 challenge) and ChannelBind to `peer`.
/// `nonce` is shared by all the flows of one server: our relay's nonces are bound to the
/// client's IP, not its port, and it sends an unauthenticated source only so many 401 bytes
/// (`core::UNAUTH_EXCESS_BURST`), which 500 fresh challenges from 127.0.0.1 would exceed;
/// coturn's are per allocation, so it answers a borrowed one with a fresh 401 or 438.
fn setup_flow(
    server: SocketAddr,
    peer: SocketAddr,
    user: &str,
    nonce: &mut Option<Vec<u8>>,
) -> anyhow::Result<(UdpSocket, Creds)> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.connect(server)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let (username, password) =
        bedside_turn::rest_credentials(SECRET, user, Duration::from_secs(3600), now);
    let key = bedside_turn::auth::long_term_key(&username, REALM, &password);
    let creds = Creds { username, key };
    if let Some(c) = transact(&s, &creds, nonce, method::ALLOCATE, &|b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    })? {
        bail!("allocate failed: {c}");
    }
    if let Some(c) = transact(&s, &creds, nonce, method::CHANNEL_BIND, &|b| {
        b.attr(attr::CHANNEL_NUMBER, &[0x40, 0x00, 0, 0]);
        b.xor_addr(attr::XOR_PEER_ADDRESS, peer);
    })? {
        bail!("channel bind failed: {c}");
    }
    s.set_nonblocking(true)?;
    Ok((s, creds))
}

/// A flow's long-term credentials.
struct Creds {
    username: String,
    key: [u8; 16],
}

/// One authenticated request on a connected blocking socket, answering 401/438 challenges;
/// datagrams that are not its response (late echoes) are skipped. Returns the error code.
fn transact(
    s: &UdpSocket,
    creds: &Creds,
    nonce: &mut Option<Vec<u8>>,
    m: u16,
    add: &dyn Fn(&mut Builder),
) -> anyhow::Result<Option<u16>> {
    for _ in 0..3 {
        let tid: [u8; 12] = rand::random();
        let mut req = Vec::new();
        let mut b = Builder::new(&mut req, m, Class::Request, &tid);
        add(&mut b);
        let used = nonce.clone();
        if let Some(n) = &used {
            b.attr(attr::USERNAME, creds.username.as_bytes())
                .attr(attr::REALM, REALM.as_bytes())
                .attr(attr::NONCE, n);
            b.finish(Some(&creds.key), true);
        } else {
            b.finish(None, true);
        }
        s.send(&req)?;
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(2);
        let msg = loop {
            if Instant::now() > deadline {
                bail!("no response");
            }
            let n = s.recv(&mut buf)?;
            if let Ok(msg) = Message::parse(&buf[..n])
                && msg.tid == tid
            {
                break msg;
            }
        };
        let code = msg.get(attr::ERROR_CODE).and_then(stun::parse_error_code);
        let offered = msg.get(attr::NONCE).map(|v| v.to_vec());
        if matches!(code, Some(401) | Some(438))
            && offered.is_some()
            && (used.is_none() || code == Some(438) || offered != used)
        {
            *nonce = offered;
            continue;
        }
        return Ok(code);
    }
    bail!("challenge loop")
}

/// Refreshes a flow's allocation (600 s) and channel (which refreshes its permission: 300 s),
/// so a bench slowed down by a loaded machine does not outlive them.
fn refresh_flow(
    s: &UdpSocket,
    creds: &Creds,
    peer: SocketAddr,
    nonce: &mut Option<Vec<u8>>,
) -> anyhow::Result<()> {
    s.set_nonblocking(false)?;
    let r = transact(s, creds, nonce, method::REFRESH, &|b| {
        b.attr_u32(attr::LIFETIME, 600);
    })
    .and_then(|_| {
        transact(s, creds, nonce, method::CHANNEL_BIND, &|b| {
            b.attr(attr::CHANNEL_NUMBER, &[0x40, 0x00, 0, 0]);
            b.xor_addr(attr::XOR_PEER_ADDRESS, peer);
        })
    });
    s.set_nonblocking(true)?;
    match r? {
        None => Ok(()),
        Some(c) => bail!("refresh failed: {c}"),
    }
}

/// recvmmsg/sendmmsg helper for the load generator.
struct Mmsg {
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl Mmsg {
    fn new() -> Box<Self> {
        let mut m = Box::new(Mmsg {
            bufs: vec![0u8; BATCH * 2048],
            // SAFETY: zeroed C structs are valid.
            addrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            iovs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            hdrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
        });
        for i in 0..BATCH {
            m.iovs[i].iov_base = m.bufs[i * 2048..].as_mut_ptr() as *mut libc::c_void;
            m.iovs[i].iov_len = 2048;
            let p = &mut m.iovs[i] as *mut libc::iovec;
            let a = &mut m.addrs[i] as *mut _ as *mut libc::c_void;
            m.hdrs[i].msg_hdr.msg_iov = p;
            m.hdrs[i].msg_hdr.msg_iovlen = 1;
            m.hdrs[i].msg_hdr.msg_name = a;
        }
        m
    }

    fn recv(&mut self, fd: i32) -> usize {
        for i in 0..BATCH {
            self.iovs[i].iov_len = 2048;
            self.hdrs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
        }
        // SAFETY: headers point into our buffers.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        n.max(0) as usize
    }

    /// Echo the first `n` received datagrams back to their senders.
    fn echo(&mut self, fd: i32, n: usize) {
        for i in 0..n {
            self.iovs[i].iov_len = self.hdrs[i].msg_len as usize;
        }
        let mut sent = 0;
        while sent < n {
            // SAFETY: as above.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs[sent..].as_mut_ptr(),
                    (n - sent) as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            if r <= 0 {
                sent += 1;
            } else {
                sent += r as usize;
            }
        }
    }

    /// Send `n` copies of `data` on a connected socket; ChannelData carries its send time.
    fn send_copies(&mut self, fd: i32, data: &[u8], n: usize) -> usize {
        let n = n.min(BATCH);
        let stamp = is_channel_data(data) && data.len() >= 12;
        let now = clock().to_be_bytes();
        for i in 0..n {
            self.bufs[i * 2048..i * 2048 + data.len()].copy_from_slice(data);
            if stamp {
                self.bufs[i * 2048 + 4..i * 2048 + 12].copy_from_slice(&now);
            }
            self.iovs[i].iov_len = data.len();
            self.hdrs[i].msg_hdr.msg_namelen = 0;
            self.hdrs[i].msg_hdr.msg_name = std::ptr::null_mut();
        }
        // SAFETY: as above.
        let r = unsafe { libc::sendmmsg(fd, self.hdrs.as_mut_ptr(), n as u32, libc::MSG_DONTWAIT) };
        for i in 0..n {
            self.hdrs[i].msg_hdr.msg_name = &mut self.addrs[i] as *mut _ as *mut libc::c_void;
        }
        r.max(0) as usize
    }
}

fn is_channel_data(m: &[u8]) -> bool {
    m.first().is_some_and(|b| b & 0xC0 == 0x40)
}

/// Round trip in µs of a ChannelData message that came back, from the send time it carries.
fn stamped_rtt(m: &[u8]) -> Option<u32> {
    if !is_channel_data(m) || m.len() < 12 {
        return None;
    }
    let sent = u64::from_be_bytes(m[4..12].try_into().ok()?);
    Some((clock().saturating_sub(sent) / 1000).min(u32::MAX as u64) as u32)
}

/// (p50, p99) of round trips in µs.
fn percentiles(mut v: Vec<u32>) -> (f64, f64) {
    v.sort_unstable();
    let at = |q: f64| {
        v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
            .map(|x| *x as f64)
            .unwrap_or(f64::NAN)
    };
    (at(0.5), at(0.99))
}

struct LoadResult {
    sent: u64,
    /// Packets the peer got (client -> peer leg).
    peer_rx: u64,
    /// Packets back at the clients (replies or echoed data).
    client_rx: u64,
    elapsed: Duration,
    /// Round trips (µs) of the messages that came back.
    rtts: Vec<u32>,
}

/// Open-loop load: `rate` messages/s spread over `clients`, for `dur`; then drains 200 ms.
fn run_load(
    clients: &[UdpSocket],
    msg: &[u8],
    peer: Option<&UdpSocket>,
    rate: f64,
    dur: Duration,
) -> LoadResult {
    let mut m = Mmsg::new();
    let mut rx = Mmsg::new();
    // SAFETY: epoll over our sockets.
    let ep = unsafe { libc::epoll_create1(0) };
    for (i, c) in clients.iter().enumerate() {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, c.as_raw_fd(), &mut ev) };
    }
    if let Some(p) = peer {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: u64::MAX,
        };
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, p.as_raw_fd(), &mut ev) };
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
    let (mut sent, mut peer_rx, mut client_rx) = (0u64, 0u64, 0u64);
    let mut rtts = Vec::with_capacity((rate * dur.as_secs_f64()) as usize + 1024);
    let start = Instant::now();
    let mut next_client = 0usize;
    let drain_until = dur + Duration::from_millis(200);
    loop {
        let el = start.elapsed();
        if el >= drain_until {
            break;
        }
        if el < dur {
            let due = (rate * el.as_secs_f64()) as u64;
            let mut budget = due.saturating_sub(sent).min(4 * BATCH as u64) as usize;
            // Spread across clients: a few per client per round.
            let per = budget.div_ceil(clients.len()).clamp(1, BATCH);
            while budget > 0 {
                let c = &clients[next_client % clients.len()];
                next_client += 1;
                let k = m.send_copies(c.as_raw_fd(), msg, per.min(budget));
                sent += k as u64;
                budget -= per.min(budget);
            }
        }
        // SAFETY: events buffer is valid.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 0) };
        for ev in events.iter().take(n.max(0) as usize) {
            let tok = ev.u64;
            if tok == u64::MAX {
                let p = peer.expect("peer");
                loop {
                    let k = rx.recv(p.as_raw_fd());
                    if k == 0 {
                        break;
                    }
                    peer_rx += k as u64;
                    rx.echo(p.as_raw_fd(), k);
                }
            } else {
                let c = &clients[tok as usize];
                loop {
                    let k = rx.recv(c.as_raw_fd());
                    client_rx += k as u64;
                    for i in 0..k {
                        let len = rx.hdrs[i].msg_len as usize;
                        if let Some(us) = stamped_rtt(&rx.bufs[i * 2048..i * 2048 + len]) {
                            rtts.push(us);
                        }
                    }
                    if k < BATCH {
                        break;
                    }
                }
            }
        }
    }
    // SAFETY: closing our epoll fd.
    unsafe { libc::close(ep) };
    LoadResult {
        sent,
        peer_rx,
        client_rx,
        elapsed: dur,
        rtts,
    }
}

fn channel_msg(len: usize) -> Vec<u8> {
    let payload = vec![0xA5u8; len];
    let mut out = Vec::new();
    stun::ChannelData {
        channel: 0x4000,
        data: &payload,
    }
    .encode(&mut out, false);
    out
}

fn ramp(
    server: &Server,
    clients: &[UdpSocket],
    msg: &[u8],
    peer: Option<&UdpSocket>,
    start_rate: f64,
    step: Duration,
) -> (f64, bool) {
    let mut rate = start_rate;
    let mut best = 0.0;
    let mut limited = false;
    let mine: Vec<u16> = clients
        .iter()
        .chain(peer)
        .filter_map(|s| s.local_addr().ok())
        .map(|a| a.port())
        .collect();
    let mut retried = false;
    for _ in 0..20 {
        let d0 = udp_drops(&mine);
        let r = run_load(clients, msg, peer, rate, step);
        let d1 = udp_drops(&mine);
        let back = r.client_rx as f64;
        let loss = 1.0 - back / r.sent.max(1) as f64;
        let achieved = r.sent as f64 / r.elapsed.as_secs_f64();
        println!(
            "    {:8} offered {:>8.0}/s sent {:>8.0}/s back {:>8.0}/s loss {:>6.2}% (socket drops: load generator {}, other {})",
            server.name,
            rate,
            achieved,
            back / r.elapsed.as_secs_f64(),
            loss * 100.0,
            d1.0.saturating_sub(d0.0),
            d1.1.saturating_sub(d0.1),
        );
        if achieved < 0.95 * rate {
            limited = true;
            if loss < 0.01 {
                best = f64::max(best, achieved);
            }
            break;
        }
        if loss >= 0.01 {
            // One retry per ramp: a single hiccup of a shared machine should not end it.
            if !retried {
                retried = true;
                std::thread::sleep(Duration::from_millis(300));
                continue;
            }
            break;
        }
        best = achieved;
        rate *= 1.2;
        std::thread::sleep(Duration::from_millis(300));
    }
    (best, limited)
}

/// Sockets of one server's load: 500 channel flows, 16 fast flows, 16 Binding clients, a peer.
struct Rig {
    flows: Vec<UdpSocket>,
    fast: Vec<UdpSocket>,
    binders: Vec<UdpSocket>,
    peer: UdpSocket,
    /// Credentials of `flows` then `fast`.
    creds: Vec<Creds>,
    nonce: Option<Vec<u8>>,
    refreshed: Instant,
}

impl Rig {
    /// Refreshes every flow once the last refresh is two minutes old.
    fn keep_alive(&mut self) -> anyhow::Result<()> {
        if self.refreshed.elapsed() < Duration::from_secs(120) {
            return Ok(());
        }
        let p = self.peer.local_addr()?;
        for (s, c) in self.flows.iter().chain(&self.fast).zip(&self.creds) {
            refresh_flow(s, c, p, &mut self.nonce)?;
        }
        self.refreshed = Instant::now();
        Ok(())
    }
}

fn rig(server: &Server) -> anyhow::Result<Rig> {
    let peer = UdpSocket::bind("127.0.0.1:0")?;
    peer.set_nonblocking(true)?;
    bedside_turn::driver::set_buffers(peer.as_raw_fd(), 8 << 20);
    let p = peer.local_addr()?;
    let t = Instant::now();
    let mut nonce = None;
    let (flows, mut creds): (Vec<UdpSocket>, Vec<Creds>) = (0..500)
        .map(|i| setup_flow(server.addr, p, &format!("u{i}"), &mut nonce))
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    println!(
        "  {}: 500 allocations + channels in {:.2} s",
        server.name,
        t.elapsed().as_secs_f64()
    );
    let (fast, fast_creds): (Vec<UdpSocket>, Vec<Creds>) = (0..16)
        .map(|i| setup_flow(server.addr, p, &format!("r{i}"), &mut nonce))
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    creds.extend(fast_creds);
    let binders: Vec<UdpSocket> = (0..16)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            s.connect(server.addr)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<io::Result<_>>()?;
    for s in fast.iter().chain(&binders) {
        bedside_turn::driver::set_buffers(s.as_raw_fd(), 4 << 20);
    }
    Ok(Rig {
        flows,
        fast,
        binders,
        peer,
        creds,
        nonce,
        refreshed: Instant::now(),
    })
}

/// One measured load: server CPU µs per relayed packet, loss, round trip p50 and p99 (µs).
#[derive(Clone, Copy)]
struct Measured {
    us: f64,
    loss: f64,
    p50: f64,
    p99: f64,
}

/// Server CPU per relayed packet, loss and round trips, at 50 msg/s on each of `flows`.
fn cpu_per_packet(server: &Server, rig: &Rig, flows: usize, len: usize, secs: f64) -> Measured {
    let flows = &rig.flows[..flows.min(rig.flows.len())];
    cpu_at(
        server,
        flows,
        &rig.peer,
        len,
        50.0 * flows.len() as f64,
        secs,
    )
}

/// Server CPU per relayed packet, loss and round trips at `rate` messages/s over `flows`.
fn cpu_at(
    server: &Server,
    flows: &[UdpSocket],
    peer: &UdpSocket,
    len: usize,
    rate: f64,
    secs: f64,
) -> Measured {
    let msg = channel_msg(len);
    let rig_peer = peer;
    run_load(
        flows,
        &msg,
        Some(rig_peer),
        rate,
        Duration::from_millis(300),
    ); // warm-up
    let c0 = cpu_ns(server.child.id());
    let r = run_load(
        flows,
        &msg,
        Some(rig_peer),
        rate,
        Duration::from_secs_f64(secs),
    );
    let c1 = cpu_ns(server.child.id());
    let relayed = r.peer_rx + r.client_rx;
    let loss = 1.0 - r.client_rx as f64 / r.sent.max(1) as f64;
    let us = (c1 - c0) as f64 / 1000.0 / relayed.max(1) as f64;
    let (p50, p99) = percentiles(r.rtts);
    println!(
        "  {:8} {len:>4} B x {rate:.0}/s: sent {} msgs, relayed {relayed} packets, loss {:.3}%, server CPU {:.3} s -> {us:.3} us/packet, round trip p50 {p50:.0} us p99 {p99:.0} us",
        server.name,
        r.sent,
        loss * 100.0,
        (c1 - c0) as f64 / 1e9
    );
    Measured { us, loss, p50, p99 }
}

/// Syscalls and wake-ups per relayed packet at 50 msg/s on each of `flows` (a separate run:
/// counting syscalls costs the server some CPU).
fn syscalls_per_packet(server: &Server, rig: &Rig, flows: usize, secs: f64) -> (f64, f64) {
    let msg = channel_msg(160);
    let flows = &rig.flows[..flows.min(rig.flows.len())];
    let rate = 50.0 * flows.len() as f64;
    let pid = server.child.id();
    let ((r, w), n) = count_syscalls(pid, || {
        let w0 = wakeups(pid);
        let r = run_load(
            flows,
            &msg,
            Some(&rig.peer),
            rate,
            Duration::from_secs_f64(secs),
        );
        (r, wakeups(pid) - w0)
    });
    let relayed = (r.peer_rx + r.client_rx).max(1) as f64;
    // perf counts from its start to its stop, 300 ms before the load and its drain after:
    // idle time, when neither server makes syscalls beyond a timer tick.
    let sys = n.map(|n| n as f64 / relayed).unwrap_or(f64::NAN);
    let wk = w as f64 / relayed;
    println!(
        "  {:8} 160 B x {rate:.0}/s: {sys:.2} syscalls and {wk:.2} wake-ups per relayed packet",
        server.name
    );
    (sys, wk)
}

/// coturn's bursty load: `turnutils_uclient` with `clients` allocations (channels, no RTCP)
/// sending `msgs` messages of 160 B each, one every `interval_ms` per client, to a
/// `turnutils_peer` echo; both pinned to `cpu`. Server CPU is counted from the end of
/// uclient's connect phase to its exit; relayed packets are its sent plus received messages.
/// Returns (µs per relayed packet, messages/s, loss, uclient's average round trip in µs).
fn uclient_load(
    server: &Server,
    cpu: Option<usize>,
    clients: u32,
    msgs: u32,
    interval_ms: u32,
) -> anyhow::Result<(f64, f64, f64, f64)> {
    use std::io::BufRead;
    let peer_port = free_port();
    let mut peer = spawn_pinned(
        Command::new("turnutils_peer")
            .args(["-p", &peer_port.to_string(), "-L", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        cpu,
    )
    .context("starting turnutils_peer")?;
    std::thread::sleep(Duration::from_millis(200));
    let mut uc = spawn_pinned(
        Command::new("turnutils_uclient")
            .args(["-W", SECRET, "-p", &server.addr.port().to_string()])
            .args(["-e", "127.0.0.1", "-r", &peer_port.to_string()])
            .args([
                "-n",
                &msgs.to_string(),
                "-l",
                "160",
                "-m",
                &clients.to_string(),
            ])
            .args(["-z", &interval_ms.to_string(), "-c", "127.0.0.1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
        cpu,
    )
    .context("starting turnutils_uclient")?;
    let out = uc.stdout.take().context("uclient stdout")?;
    let (mut c0, mut t0) = (None, None);
    let (mut sent, mut recv, mut rtt_ms) = (0u64, 0u64, f64::NAN);
    let grab = |line: &str, key: &str| -> Option<f64> {
        line.split(key)
            .nth(1)?
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()?
            .parse()
            .ok()
    };
    for line in std::io::BufReader::new(out).lines() {
        let line = line?;
        if c0.is_none() && line.contains("Total connect time") {
            c0 = Some(cpu_ns(server.child.id()));
            t0 = Some(Instant::now());
        }
        if let (Some(s), Some(r)) = (grab(&line, "tot_send_msgs="), grab(&line, "tot_recv_msgs=")) {
            (sent, recv) = (s as u64, r as u64);
        }
        if let Some(v) = grab(&line, "Average round trip delay ") {
            rtt_ms = v;
        }
    }
    let _ = uc.wait();
    let c1 = cpu_ns(server.child.id());
    let elapsed = t0.map(|t| t.elapsed().as_secs_f64()).unwrap_or(f64::NAN);
    let _ = peer.kill();
    let _ = peer.wait();
    let c0 = c0.context("uclient never finished connecting")?;
    let relayed = sent + recv;
    let us = (c1 - c0) as f64 / 1000.0 / relayed.max(1) as f64;
    let rate = sent as f64 / elapsed;
    let loss = 1.0 - recv as f64 / sent.max(1) as f64;
    println!(
        "  {:8} uclient {clients} x 160 B every {interval_ms} ms: sent {sent}, back {recv} in {elapsed:.1} s ({rate:.0} msgs/s), server CPU {:.3} s -> {us:.3} us/packet, uclient's average round trip {:.0} us",
        server.name,
        (c1 - c0) as f64 / 1e9,
        rtt_ms * 1000.0
    );
    Ok((us, rate, loss, rtt_ms * 1000.0))
}

/// Datagrams dropped at full receive buffers, from /proc/net/udp: (sockets bound to one of
/// `ports` on 127.0.0.1, i.e. the load generator's; every other socket, i.e. the servers').
fn udp_drops(ports: &[u16]) -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    let (mut mine, mut other) = (0, 0);
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(drops)) = (f.get(1), f.last().and_then(|d| d.parse::<u64>().ok()))
        else {
            continue;
        };
        let port = local
            .split(':')
            .nth(1)
            .and_then(|p| u16::from_str_radix(p, 16).ok())
            .unwrap_or(0);
        if ports.contains(&port) {
            mine += drops;
        } else {
            other += drops;
        }
    }
    (mine, other)
}

/// Round trips client -> relay -> peer (echo) -> relay -> client, one message at a time every
/// 2 ms on an otherwise idle server: (p50, p99) in µs.
fn round_trips(rig: &Rig, count: usize) -> (f64, f64) {
    let client = &rig.fast[0];
    let msg = channel_msg(160);
    let mut buf = [0u8; 2048];
    let mut rtts = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        if client.send(&msg).is_err() {
            continue;
        }
        let deadline = t + Duration::from_millis(100);
        let mut echoed = false;
        while Instant::now() < deadline {
            if !echoed && let Ok((n, from)) = rig.peer.recv_from(&mut buf) {
                let _ = rig.peer.send_to(&buf[..n], from);
                echoed = true;
            }
            if echoed && client.recv(&mut buf).is_ok() {
                rtts.push(t.elapsed().as_secs_f64() * 1e6);
                break;
            }
            std::hint::spin_loop();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    rtts.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| {
        rtts.get(((rtts.len() as f64 * q) as usize).min(rtts.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    (at(0.5), at(0.99))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `BENCH_ONLY=gso`: where GSO applies (a few allocations, several datagrams per relay socket
/// per batch), CPU per relayed packet for coturn, ours and ours with `udp-offload = false`, at
/// 16 allocations x 1,000 msg/s, interleaved, medians of `reps`.
fn gso_bench(dir: &Path, cpu: Option<usize>, reps: usize, secs: f64) -> anyhow::Result<()> {
    let mut servers = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        servers.push(start_coturn(dir, cpu)?);
        servers.push(start_ours_with(cpu, true, "bedside")?);
        servers.push(start_ours_with(cpu, false, "no-gso")?);
        let mut rigs: Vec<Rig> = servers.iter().map(rig).collect::<anyhow::Result<_>>()?;
        let mut us: Vec<Vec<f64>> = vec![Vec::new(); servers.len()];
        for _ in 0..reps {
            for (si, s) in servers.iter().enumerate() {
                rigs[si].keep_alive()?;
                let r = &rigs[si];
                us[si].push(cpu_at(s, &r.fast, &r.peer, 160, 16_000.0, secs).us);
            }
        }
        let m: Vec<f64> = us.into_iter().map(median).collect();
        println!(
            "\n16 allocations x 1,000 msg/s (load average now {}): CPU us/relayed packet coturn {:.3}, bedside {:.3} ({:.2}x), bedside without GSO/GRO {:.3} ({:.2}x); GSO/GRO saves {:.0} %",
            loadavg(),
            m[0],
            m[1],
            m[1] / m[0],
            m[2],
            m[2] / m[0],
            (1.0 - m[1] / m[2]) * 100.0
        );
        Ok(())
    })();
    for s in servers {
        s.stop();
    }
    result
}

fn main() -> anyhow::Result<()> {
    if which("turnserver").is_none() {
        println!(
            "SKIP: turnserver (coturn) is not installed; `apt-get install coturn` to run the bench"
        );
        return Ok(());
    }
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let (reps, secs, step) = if quick { (1, 2.0, 1.0) } else { (3, 5.0, 1.5) };
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let (gen_cpu, srv_cpu) = if cpus >= 2 {
        (Some(0), Some(1))
    } else {
        (None, None)
    };
    if let Some(c) = gen_cpu {
        pin_to(c);
    }
    println!(
        "turn-bench: load generator on cpu {gen_cpu:?}, servers on cpu {srv_cpu:?}; load average {}",
        loadavg()
    );
    let dir = std::env::temp_dir().join(format!("bedside-turn-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "gso") {
        return gso_bench(&dir, srv_cpu, reps, secs);
    }
    let t0 = Instant::now();
    let mut servers: Vec<Server> = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        servers.push(start_coturn(&dir, srv_cpu)?);
        servers.push(start_ours(srv_cpu)?);
        let mut rigs: Vec<Rig> = servers.iter().map(rig).collect::<anyhow::Result<_>>()?;
        // 1. Interleaved repetitions, so background noise hits both servers alike.
        // [server][load]: 500 x 50 msg/s of 160 B and 1200 B, then 100 x 50 msg/s of 160 B.
        let loads = [(500usize, 160usize), (500, 1200), (100, 160)];
        let mut cpu: Vec<Vec<Vec<Measured>>> = vec![vec![Vec::new(); loads.len()]; 2];
        let mut rtt: Vec<Vec<(f64, f64)>> = vec![Vec::new(); 2];
        let uclient = which("turnutils_uclient").is_some() && which("turnutils_peer").is_some();
        if !uclient {
            println!("  (turnutils_uclient/turnutils_peer not found: no bursty load)");
        }
        let mut bursty: Vec<Vec<(f64, f64, f64, f64)>> = vec![Vec::new(); 2];
        for _ in 0..reps {
            for (si, s) in servers.iter().enumerate() {
                rigs[si].keep_alive()?;
                for (li, (flows, len)) in loads.into_iter().enumerate() {
                    cpu[si][li].push(cpu_per_packet(s, &rigs[si], flows, len, secs));
                }
                rtt[si].push(round_trips(&rigs[si], if quick { 200 } else { 500 }));
                if uclient {
                    bursty[si].push(uclient_load(
                        s,
                        gen_cpu,
                        100,
                        if quick { 200 } else { 500 },
                        2,
                    )?);
                }
            }
        }
        // Where the time goes: syscalls and wake-ups per packet, light and heavy.
        let mut sys: Vec<Vec<(f64, f64)>> = vec![Vec::new(); 2];
        for (si, s) in servers.iter().enumerate() {
            rigs[si].keep_alive()?;
            for flows in [100usize, 500] {
                sys[si].push(syscalls_per_packet(s, &rigs[si], flows, secs.min(3.0)));
            }
        }
        // 3. and 4. Ramps.
        let mut rates = Vec::new();
        for (si, s) in servers.iter().enumerate() {
            rigs[si].keep_alive()?;
            println!(
                "  {}: ramp of echoed 160 B messages (16 allocations)",
                s.name
            );
            let m = ramp(
                s,
                &rigs[si].fast,
                &channel_msg(160),
                Some(&rigs[si].peer),
                20_000.0,
                Duration::from_secs_f64(step),
            );
            let mut req = Vec::new();
            Builder::new(&mut req, method::BINDING, Class::Request, &[7; 12]).finish(None, false);
            println!("  {}: ramp of Binding requests (16 clients)", s.name);
            let b = ramp(
                s,
                &rigs[si].binders,
                &req,
                None,
                40_000.0,
                Duration::from_secs_f64(step),
            );
            rates.push((m, b));
        }
        println!(
            "\nresults ({} repetitions, elapsed {:.0} s, load average now {}):",
            reps,
            t0.elapsed().as_secs_f64(),
            loadavg()
        );
        println!(
            "  metric                                   coturn      bedside   ours/coturn  target"
        );
        for (li, (flows, len)) in loads.into_iter().enumerate() {
            let med =
                |si: usize, f: fn(&Measured) -> f64| median(cpu[si][li].iter().map(f).collect());
            let (cu, ou) = (med(0, |m| m.us), med(1, |m| m.us));
            let cl = cpu[0][li].iter().map(|x| x.loss).fold(0.0, f64::max);
            let ol = cpu[1][li].iter().map(|x| x.loss).fold(0.0, f64::max);
            println!(
                "  CPU us/relayed pkt, {len:>4} B x{flows:>4} flows {cu:>8.3}     {ou:>8.3}      {:>6.2}    <= 0.50   (max loss {:.3}% / {:.3}%)",
                ou / cu,
                cl * 100.0,
                ol * 100.0
            );
            for (name, f) in [
                ("p50", (|m: &Measured| m.p50) as fn(&Measured) -> f64),
                ("p99", |m: &Measured| m.p99),
            ] {
                let (c, o) = (med(0, f), med(1, f));
                println!(
                    "    round trip {name} under that load, us  {c:>8.0}     {o:>8.0}      {:>6.2}    <= 1.00",
                    o / c
                );
            }
        }
        if uclient {
            let med = |si: usize, f: fn(&(f64, f64, f64, f64)) -> f64| {
                median(bursty[si].iter().map(f).collect())
            };
            let (cu, ou) = (med(0, |b| b.0), med(1, |b| b.0));
            println!(
                "  CPU us/relayed pkt, uclient (bursty)    {cu:>8.3}     {ou:>8.3}      {:>6.2}    <= 0.50   ({:.0} / {:.0} msgs/s, max loss {:.3}% / {:.3}%)",
                ou / cu,
                med(0, |b| b.1),
                med(1, |b| b.1),
                bursty[0].iter().map(|b| b.2).fold(0.0, f64::max) * 100.0,
                bursty[1].iter().map(|b| b.2).fold(0.0, f64::max) * 100.0,
            );
            let (c, o) = (med(0, |b| b.3), med(1, |b| b.3));
            println!(
                "    uclient's average round trip, us      {c:>8.0}     {o:>8.0}      {:>6.2}    <= 1.00",
                o / c
            );
        }
        for (q, name) in [(0usize, "p50"), (1, "p99")] {
            let pick = |v: &Vec<(f64, f64)>| {
                median(v.iter().map(|x| if q == 0 { x.0 } else { x.1 }).collect())
            };
            let (c, o) = (pick(&rtt[0]), pick(&rtt[1]));
            println!(
                "  relayed round trip {name}, us (median)   {c:>10.0}   {o:>10.0}      {:>6.2}    <= 1.00",
                o / c
            );
        }
        for (k, flows) in [100usize, 500].into_iter().enumerate() {
            let (c, o) = (sys[0][k], sys[1][k]);
            println!(
                "  syscalls / wake-ups per pkt, x{flows:>4}    {:>5.2} / {:<5.2}  {:>5.2} / {:<5.2}",
                c.0, c.1, o.0, o.1
            );
        }
        let note = |l: bool| {
            if l {
                " (load generator limit reached)"
            } else {
                ""
            }
        };
        let ((cm, cml), (cb, cbl)) = rates[0];
        let ((om, oml), (ob, obl)) = rates[1];
        println!(
            "  echoed msgs/s, <1% loss                {cm:>10.0}   {om:>10.0}      {:>6.2}    >= 1.50{}{}",
            om / cm.max(1.0),
            note(cml),
            note(oml)
        );
        println!(
            "  Binding responses/s, <1% loss          {cb:>10.0}   {ob:>10.0}      {:>6.2}    >= 1.30{}{}",
            ob / cb.max(1.0),
            note(cbl),
            note(obl)
        );
        Ok(())
    })();
    for s in servers {
        s.stop();
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}
