//! The kernel fast path of the call relay ("two gears", docs/ARCHITECTURE.md): a tc eBPF
//! program (`bpf/rtp_fwd.bpf.c`, compiled by build.rs) that forwards the RTP of latched legs
//! inside the kernel, and the user-space half that loads it and fills its map.
//!
//! # Contract
//!
//! - **Start** ([`KernelPath::start`], with `[media] kernel_forwarding = true`): load the
//!   program, remove a previous run's leftovers by the program's own name (`cv_rtp_fwd`: legacy
//!   tc filters survive their process), attach it to the ingress of loopback and of the
//!   interface holding the media address. On kernels ≥ 6.6 the attachment is a TCX link owned
//!   by a file descriptor and never pinned, so the kernel detaches it when the process ends,
//!   however it ends (kill -9 included); on older kernels it is a netlink filter, removed by
//!   [`KernelPath::shutdown`] / `Drop` and, after a crash, by the next start. Any failure
//!   (no CAP_BPF/CAP_NET_ADMIN, no clang at build time, verifier refusal) is returned and the
//!   caller runs the user-space relay unchanged.
//! - **Per leg** ([`KernelLegs`], owned by one relay task, no lock): an entry keyed by the
//!   relay's own (address, RTP port) a party sends to says which source is taken (the latched
//!   party), the new source (the relay's port facing the other party) and destination (the
//!   other party), and how it leaves. The relay installs it once the sending side is latched,
//!   the other side's target is known, and the direction needs no per-packet work in user
//!   space (no SRTP context, no inspector; a recorded direction only when its log has a ring
//!   id, see below); it replaces it atomically when the
//!   signalling changes a target (re-INVITE), and removes it when latching re-opens or the
//!   relay stops. Everything the program does not forward — first packets (latching), other
//!   sources, RTCP, telephone-events of the leg's DTMF types (the feature-code gate), IPv6 with
//!   extension headers, fragments — reaches the relay's socket as before.
//! - **Recording** ([`ring`]): an entry with a `rec_id` also has each forwarded datagram's RTP
//!   bytes, arrival time and id copied into the `rec_ring` ring buffer; the recordings' log
//!   writer thread, the ring's one consumer ([`KernelPath::take_ring`]), appends them to the
//!   log of that id. A copy the ring has no room for is counted per leg (`rec_drops`).
//! - **Counters**: packets and UDP payload bytes per leg in the `counters` array, slot = the
//!   relay's local port facing the sender. The relay reads them in batches (its poll timer,
//!   the RTP-timeout check, and at stop), adds the deltas to its own counters (so
//!   `callvault_rtp_packets_relayed_total` covers both gears) and to
//!   `callvault_rtp_packets_kernel_total`, and counts a grown counter as activity for the RTP
//!   timeout.
//!
//! Local destinations (loopback, or an address of this host) are sent with `bpf_redirect` to
//! the egress of `lo`: the datagram loops back and is delivered to the party's socket, and
//! captures on `lo` see it as they see the user-space relay's. Other destinations use
//! `bpf_redirect_neigh` on the interface whose subnet holds them (else the media address's).

mod ifaces;
mod maps;
pub(crate) mod ring;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};

use aya::maps::{Map, MapData, RingBuf};
use aya::programs::tc::{self, SchedClassifierLinkId, TcAttachType};
use aya::programs::SchedClassifier;
use aya::Ebpf;
use thiserror::Error;

use crate::metrics::METRICS;
use ifaces::IfAddr;
pub(crate) use maps::Counter;
use maps::{FwdKey, FwdVal, Mode, Route};
use ring::KernelRing;

/// The program's name in the object (and in `tc filter show`, `bpftool prog`).
const PROG: &str = "cv_rtp_fwd";

/// The object build.rs compiled (empty when clang was missing).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rtp_fwd.bpf.o"));

