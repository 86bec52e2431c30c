//! The impairment lab: test hosts in network namespaces of their own, joined by a bridge in one
//! more namespace, with nftables to cut or drop what crosses. Real binaries run on those hosts
//! (`ip netns exec`), so a test sees what a real network does to a real call.
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables); [`Lab::new`] says why not when it can't.
//! Traffic stays inside the namespaces it creates (addresses 198.18.0.0/24, the benchmarking
//! range); everything is removed on drop.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A set of hosts on one bridged segment.
pub struct Lab {
    prefix: String,
    hosts: Vec<String>,
    children: Vec<Child>,
}

fn sh(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<Output> {
    sh(Command::new("ip").args(args))
}

/// A workspace binary built by `cargo build`/`cargo test` (debug).
pub fn workspace_bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug").join(name)
}

impl Lab {
    /// Why the lab cannot run here, if it cannot.
    pub fn unavailable() -> Option<String> {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if !root {
            return Some("network namespaces need root".into());
        }
        for tool in ["ip", "nft"] {
            if Command::new(tool).arg("-V").output().is_err() {
                return Some(format!("`{tool}` is not installed (iproute2, nftables)"));
            }
        }
        // Unique per call: tests ask at the same time.
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let probe = format!("bsprobe{}x{n}", std::process::id() % 100_000);
        if ip(&["netns", "add", &probe]).is_err() {
            return Some("cannot create a network namespace here".into());
        }
        let _ = ip(&["netns", "del", &probe]);
        None
    }

    /// Hosts `names[i]` at 198.18.0.(i+1)/24 on one bridge.
    pub fn new(names: &[&str]) -> Result<Lab> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("bs{}x{n}", std::process::id() % 100_000);
        let lab = Lab {
            prefix: prefix.clone(),
            hosts: names.iter().map(|s| s.to_string()).collect(),
            children: Vec::new(),
        };
        let br = lab.ns("br");
        ip(&["netns", "add", &br])?;
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        for (i, host) in names.iter().enumerate() {
            let ns = lab.ns(host);
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            // Interface names are at most 15 bytes: keep them short and unique per lab.
            let (inner, outer) = (format!("{prefix}h{i}"), format!("{prefix}b{i}"));
            ip(&[
                "link", "add", &inner, "type", "veth", "peer", "name", &outer,
            ])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &outer, "netns", &br])?;
            ip(&["-n", &ns, "link", "set", &inner, "name", "eth0"])?;
            let addr = format!("{}/24", Self::addr_of(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            // A host without any route cannot join multicast groups (webrtc's mDNS fails with
            // ENODEV): like a real host, each gets a default route, on-link on its own segment.
            ip(&["-n", &ns, "route", "add", "default", "dev", "eth0"])?;
            ip(&["-n", &br, "link", "set", &outer, "master", "br0", "up"])?;
        }
        Ok(lab)
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// The network namespace of `host`, for programs a test starts there itself
    /// (`ip netns exec <namespace> ...`).
    pub fn namespace(&self, host: &str) -> String {
        assert!(self.hosts.iter().any(|h| h == host), "a lab host");
        self.ns(host)
    }

    fn addr_of(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, i as u8 + 1)
    }

    /// The address of `host`.
    pub fn addr(&self, host: &str) -> Ipv4Addr {
        let i = self
            .hosts
            .iter()
            .position(|h| h == host)
            .expect("a lab host");
        Self::addr_of(i)
    }

    /// Moves `host` from address `from` to `to`, as a phone going from Wi-Fi to cellular does:
    /// the new address appears, then the old one is gone.
    pub fn handover(&self, host: &str, from: Ipv4Addr, to: Ipv4Addr) -> Result<()> {
        let ns = self.ns(host);
        // The new address is a secondary on the same subnet: without promotion, deleting the
        // primary would delete it too and leave the host with no address at all.
        sh(Command::new("ip").args([
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-qw",
            "net.ipv4.conf.eth0.promote_secondaries=1",
        ]))?;
        ip(&["-n", &ns, "addr", "add", &format!("{to}/24"), "dev", "eth0"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "del",
            &format!("{from}/24"),
            "dev",
            "eth0",
        ])?;
        Ok(())
    }

    /// Limits what `host` sends to `kbit` kbit/s (a token bucket on its interface), or lifts
    /// the limit with `None`.
    pub fn limit_uplink(&self, host: &str, kbit: Option<u32>) -> Result<()> {
        let ns = self.ns(host);
        match kbit {
            Some(rate) => sh(Command::new("ip").args([
                "netns",
                "exec",
                &ns,
                "tc",
                "qdisc",
                "replace",
                "dev",
                "eth0",
                "root",
                "tbf",
                "rate",
                &format!("{rate}kbit"),
                "burst",
                "16kb",
                "latency",
                "200ms",
            ]))
            .map(drop),
            None => sh(Command::new("ip").args([
                "netns", "exec", &ns, "tc", "qdisc", "del", "dev", "eth0", "root",
            ]))
            .map(drop),
        }
    }

    /// Starts `program` on `host`; it is killed when the lab is dropped.
    pub fn spawn(&mut self, host: &str, program: &std::path::Path, args: &[&str]) -> Result<u32> {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(host)])
            .arg(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(if std::env::var_os("BEDSIDE_LAB_LOGS").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .with_context(|| format!("starting {program:?} on {host}"))?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// The child started as `pid`, to read its output or wait for it.
    pub fn child(&mut self, pid: u32) -> &mut Child {
        self.children
            .iter_mut()
            .find(|c| c.id() == pid)
            .expect("a child of this lab")
    }

    /// Runs a shell command on `host` and returns its standard output.
    pub fn run(&self, host: &str, script: &str) -> Result<String> {
        let out =
            sh(Command::new("ip").args(["netns", "exec", &self.ns(host), "bash", "-c", script]))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Loads nftables rules on `host` (`nft -f` syntax).
    pub fn nft(&self, host: &str, rules: &str) -> Result<()> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(host), "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        use std::io::Write;
        child.stdin.take().unwrap().write_all(rules.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("nft on {host}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// An HTTP/1.1 request from `host` (bash's /dev/tcp: the lab needs no HTTP client).
    pub fn http(
        &self,
        host: &str,
        addr: &str,
        port: u16,
        method: &str,
        path: &str,
        bearer: &str,
    ) -> Result<String> {
        let script = format!(
            "exec 3<>/dev/tcp/{addr}/{port}; printf '{method} {path} HTTP/1.1\\r\\nHost: {addr}\\r\\n\
             Authorization: Bearer {bearer}\\r\\nContent-Length: 0\\r\\nConnection: close\\r\\n\\r\\n' >&3; \
             cat <&3"
        );
        let response = self.run(host, &script)?;
        Ok(response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for host in self.hosts.clone() {
            let _ = ip(&["netns", "del", &self.ns(&host)]);
        }
        let _ = ip(&["netns", "del", &self.ns("br")]);
    }
}
