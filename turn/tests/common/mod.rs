//! A small TURN client for the integration tests, built on the crate's own codec.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bedside_turn::stun::{self, Builder, Class, Message, attr, method};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UdpSocket;

pub const SECRET: &str = "integration-secret";

/// A suite cannot run here for want of a tool (`reason`): locally it skips, saying why; under
/// `CI=true` it fails. The rule of `bedside_tests::skip`, which this crate does not depend on
/// (that crate depends on this one through the server).
pub fn skip(reason: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(!ci, "CI=true, and this suite cannot run: {reason}");
    eprintln!("SKIPPED: {reason}");
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn config() -> bedside_turn::TurnConfig {
    bedside_turn::TurnConfig {
        auth_secret: SECRET.into(),
        listen_udp: vec!["127.0.0.1:0".parse().unwrap()],
        listen_tcp: vec!["127.0.0.1:0".parse().unwrap()],
        relay_port_min: 42000,
        relay_port_max: 43999,
        user_quota: 1000,
        ..Default::default()
    }
}

/// Where a client sends: UDP datagrams or a framed byte stream.
pub enum Link {
    Udp(UdpSocket),
    Stream(Box<dyn Stream>),
}

pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

pub struct Client {
    pub link: Link,
    pub username: String,
    pub password: String,
    pub nonce: Option<Vec<u8>>,
    pub realm: String,
    tid: u32,
    pending: Vec<u8>,
}

pub struct Resp {
    pub bytes: Vec<u8>,
}

impl Resp {
    pub fn msg(&self) -> Message<'_> {
        Message::parse(&self.bytes).expect("valid STUN")
    }
    pub fn code(&self) -> Option<u16> {
        self.msg()
            .get(attr::ERROR_CODE)
            .and_then(stun::parse_error_code)
    }
    pub fn addr(&self, typ: u16) -> SocketAddr {
        self.msg().get_xor_addr(typ).expect("attr").expect("addr")
    }
}

impl Client {
    pub fn new(link: Link, user: &str) -> Self {
        let (username, password) =
            bedside_turn::rest_credentials(SECRET, user, Duration::from_secs(600), unix_now());
        Client {
            link,
            username,
            password,
            nonce: None,
            realm: String::new(),
            tid: 0,
            pending: Vec::new(),
        }
    }

    pub async fn send_raw(&mut self, b: &[u8]) {
        match &mut self.link {
            Link::Udp(s) => {
                s.send(b).await.unwrap();
            }
            Link::Stream(s) => s.write_all(b).await.unwrap(),
        }
    }

    /// Next datagram or frame.
    pub async fn recv(&mut self) -> Vec<u8> {
        tokio::time::timeout(Duration::from_secs(5), self.recv_inner())
            .await
            .expect("timed out waiting for the server")
    }

    async fn recv_inner(&mut self) -> Vec<u8> {
        match &mut self.link {
            Link::Udp(s) => {
                let mut b = vec![0u8; 4096];
                let n = s.recv(&mut b).await.unwrap();
                b.truncate(n);
                b
            }
            Link::Stream(s) => loop {
                if let Ok(Some(n)) = stun::stream_frame_len(&self.pending)
                    && self.pending.len() >= n
                {
                    return self.pending.drain(..n).collect();
                }
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "server closed the stream");
                self.pending.extend_from_slice(&chunk[..n]);
            },
        }
    }

    fn build(&mut self, m: u16, attrs: &dyn Fn(&mut Builder)) -> (Vec<u8>, [u8; 12]) {
        self.tid += 1;
        let mut tid = [0u8; 12];
        tid[..4].copy_from_slice(&self.tid.to_be_bytes());
        let mut buf = Vec::new();
        let mut b = Builder::new(&mut buf, m, Class::Request, &tid);
        attrs(&mut b);
        let key = self.nonce.as_ref().map(|n| {
            b.attr(attr::USERNAME, self.username.as_bytes());
            b.attr(attr::REALM, self.realm.as_bytes());
            b.attr(attr::NONCE, n);
            bedside_turn::auth::long_term_key(&self.username, &self.realm, &self.password)
        });
        b.finish(key.as_ref().map(|k| &k[..]), true);
        (buf, tid)
    }

    /// A request, answering 401/438 challenges like a real client.
    pub async fn request(&mut self, m: u16, attrs: &dyn Fn(&mut Builder)) -> Resp {
        for _ in 0..3 {
            let (req, tid) = self.build(m, attrs);
            self.send_raw(&req).await;
            let resp = loop {
                let b = self.recv().await;
                if let Ok(msg) = Message::parse(&b)
                    && msg.tid == tid
                {
                    break Resp { bytes: b };
                }
            };
            let msg = resp.msg();
            let code = resp.code();
            if (code == Some(401) && self.nonce.is_none()) || code == Some(438) {
                self.nonce = msg.get(attr::NONCE).map(|v| v.to_vec());
                self.realm = String::from_utf8(msg.get(attr::REALM).unwrap().to_vec()).unwrap();
                continue;
            }
            return resp;
        }
        panic!("challenge loop");
    }

    pub async fn allocate(&mut self) -> SocketAddr {
        let r = self
            .request(method::ALLOCATE, &|b| {
                b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
            })
            .await;
        assert_eq!(r.code(), None, "allocate failed");
        r.addr(attr::XOR_RELAYED_ADDRESS)
    }

    pub async fn create_permission(&mut self, peer: SocketAddr) -> Option<u16> {
        self.request(method::CREATE_PERMISSION, &|b| {
            b.xor_addr(attr::XOR_PEER_ADDRESS, peer);
        })
        .await
        .code()
    }

    pub async fn channel_bind(&mut self, ch: u16, peer: SocketAddr) -> Option<u16> {
        self.request(method::CHANNEL_BIND, &|b| {
            let mut v = [0u8; 4];
            v[..2].copy_from_slice(&ch.to_be_bytes());
            b.attr(attr::CHANNEL_NUMBER, &v);
            b.xor_addr(attr::XOR_PEER_ADDRESS, peer);
        })
        .await
        .code()
    }

    pub async fn send_indication(&mut self, peer: SocketAddr, data: &[u8]) {
        let mut buf = Vec::new();
        let mut b = Builder::new(&mut buf, method::SEND, Class::Indication, &[9; 12]);
        b.xor_addr(attr::XOR_PEER_ADDRESS, peer);
        b.attr(attr::DATA, data);
        b.finish(None, false);
        self.send_raw(&buf).await;
    }

    pub async fn send_channel(&mut self, ch: u16, data: &[u8]) {
        let mut buf = Vec::new();
        let pad = matches!(self.link, Link::Stream(_));
        stun::ChannelData { channel: ch, data }.encode(&mut buf, pad);
        self.send_raw(&buf).await;
    }
}

pub async fn udp_client(server: SocketAddr, user: &str) -> Client {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.connect(server).await.unwrap();
    Client::new(Link::Udp(s), user)
}

pub async fn tcp_client(server: SocketAddr, user: &str) -> Client {
    let s = tokio::net::TcpStream::connect(server).await.unwrap();
    Client::new(Link::Stream(Box::new(s)), user)
}
