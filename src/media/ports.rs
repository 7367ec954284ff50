//! RTP/RTCP port pairs from the configured range (`media.rtp_ports`), bound as tokio sockets.
//!
//! Pairs are an even RTP port and the next odd one for RTCP (RFC 3550 11). Each allocation
//! takes a pair at random among the free ones (issue 10: ports handed out in sequence let an
//! attacker guess the next call's port and race its first packet), which also makes the reuse
//! of a just-released pair unlikely while the range is far from full, keeping stray packets of
//! an ended call away from the next one. The lock is taken per allocation/release, never per
//! packet.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use thiserror::Error;
use tokio::net::UdpSocket;

#[derive(Debug, Error)]
pub enum PortsError {
    #[error("RTP port range {lo}-{hi} holds no even/odd port pair")]
    BadRange { lo: u16, hi: u16 },
    #[error("no free RTP port pair")]
    PortsExhausted,
    #[error("no tokio runtime to register RTP sockets with")]
    NoRuntime,
    #[error("cannot bind RTP socket on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

struct Inner {
    /// Free RTP ports, in no particular order (taken at a random index).
    free: Mutex<Vec<u16>>,
    pairs_in_use: AtomicUsize,
    capacity: usize,
}

impl Inner {
    fn release(&self, rtp_port: u16) {
        // A poisoned lock only means another thread panicked mid-push/pop; the deque is intact.
        self.free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(rtp_port);
        self.pairs_in_use.fetch_sub(1, Ordering::Relaxed);
        // Published here, when the sockets are really closed, not when the core last looked.
        crate::metrics::METRICS.rtp_ports_in_use.add(-2);
    }
}

/// Hands out [`PortPair`]s; cheap to clone (shared state).
#[derive(Clone)]
pub struct PortAllocator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PortAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortAllocator")
            .field("capacity", &self.inner.capacity)
            .field("pairs_in_use", &self.pairs_in_use())
            .finish()
    }
}

impl PortAllocator {
    /// Pairs `(p, p+1)` with `p` even and `lo <= p`, `p + 1 <= hi`. Port 0 is never used.
    pub fn new(lo: u16, hi: u16) -> Result<Self, PortsError> {
        // u32 so that rounding 65535 up does not overflow.
        let start = (u32::from(lo.max(2)) + 1) & !1;
        let free: Vec<u16> = (start..u32::from(hi))
            .step_by(2)
            .filter_map(|p| u16::try_from(p).ok())
            .collect();
        if free.is_empty() {
            return Err(PortsError::BadRange { lo, hi });
        }
        let capacity = free.len();
        Ok(PortAllocator {
            inner: Arc::new(Inner {
                free: Mutex::new(free),
                pairs_in_use: AtomicUsize::new(0),
                capacity,
            }),
        })
    }

