//! The collectives over TCP: rank 0 is the hub, every other rank holds one connection to it.
//! Ranks meet at rank 0's address, introduce themselves with their rank, world size and
//! configuration, and rank 0 answers every rank with the same verdict (a mismatch names the
//! setting and both values). An all-reduce gathers every rank's buffer at rank 0, which sums
//! them in rank order and sends the one result back: every rank gets the same bits, and the
//! same bits on every run.
//!
//! A rank that exits closes its connection, which its peer sees at once. Each rank also
//! exchanges a heartbeat with rank 0 every second on a second connection, from a thread of its
//! own: a rank whose process stops (a hung host, SIGSTOP, a machine gone without closing its
//! sockets) is given up on after [`super::heartbeat`] seconds of silence, and any other wait for
//! a peer after the timeout. Either way the rank that notices fails with a message naming the
//! other, and rank 0 then drops every connection, so the whole job stops within seconds.

use super::{Collective, Config, Place};
use anyhow::{anyhow, bail, Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Written first by every rank, so that a stray connection (another program on the port) is
/// refused rather than read as a rank.
const MAGIC: &[u8; 8] = b"incept1\0";
/// Written first on a rank's heartbeat connection, then its rank.
const BEAT: &[u8; 8] = b"incept1h";

/// The largest message a peer may announce: a guard against reading a wrong length as a huge
/// allocation (the whole gradient is a few MB).
const MAX_MESSAGE: u64 = 1 << 32;

/// A data-parallel group over TCP.
pub struct TcpGroup {
    rank: usize,
    world: usize,
    /// Rank 0: the connection of rank `i` at `i - 1`; any other rank: the one to rank 0.
    peers: Vec<TcpStream>,
    /// Set by a heartbeat watcher that gave up on a peer, which also shut the peer's
    /// connection down so that a wait on it ends at once.
    hung: Arc<Mutex<Option<String>>>,
    /// The heartbeat connections, shut down when the group is dropped (ending the watchers).
    beats: Vec<TcpStream>,
}

impl Drop for TcpGroup {
    fn drop(&mut self) {
        for b in &self.beats {
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}

impl TcpGroup {
    /// Meets the other ranks of `place` and checks that all run `config` (setting, value) pairs,
    /// in order. `timeout` bounds the meeting and, from then on, every wait for a peer.
    pub fn join(place: &Place, config: &[(String, String)], timeout: Duration) -> Result<TcpGroup> {
        let port = place.meeting_port()?;
        let patience = super::heartbeat()?.min(timeout);
        let group = if place.rank == 0 {
            Self::host(place.world, port, config, timeout)?
        } else {
            Self::visit(place, port, config, timeout)?
        };
        for p in &group.peers {
            p.set_read_timeout(Some(timeout))?;
            p.set_write_timeout(Some(timeout))?;
            p.set_nodelay(true)?;
        }
        for (i, beat) in group.beats.iter().enumerate() {
            let peer = if group.rank == 0 { i + 1 } else { 0 };
            let main = group.peers[i].try_clone()?;
            let (beat, hung) = (beat.try_clone()?, group.hung.clone());
            std::thread::Builder::new()
                .name(format!("heartbeat-{peer}"))
                .spawn(move || watch(beat, main, peer, patience, &hung))?;
        }
        Ok(group)
    }

    fn host(
        world: usize, port: u16, config: &[(String, String)], timeout: Duration,
    ) -> Result<Self> {
        let listener = TcpListener::bind(("0.0.0.0", port)).with_context(|| {
            format!(
                "rank 0 cannot listen on port {port} for the other ranks; choose a free \
                 MASTER_PORT"
            )
        })?;
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + timeout;
        let mut slots: Vec<Option<(TcpStream, Config)>> = (1..world).map(|_| None).collect();
        while slots.iter().any(Option::is_none) {
            let (mut s, from) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing: Vec<String> = (1..world)
                            .filter(|r| slots[r - 1].is_none())
                            .map(|r| r.to_string())
                            .collect();
                        bail!(
                            "rank 0 waited {timeout:?} on port {port} and rank(s) {} never \
                             arrived: check that every rank was started with the same \
                             MASTER_ADDR/MASTER_PORT and can reach this host",
                            missing.join(", ")
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(e).context("accepting a rank's connection"),
            };
            s.set_nonblocking(false)?;
            s.set_read_timeout(Some(timeout))?;
            let Ok((rank, their_world, their_config)) = read_hello(&mut s) else {
                // Not a rank of this job (a port scanner, another program): ignore it.
                tracing::warn!("ignoring a connection from {from} that is not an incept rank");
                continue;
            };
            if their_world != world {
                let msg = format!(
                    "rank {rank} was started with a world size of {their_world}, rank 0 with \
                     {world}: every rank must see the same WORLD_SIZE"
                );
                let _ = send(&mut s, msg.as_bytes());
                bail!(msg);
            }
            match slots.get_mut(rank.wrapping_sub(1)) {
                Some(slot @ None) => *slot = Some((s, their_config)),
                _ => {
                    let msg = format!("two processes claim rank {rank} (or it is out of range)");
                    let _ = send(&mut s, msg.as_bytes());
                    bail!(msg);
                }
            }
        }
        let (peers, configs): (Vec<TcpStream>, Vec<_>) =
            slots.into_iter().map(|s| s.expect("every slot is filled")).unzip();
        let verdict = configs
            .iter()
            .enumerate()
            .find_map(|(i, theirs)| mismatch(config, theirs, i + 1))
            .unwrap_or_default();
        let mut group = TcpGroup { rank: 0, world, peers, hung: Arc::default(), beats: Vec::new() };
        for p in &mut group.peers {
            send(p, verdict.as_bytes()).context("answering the ranks")?;
        }
        if !verdict.is_empty() {
            bail!(verdict);
        }
        // Then every rank's heartbeat connection, in rank order.
        let mut beats: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
        while beats.iter().any(Option::is_none) {
            let mut s = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => return Err(e).context("accepting the ranks' heartbeat connections"),
            };
            s.set_nonblocking(false)?;
            s.set_read_timeout(Some(timeout))?;
            let mut hello = [0u8; 16];
            if s.read_exact(&mut hello).is_err() || &hello[..8] != BEAT {
                continue;
            }
            let rank = u64::from_le_bytes(hello[8..].try_into().expect("8 bytes")) as usize;
            if let Some(slot @ None) = beats.get_mut(rank.wrapping_sub(1)) {
                *slot = Some(s);
            }
        }
        group.beats = beats.into_iter().map(|b| b.expect("every slot is filled")).collect();
        Ok(group)
    }

    fn visit(
        place: &Place, port: u16, config: &[(String, String)], timeout: Duration,
    ) -> Result<Self> {
        let (host, deadline) = (&place.master.0, Instant::now() + timeout);
        let addr = (host.as_str(), port)
            .to_socket_addrs()
            .with_context(|| format!("MASTER_ADDR={host}: not a host name this machine resolves"))?
            .next()
            .with_context(|| format!("MASTER_ADDR={host} resolves to no address"))?;
        // Rank 0 may not be listening yet: try again until the deadline.
        let mut s = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| {
                        format!(
                            "rank {} could not reach rank 0 at {host}:{port} within {timeout:?}",
                            place.rank
                        )
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        s.set_read_timeout(Some(timeout))?;
        let mut hello = MAGIC.to_vec();
        hello.extend((place.rank as u64).to_le_bytes());
        hello.extend((place.world as u64).to_le_bytes());
        hello.extend(serde_json::to_vec(config)?);
        send(&mut s, &hello).context("introducing this rank to rank 0")?;
        let hung = Arc::default();
        let verdict = recv(&mut s).map_err(|e| peer_error(&hung, e, 0, "the meeting"))?;
        if !verdict.is_empty() {
            bail!(String::from_utf8_lossy(&verdict).into_owned());
        }
        let mut beat = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .context("opening the heartbeat connection to rank 0")?;
        let mut hello = BEAT.to_vec();
        hello.extend((place.rank as u64).to_le_bytes());
        beat.write_all(&hello).context("opening the heartbeat connection to rank 0")?;
        Ok(TcpGroup {
            rank: place.rank,
            world: place.world,
            peers: vec![s],
            hung,
            beats: vec![beat],
        })
    }

    /// Rank 0's side of a reduction or broadcast: `gather` each rank's message in rank order,
    /// then send `reply` to all.
    fn hub<T>(
        &mut self, what: &str, mut each: impl FnMut(usize, Vec<u8>) -> Result<T>,
    ) -> Result<Vec<T>> {
        let mut out = Vec::with_capacity(self.peers.len());
        for (i, p) in self.peers.iter_mut().enumerate() {
            let msg = recv(p).map_err(|e| peer_error(&self.hung, e, i + 1, what))?;
            out.push(each(i + 1, msg)?);
        }
        Ok(out)
    }

    fn reply_all(&mut self, bytes: &[u8], what: &str) -> Result<()> {
        for (i, p) in self.peers.iter_mut().enumerate() {
            send(p, bytes).map_err(|e| peer_error(&self.hung, e, i + 1, what))?;
        }
        Ok(())
    }

    fn all_reduce<T: Wire>(&mut self, data: &mut [T], what: &str) -> Result<()> {
        if self.rank != 0 {
            let (to_hub, hung) = (&mut self.peers[0], &self.hung);
            send(to_hub, &T::to_bytes(data)).map_err(|e| peer_error(hung, e, 0, what))?;
            let sum = recv(to_hub).map_err(|e| peer_error(hung, e, 0, what))?;
            return T::from_bytes(&sum, data).map_err(|e| anyhow!("{what} from rank 0: {e}"));
        }
        let n = data.len();
        let parts = self.hub(what, |r, bytes| {
            let mut part = vec![T::default(); n];
            T::from_bytes(&bytes, &mut part).map_err(|e| anyhow!("{what} from rank {r}: {e}"))?;
            Ok(part)
        })?;
        for part in &parts {
            for (d, v) in data.iter_mut().zip(part) {
                *d = d.add(*v);
            }
        }
        self.reply_all(&T::to_bytes(data), what)
    }
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        self.all_reduce(data, "an all-reduce")
    }
    fn all_reduce_sum_f64(&mut self, data: &mut [f64]) -> Result<()> {
        self.all_reduce(data, "an all-reduce of the metrics")
    }
    fn broadcast(&mut self, data: &mut [f32]) -> Result<()> {
        let what = "the broadcast of rank 0's values";
        if self.rank != 0 {
            let bytes = recv(&mut self.peers[0]).map_err(|e| peer_error(&self.hung, e, 0, what))?;
            return f32::from_bytes(&bytes, data).map_err(|e| anyhow!("{what}: {e}"));
        }
        self.reply_all(&f32::to_bytes(data), what)
    }
}

/// An element the collectives carry: little-endian bytes on the wire.
trait Wire: Copy + Default {
    fn add(self, other: Self) -> Self;
    fn to_bytes(data: &[Self]) -> Vec<u8>;
    fn from_bytes(bytes: &[u8], out: &mut [Self]) -> Result<(), String>;
}

macro_rules! wire {
    ($($t:ty),*) => {$(
        impl Wire for $t {
            fn add(self, other: Self) -> Self {
                self + other
            }
            fn to_bytes(data: &[Self]) -> Vec<u8> {
                data.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            fn from_bytes(bytes: &[u8], out: &mut [Self]) -> Result<(), String> {
                const SIZE: usize = std::mem::size_of::<$t>();
                if bytes.len() != out.len() * SIZE {
                    return Err(format!(
                        "{} bytes for {} values: the ranks disagree on the buffer's size",
                        bytes.len(),
                        out.len()
                    ));
                }
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(SIZE)) {
                    *o = <$t>::from_le_bytes(c.try_into().expect("chunks of SIZE"));
                }
                Ok(())
            }
        }
    )*};
}
wire!(f32, f64);

fn send(s: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    s.write_all(&(bytes.len() as u64).to_le_bytes())?;
    s.write_all(bytes)?;
    s.flush()
}

fn recv(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > MAX_MESSAGE {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("a message of {len} bytes announced: not an incept rank"),
        ));
    }
    let mut buf = vec![0u8; len as usize];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

fn read_hello(s: &mut TcpStream) -> Result<(usize, usize, Config)> {
    let msg = recv(s)?;
    if msg.len() < 24 || &msg[..8] != MAGIC {
        bail!("not an incept rank");
    }
    let word = |i: usize| u64::from_le_bytes(msg[i..i + 8].try_into().expect("8 bytes")) as usize;
    let config = serde_json::from_slice(&msg[24..])?;
    Ok((word(8), word(16), config))
}

/// The first setting in which `theirs` (rank `rank`'s) differs from rank 0's `ours`.
fn mismatch(ours: &[(String, String)], theirs: &[(String, String)], rank: usize) -> Option<String> {
    let find = |c: &[(String, String)], k: &str| {
        c.iter().find(|(name, _)| name == k).map_or("(not set)".to_string(), |(_, v)| v.clone())
    };
    let names = ours.iter().chain(theirs).map(|(k, _)| k.as_str());
    for name in names {
        let (a, b) = (find(ours, name), find(theirs, name));
        if a != b {
            return Some(format!(
                "the ranks run different configurations: {name} is {b} on rank {rank} but {a} on \
                 rank 0; start every rank with the same settings"
            ));
        }
    }
    None
}

/// Keeps the heartbeat with `peer` on `beat`: a byte each way every second. After `patience`
/// without one, records why in `hung` and shuts `main` (the peer's connection) down, so that
/// whatever waits on it stops at once. Returns when either side closes the connection.
fn watch(
    mut beat: TcpStream, main: TcpStream, peer: usize, patience: Duration,
    hung: &Mutex<Option<String>>,
) {
    const EVERY: Duration = Duration::from_secs(1);
    if beat.set_write_timeout(Some(EVERY)).is_err() || beat.set_nodelay(true).is_err() {
        return;
    }
    let mut heard = Instant::now();
    let mut byte = [0u8; 64];
    loop {
        if beat.write_all(&[1]).is_err() {
            return;
        }
        // Listen until the next beat is due (the peer's beats arrive about as often).
        let sent = Instant::now();
        while let Some(left) = EVERY.checked_sub(sent.elapsed()).filter(|l| !l.is_zero()) {
            if beat.set_read_timeout(Some(left)).is_err() {
                return;
            }
            match beat.read(&mut byte) {
                Ok(0) => return,
                Ok(_) => heard = Instant::now(),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return,
            }
        }
        if heard.elapsed() > patience {
            *hung.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!(
                "rank {peer} stopped answering: no heartbeat for {:.0} s (its process is hung \
                 or stopped, or its host is gone; INCEPT_DIST_HEARTBEAT sets the wait)",
                patience.as_secs_f64()
            ));
            let _ = main.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// What a failed exchange with rank `peer` during `what` means for the user (a heartbeat that
/// gave up on a peer says why first).
fn peer_error(
    hung: &Mutex<Option<String>>, e: std::io::Error, peer: usize, what: &str,
) -> anyhow::Error {
    if let Some(why) = hung.lock().unwrap_or_else(|p| p.into_inner()).clone() {
        return anyhow!("{why}; stopping this rank during {what}");
    }
    match e.kind() {
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => anyhow!(
            "rank {peer} left the job during {what} (it exited or was killed); stopping this \
             rank too"
        ),
        ErrorKind::WouldBlock | ErrorKind::TimedOut => anyhow!(
            "rank {peer} did not answer during {what} within the timeout (INCEPT_DIST_TIMEOUT); \
             it may be hung; stopping this rank"
        ),
        _ => anyhow!("talking to rank {peer} during {what}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn config(batch: &str) -> Config {
        vec![("model".into(), "inception-small".into()), ("--batch-size".into(), batch.into())]
    }

    /// Runs `f` on `world` ranks (threads) that met on a fresh port with the configurations
    /// `configs(rank)`; returns each rank's result in rank order.
    fn ranks<T: Send + 'static>(
        world: usize, configs: impl Fn(usize) -> Config,
        f: impl Fn(Result<TcpGroup>) -> T + Send + Sync + Copy + 'static,
    ) -> Vec<T> {
        let port = free_port();
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let c = configs(r);
                thread::spawn(move || {
                    f(TcpGroup::join(&Place::local(r, world, port), &c, Duration::from_secs(20)))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_sums_in_rank_order_and_every_rank_gets_the_same_bits() {
        for world in [2, 3] {
            let got = ranks(
                world,
                |_| config("64"),
                |g| {
                    let mut g = g.unwrap();
                    let r = g.rank() as f32;
                    // Values whose sum depends on the order: (1 + 1e8) − 1e8 = 0 in f32, 1 otherwise.
                    let mut v = vec![[1.0f32, 1e8, -1e8][g.rank()], r, 0.5 * r];
                    g.all_reduce_sum(&mut v).unwrap();
                    let mut m = vec![r as f64 * 0.25, 1.0];
                    g.all_reduce_sum_f64(&mut m).unwrap();
                    let mut b = vec![r + 7.0; 2];
                    g.broadcast(&mut b).unwrap();
                    (v, m, b)
                },
            );
            let order: f32 = (0..world).map(|r| [1.0f32, 1e8, -1e8][r]).fold(0.0, |a, x| a + x);
            let tri = (world * (world - 1) / 2) as f32;
            for (v, m, b) in &got {
                assert_eq!(v, &vec![order, tri, 0.5 * tri], "world {world}");
                assert_eq!(m, &vec![0.25 * tri as f64, world as f64]);
                assert_eq!(b, &vec![7.0; 2], "rank 0's values");
            }
        }
    }

    #[test]
    fn a_different_setting_is_an_error_on_every_rank_naming_it() {
        let errs = ranks(
            3,
            |r| config(if r == 2 { "128" } else { "64" }),
            |g| format!("{:#}", g.err().expect("the meeting must fail")),
        );
        for (r, e) in errs.iter().enumerate() {
            assert!(e.contains("--batch-size is 128 on rank 2 but 64 on rank 0"), "rank {r}: {e}");
        }
    }

    #[test]
    fn a_rank_that_leaves_stops_the_others_promptly_naming_it() {
        let started = Instant::now();
        let errs = ranks(
            3,
            |_| config("64"),
            |g| {
                let mut g = g.unwrap();
                if g.rank() == 1 {
                    return String::new(); // leaves: its connection closes
                }
                let mut v = vec![1.0f32; 4];
                // Rank 0 notices rank 1 is gone; rank 2 then loses rank 0.
                format!("{:#}", g.all_reduce_sum(&mut v).unwrap_err())
            },
        );
        assert!(errs[0].contains("rank 1 left the job"), "{}", errs[0]);
        assert!(errs[2].contains("rank 0 left the job"), "{}", errs[2]);
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    }

    #[test]
    fn a_rank_of_another_world_size_is_refused() {
        let port = free_port();
        let host = thread::spawn(move || {
            TcpGroup::join(&Place::local(0, 2, port), &config("64"), Duration::from_secs(20)).err()
        });
        let other =
            TcpGroup::join(&Place::local(1, 3, port), &config("64"), Duration::from_secs(20)).err();
        let host = format!("{:#}", host.join().unwrap().expect("rank 0 must refuse"));
        assert!(host.contains("world size of 3, rank 0 with 2"), "{host}");
        assert!(format!("{:#}", other.expect("rank 1 must fail")).contains("world size"));
    }
}