#[derive(Debug, Error)]
pub enum KernelError {
    #[error("not built: clang was missing when callvault was compiled")]
    NotBuilt,
    #[error("cannot load the tc program: {0}")]
    Load(String),
    #[error("cannot attach to {iface}: {reason}")]
    Attach { iface: String, reason: String },
    #[error("cannot list interfaces: {0}")]
    Interfaces(#[source] io::Error),
    #[error("no interface holds the media address {0}")]
    NoInterface(IpAddr),
    #[error("map {0} missing from the program")]
    MissingMap(&'static str),
}

/// What is attached, kept to detach it.
struct Attached {
    ebpf: Ebpf,
    links: Vec<SchedClassifierLinkId>,
}

/// The loaded program, its maps and its attachments; shared by the relays behind an `Arc`.
pub(crate) struct KernelPath {
    fwd: MapData,
    counters: MapData,
    /// The recording ring, until the log writer thread takes it ([`KernelPath::take_ring`]).
    ring: Mutex<Option<KernelRing>>,
    addrs: Vec<IfAddr>,
    lo_index: u32,
    /// Interfaces attached to, for the log.
    interfaces: Vec<String>,
    attached: Mutex<Option<Attached>>,
    /// How datagrams to this host's addresses leave: [`Mode::Redirect`] (module doc); only
    /// tests change it. Read when an entry is made, never per packet.
    #[cfg(test)]
    local_mode: Mutex<Mode>,
}

impl std::fmt::Debug for KernelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelPath")
            .field("interfaces", &self.interfaces)
            .finish()
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<MapData, KernelError> {
    match ebpf.take_map(name) {
        Some(Map::HashMap(d) | Map::Array(d)) => Ok(d),
        _ => Err(KernelError::MissingMap(name)),
    }
}

impl KernelPath {
    /// Loads and attaches the program for RTP ports bound on `media_ip` (module doc).
    pub(crate) fn start(media_ip: IpAddr) -> Result<Arc<KernelPath>, KernelError> {
        if OBJECT.is_empty() {
            return Err(KernelError::NotBuilt);
        }
        let addrs = ifaces::list().map_err(KernelError::Interfaces)?;
        let lo_index = addrs
            .iter()
            .find(|a| a.loopback)
            .map(|a| a.index)
            .ok_or(KernelError::NoInterface(media_ip))?;
        let mut interfaces: Vec<String> = addrs
            .iter()
            .filter(|a| a.loopback || a.addr == media_ip || media_ip.is_unspecified())
            .map(|a| a.name.clone())
            .collect();
        interfaces.sort();
        interfaces.dedup();
        let load = |e: &dyn std::fmt::Display| KernelError::Load(e.to_string());
        let mut ebpf = Ebpf::load(OBJECT).map_err(|e| load(&e))?;
        let fwd = take_map(&mut ebpf, "fwd")?;
        let counters = take_map(&mut ebpf, "counters")?;
        let ring = match ebpf.take_map("rec_ring") {
            Some(m @ Map::RingBuf(_)) => RingBuf::try_from(m).map_err(|e| load(&e))?,
            _ => return Err(KernelError::MissingMap("rec_ring")),
        };
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROG)
            .ok_or_else(|| KernelError::Load(format!("no program {PROG} in the object")))?
            .try_into()
            .map_err(|e| load(&e))?;
        prog.load().map_err(|e| load(&e))?;
        let mut links = Vec::new();
        for iface in &interfaces {
            // A previous run's netlink filter (older kernels, or a crash there) by our name;
            // none is the normal case.
            let _ = tc::qdisc_detach_program(iface, TcAttachType::Ingress, PROG);
            let link = match prog.attach(iface, TcAttachType::Ingress) {
                Ok(l) => l,
                // Netlink attachment (kernels before TCX) needs the clsact qdisc first.
                Err(_) => {
                    let _ = tc::qdisc_add_clsact(iface);
                    prog.attach(iface, TcAttachType::Ingress)
                        .map_err(|e| KernelError::Attach {
                            iface: iface.clone(),
                            reason: e.to_string(),
                        })?
                }
            };
            links.push(link);
        }
        METRICS.media_path_kernel.set(1);
        Ok(Arc::new(KernelPath {
            fwd,
            counters,
            ring: Mutex::new(Some(KernelRing::new(ring))),
            addrs,
            lo_index,
            interfaces,
            attached: Mutex::new(Some(Attached { ebpf, links })),
            #[cfg(test)]
            local_mode: Mutex::new(Mode::Redirect),
        }))
    }

    /// The recording ring, to its one consumer (the recordings' log writer thread); None
    /// once taken.
    pub(crate) fn take_ring(&self) -> Option<KernelRing> {
        self.ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// The interfaces the program is attached to.
    pub(crate) fn interfaces(&self) -> &[String] {
        &self.interfaces
    }

    /// Detaches the program from every interface (idempotent). Entries still in the map then
    /// forward nothing; relays keep relaying in user space.
    pub(crate) fn shutdown(&self) {
        let taken = self
            .attached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(Attached { mut ebpf, links }) = taken {
            if let Some(Ok(prog)) = ebpf.program_mut(PROG).map(<&mut SchedClassifier>::try_from) {
                for link in links {
                    if let Err(e) = prog.detach(link) {
                        tracing::warn!(error = %e, "detaching the kernel fast path");
                    }
                }
            }
            METRICS.media_path_kernel.set(0);
            tracing::info!("kernel fast path detached");
        }
    }

    fn fwd_fd(&self) -> RawFd {
        self.fwd.fd().as_fd().as_raw_fd()
    }

    fn counters_fd(&self) -> RawFd {
        self.counters.fd().as_fd().as_raw_fd()
    }

    /// How a datagram to `dst` leaves: loopback egress for this host's addresses, else the
    /// neighbour redirect on the interface whose subnet holds `dst` (longest prefix), else on
    /// the interface of `out` (the relay's address).
    fn egress(&self, out: IpAddr, dst: IpAddr) -> Option<(Mode, u32)> {
        if dst.is_loopback() || self.addrs.iter().any(|a| a.addr == dst) {
            #[cfg(test)]
            let mode = *self
                .local_mode
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            #[cfg(not(test))]
            let mode = Mode::Redirect;
            return Some((mode, self.lo_index));
        }
        self.addrs
            .iter()
            .filter(|a| !a.loopback && ifaces::in_subnet(dst, a.addr, a.prefix))
            .max_by_key(|a| a.prefix)
            .or_else(|| self.addrs.iter().find(|a| !a.loopback && a.addr == out))
            .map(|a| (Mode::Neigh, a.index))
    }
}

impl Drop for KernelPath {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The kernel entries of one relay (module doc), indexed by the side packets come from.
pub(crate) struct KernelLegs {
    path: Arc<KernelPath>,
    /// The relay's RTP sockets facing A and B.
    local: [SocketAddr; 2],
    installed: [Option<FwdVal>; 2],
    /// Counter values already accounted for.
    seen: [Counter; 2],
}

/// What one direction needs to be forwarded in the kernel (None: stay in user space).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Want {
    /// The latched source of the sending side.
    pub peer: SocketAddr,
    /// The other side's target.
    pub dst: SocketAddr,
    /// Telephone-event types left to the feature-code gate.
    pub punt_pt: [Option<u8>; 2],
    /// The direction's log at the writer thread when it is recorded ([`ring`]); 0: not.
    pub rec_id: u32,
}

impl KernelLegs {
    pub(crate) fn new(path: Arc<KernelPath>, local: [SocketAddr; 2]) -> KernelLegs {
        let mut legs = KernelLegs {
            path,
            local,
            installed: [None, None],
            seen: [Counter::default(); 2],
        };
        // A port's slot keeps the counts of earlier calls on it: start from what is there.
        for i in 0..2 {
            legs.seen[i] = legs.read(i).unwrap_or_default();
        }
        legs
    }

    fn read(&self, from: usize) -> io::Result<Counter> {
        maps::counter(self.path.counters_fd(), self.local[from].port())
    }

    /// True while an entry is installed (the relay then polls the counters).
    pub(crate) fn active(&self) -> bool {
        self.installed.iter().any(Option::is_some)
    }

    /// The log id the kernel records packets from side `from` into (0: none).
    pub(crate) fn recording_into(&self, from: usize) -> u32 {
        self.installed[from].map_or(0, |v| v.rec_id())
    }

    /// Brings the entry of packets from side `from` (0 = A) to `want`: installed, replaced
    /// in one update, or removed. A refused update leaves the direction in user space.
    pub(crate) fn set(&mut self, from: usize, want: Option<Want>) {
        let out = self.local[1 - from];
        let val = want.and_then(|w| {
            let (mode, ifindex) = self.path.egress(out.ip(), w.dst.ip())?;
            FwdVal::new(&Route {
                peer: w.peer,
                out,
                dst: w.dst,
                mode,
                ifindex,
                slot: self.local[from].port(),
                punt_pt: w.punt_pt,
                rec_id: w.rec_id,
            })
        });
        if val == self.installed[from] {
            return;
        }
        let key = FwdKey::new(self.local[from]);
        let fd = self.path.fwd_fd();
        let res = match &val {
            Some(v) => maps::fwd_update(fd, &key, v),
            None => maps::fwd_delete(fd, &key),
        };
        match res {
            Ok(()) => self.installed[from] = val,
            Err(e) => {
                tracing::warn!(error = %e, port = self.local[from].port(), "kernel map update");
                // Not knowing what is in the map, take the entry out.
                if maps::fwd_delete(fd, &key).is_ok() {
                    self.installed[from] = None;
                }
            }
        }
    }

    /// Packets and bytes the kernel forwarded from each side since the last call.
    pub(crate) fn poll(&mut self) -> [Counter; 2] {
        let mut delta = [Counter::default(); 2];
        for (i, d) in delta.iter_mut().enumerate() {
            if let Ok(now) = self.read(i) {
                d.packets = now.packets.wrapping_sub(self.seen[i].packets);
                d.bytes = now.bytes.wrapping_sub(self.seen[i].bytes);
                d.rec_drops = now.rec_drops.wrapping_sub(self.seen[i].rec_drops);
                self.seen[i] = now;
            }
        }
        delta
    }

    /// Removes both entries (the relay stops); read [`poll`](Self::poll) after it.
    pub(crate) fn clear(&mut self) {
        self.set(0, None);
        self.set(1, None);
    }
}

impl Drop for KernelLegs {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
impl KernelPath {
    /// How datagrams to this host's addresses leave (tests compare the modes on `lo`).
    fn set_local_mode(&self, mode: Mode) {
        *self
            .local_mode
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = mode;
    }
}

#[cfg(test)]
pub(crate) mod testns;

#[cfg(test)]
mod tests;