    /// Binds a free pair, chosen at random, on `ip`. Ports some other process holds are
    /// skipped (and kept in the pool for later); other bind errors (e.g. `ip` is not a local
    /// address) are returned at once. Must be called inside a tokio runtime.
    pub fn allocate(&self, ip: IpAddr) -> Result<PortPair, PortsError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(PortsError::NoRuntime);
        }
        // Pairs found taken by others, returned to the pool at the end so that this call
        // tries each pair at most once.
        let mut taken = Vec::new();
        let result = loop {
            let Some(port) = self.take_random() else {
                break Err(PortsError::PortsExhausted);
            };
            // Bind outside the lock: syscalls, and other calls may allocate meanwhile.
            match bind_pair(ip, port) {
                Ok((rtp, rtcp)) => {
                    self.inner.pairs_in_use.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::METRICS.rtp_ports_in_use.add(2);
                    break Ok(PortPair {
                        rtp,
                        rtcp,
                        rtp_port: port,
                        _lease: Lease {
                            inner: Arc::clone(&self.inner),
                            port,
                        },
                    });
                }
                Err(e) if is_port_taken(&e) => taken.push(port),
                Err(e) => {
                    taken.push(port);
                    break Err(PortsError::Bind {
                        addr: SocketAddr::new(ip, port),
                        source: e,
                    });
                }
            }
        };
        if !taken.is_empty() {
            self.lock().extend(taken);
        }
        result
    }

    /// Removes a random free port from the pool.
    fn take_random(&self) -> Option<u16> {
        let mut free = self.lock();
        if free.is_empty() {
            return None;
        }
        let i = rand::Rng::gen_range(&mut rand::thread_rng(), 0..free.len());
        Some(free.swap_remove(i))
    }

    /// [`allocate`](Self::allocate) with the sockets registered with the runtime `rt` (e.g.
    /// a media thread), which must then be the one that drives them.
    pub fn allocate_on(
        &self,
        ip: IpAddr,
        rt: &tokio::runtime::Handle,
    ) -> Result<PortPair, PortsError> {
        let _in_rt = rt.enter();
        self.allocate(ip)
    }

    /// Ports (RTP and RTCP counted separately) currently handed out: the
    /// `callvault_rtp_ports_in_use` gauge.
    pub fn ports_in_use(&self) -> usize {
        self.pairs_in_use() * 2
    }

    pub fn pairs_in_use(&self) -> usize {
        self.inner.pairs_in_use.load(Ordering::Relaxed)
    }

    /// Number of pairs in the range.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u16>> {
        self.inner
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

fn is_port_taken(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::AddrInUse | io::ErrorKind::PermissionDenied
    )
}

fn bind_pair(ip: IpAddr, port: u16) -> io::Result<(UdpSocket, UdpSocket)> {
    let rtp = bind_one(SocketAddr::new(ip, port))?;
    let rtcp = bind_one(SocketAddr::new(ip, port + 1))?;
    Ok((rtp, rtcp))
}

fn bind_one(addr: SocketAddr) -> io::Result<UdpSocket> {
    // std bind is synchronous, so allocation needs no `.await`; tokio takes it over after.
    let s = std::net::UdpSocket::bind(addr)?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s)
}

/// Returns the pair to the pool when the [`PortPair`] is dropped.
struct Lease {
    inner: Arc<Inner>,
    port: u16,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.inner.release(self.port);
    }
}

/// A bound RTP/RTCP socket pair. Dropping it closes both sockets and frees the ports.
pub struct PortPair {
    pub rtp: UdpSocket,
    pub rtcp: UdpSocket,
    pub rtp_port: u16,
    // Declared last: fields drop in order, so the sockets are closed before the port returns
    // to the pool and can be bound again.
    _lease: Lease,
}

impl PortPair {
    pub fn rtcp_port(&self) -> u16 {
        self.rtp_port + 1
    }
}

impl std::fmt::Debug for PortPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortPair")
            .field("rtp_port", &self.rtp_port)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    /// A range of `pairs` pairs that is free right now (ephemeral ports are random, so probe).
    /// `start` keeps tests running in parallel on different ranges.
    fn free_range(start: u16, pairs: u16) -> (u16, u16) {
        'outer: for base in (start..start + 2000).step_by(200) {
            for p in base..base + pairs * 2 {
                if std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, p)).is_err() {
                    continue 'outer;
                }
            }
            return (base, base + pairs * 2 - 1);
        }
        panic!("no free port range");
    }

    #[test]
    fn range_arithmetic() {
        assert_eq!(PortAllocator::new(20000, 20003).unwrap().capacity(), 2);
        assert_eq!(PortAllocator::new(20001, 20004).unwrap().capacity(), 1);
        assert_eq!(PortAllocator::new(0, 3).unwrap().capacity(), 1); // skips 0
        assert_eq!(PortAllocator::new(65534, 65535).unwrap().capacity(), 1);
        assert!(PortAllocator::new(65535, 65535).is_err());
        assert!(matches!(
            PortAllocator::new(20000, 20000),
            Err(PortsError::BadRange { .. })
        ));
        assert!(matches!(
            PortAllocator::new(20001, 20002),
            Err(PortsError::BadRange { .. })
        ));
        assert!(matches!(
            PortAllocator::new(30000, 20000),
            Err(PortsError::BadRange { .. })
        ));
    }

    #[test]
    fn needs_a_runtime() {
        let a = PortAllocator::new(40000, 40001).unwrap();
        assert!(matches!(a.allocate(LO), Err(PortsError::NoRuntime)));
    }

    #[tokio::test]
    async fn allocates_pairs_until_exhausted_and_releases_on_drop() {
        let (lo, hi) = free_range(50000, 2);
        let a = PortAllocator::new(lo, hi).unwrap();
        assert_eq!(a.capacity(), 2);
        let p1 = a.allocate(LO).unwrap();
        let p2 = a.allocate(LO).unwrap();
        assert_eq!(a.pairs_in_use(), 2);
        assert_eq!(a.ports_in_use(), 4);
        for p in [&p1, &p2] {
            assert_eq!(p.rtp_port % 2, 0);
            assert_eq!(p.rtp.local_addr().unwrap().port(), p.rtp_port);
            assert_eq!(p.rtcp.local_addr().unwrap().port(), p.rtp_port + 1);
            assert_eq!(p.rtcp_port(), p.rtp_port + 1);
        }
        assert_ne!(p1.rtp_port, p2.rtp_port);
        assert!(matches!(a.allocate(LO), Err(PortsError::PortsExhausted)));

        let freed = p1.rtp_port;
        drop(p1);
        assert_eq!(a.pairs_in_use(), 1);
        // the freed port is really closed and comes back
        let p3 = a.allocate(LO).unwrap();
        assert_eq!(p3.rtp_port, freed);
        drop((p2, p3));
        assert_eq!(a.ports_in_use(), 0);
    }

    #[tokio::test]
    async fn skips_ports_bound_by_others() {
        let (lo, hi) = free_range(52000, 3);
        let a = PortAllocator::new(lo, hi).unwrap();
        // someone else holds the first pair's RTCP port and the second pair's RTP port
        let _squat1 = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, lo + 1)).unwrap();
        let _squat2 = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, lo + 2)).unwrap();
        let p = a.allocate(LO).unwrap();
        assert_eq!(p.rtp_port, lo + 4);
        assert!(matches!(a.allocate(LO), Err(PortsError::PortsExhausted)));
        assert_eq!(a.pairs_in_use(), 1);
        // once the squatter leaves, its pair is usable again
        drop(_squat1);
        assert_eq!(a.allocate(LO).unwrap().rtp_port, lo);
    }

    #[tokio::test]
    async fn pairs_are_handed_out_at_random_not_in_sequence() {
        let (lo, hi) = free_range(54000, 200);
        let a = PortAllocator::new(lo, hi).unwrap();
        let pairs: Vec<PortPair> = (0..20).map(|_| a.allocate(LO).unwrap()).collect();
        let ports: Vec<u16> = pairs.iter().map(|p| p.rtp_port).collect();
        // In sequence, each port would be the previous + 2 (or its mirror image).
        let steps = ports
            .windows(2)
            .filter(|w| w[1].abs_diff(w[0]) == 2)
            .count();
        assert!(steps < 5, "too sequential: {ports:?}");
        // Spread over the range, not packed at its start.
        assert!(ports.iter().any(|&p| p >= lo + 200), "{ports:?}");
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 20);
    }

    #[tokio::test]
    async fn non_local_address_is_a_bind_error_not_exhaustion() {
        let a = PortAllocator::new(40000, 40003).unwrap();
        // TEST-NET-1 is never a local address
        let err = a.allocate("192.0.2.1".parse().unwrap()).unwrap_err();
        assert!(matches!(err, PortsError::Bind { .. }), "{err}");
        assert_eq!(a.pairs_in_use(), 0);
    }
}
