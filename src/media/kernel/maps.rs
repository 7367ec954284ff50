//! The layout of the program's maps (`bpf/rtp_fwd.bpf.c`, which must agree field for field)
//! and the three map syscalls the packet path's neighbours need: update, delete, lookup.
//!
//! The maps are reached by their file descriptors with the raw `bpf(2)` syscall rather than
//! through aya's typed maps, whose writes take `&mut self`: a relay on any media thread updates
//! its own entries without a lock (the kernel serialises updates per hash bucket; a lookup sees
//! the old or the new value, never a mix). Nothing here allocates.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;

/// How a matching datagram leaves (`MODE_*` in the C source).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Mode {
    /// Rewritten, then up this host's stack (destination is a local address). Works on `lo`
    /// but the forwarded datagram is invisible to captures there; tests compare it.
    #[cfg_attr(not(test), allow(dead_code))]
    Pass = 0,
    /// `bpf_redirect` to the egress of `ifindex`.
    Redirect = 1,
    // 2 is MODE_REDIRECT_INGRESS in the C source: lost on `lo` (tests), so never asked for.
    /// `bpf_redirect_neigh`: egress of `ifindex`, L2 addresses from the neighbour table.
    Neigh = 3,
}

/// `struct fwd_key`: the relay's own address and port a party sends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub(crate) struct FwdKey {
    addr: [u8; 16],
    /// Network byte order.
    port: u16,
    family: u8,
    pad: u8,
}

/// `struct fwd_val`: which source is taken and how its datagrams are rewritten and sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub(crate) struct FwdVal {
    peer: [u8; 16],
    new_src: [u8; 16],
    new_dst: [u8; 16],
    peer_port: u16,
    new_sport: u16,
    new_dport: u16,
    mode: u8,
    flags: u8,
    /// Telephone-event payload types left to user space (0xff: none).
    punt_pt: [u8; 2],
    pad: [u8; 2],
    ifindex: u32,
    slot: u32,
    /// The direction's log at the writer thread ([`super::ring`]); 0: not recorded.
    rec_id: u32,
}

/// `struct counter`, one per slot (the relay's local port facing the sender).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub(crate) struct Counter {
    pub packets: u64,
    /// UDP payload bytes, as the user-space relay counts them.
    pub bytes: u64,
    /// Forwarded but not recorded (ring full, or a datagram too big to copy).
    pub rec_drops: u64,
}

const _: () = assert!(std::mem::size_of::<FwdKey>() == 20);
const _: () = assert!(std::mem::size_of::<FwdVal>() == 72);
const _: () = assert!(std::mem::size_of::<Counter>() == 24);

fn addr_bytes(ip: IpAddr) -> ([u8; 16], u8) {
    let mut b = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            b[..4].copy_from_slice(&v4.octets());
            (b, 4)
        }
        IpAddr::V6(v6) => (v6.octets(), 6),
    }
}

impl FwdKey {
    pub(crate) fn new(local: SocketAddr) -> FwdKey {
        let (addr, family) = addr_bytes(local.ip());
        FwdKey {
            addr,
            port: local.port().to_be(),
            family,
            pad: 0,
        }
    }
}

/// What one direction of a relay needs forwarded in the kernel.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Route {
    /// The only source taken (the latched party).
    pub peer: SocketAddr,
    /// The relay's socket facing the other party (new source).
    pub out: SocketAddr,
    /// The other party (new destination).
    pub dst: SocketAddr,
    pub mode: Mode,
    pub ifindex: u32,
    pub slot: u16,
    pub punt_pt: [Option<u8>; 2],
    /// Also copy each forwarded datagram into the ring for this log (0: not recorded).
    pub rec_id: u32,
}

impl FwdVal {
    pub(crate) fn rec_id(&self) -> u32 {
        self.rec_id
    }

    /// None when the addresses mix families (the program rewrites in place, never translates).
    pub(crate) fn new(r: &Route) -> Option<FwdVal> {
        let (peer, f1) = addr_bytes(r.peer.ip());
        let (new_src, f2) = addr_bytes(r.out.ip());
        let (new_dst, f3) = addr_bytes(r.dst.ip());
        if f1 != f2 || f2 != f3 {
            return None;
        }
        Some(FwdVal {
            peer,
            new_src,
            new_dst,
            peer_port: r.peer.port().to_be(),
            new_sport: r.out.port().to_be(),
            new_dport: r.dst.port().to_be(),
            mode: r.mode as u8,
            flags: 0,
            punt_pt: r.punt_pt.map(|p| p.unwrap_or(0xff)),
            pad: [0; 2],
            ifindex: r.ifindex,
            slot: u32::from(r.slot),
            rec_id: r.rec_id,
        })
    }
}

/// The `bpf_attr` of the `BPF_MAP_*_ELEM` commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

fn elem_op(cmd: libc::c_long, fd: RawFd, key: *const u8, value: u64) -> io::Result<()> {
    let attr = ElemAttr {
        map_fd: fd as u32,
        pad: 0,
        key: key as u64,
        value,
        flags: 0, // BPF_ANY
    };
    // SAFETY: `attr` points at a key and (for lookup/update) a value of the sizes the map was
    // created with (the FwdKey/FwdVal/Counter layouts, asserted above); the kernel reads or
    // writes only those bytes during the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &attr as *const ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Inserts or atomically replaces the entry of `key` in the `fwd` map `fd`.
pub(crate) fn fwd_update(fd: RawFd, key: &FwdKey, val: &FwdVal) -> io::Result<()> {
    let v = val as *const FwdVal as u64;
    elem_op(
        BPF_MAP_UPDATE_ELEM,
        fd,
        key as *const FwdKey as *const u8,
        v,
    )
}

/// Removes the entry of `key` (absent: not an error).
pub(crate) fn fwd_delete(fd: RawFd, key: &FwdKey) -> io::Result<()> {
    match elem_op(
        BPF_MAP_DELETE_ELEM,
        fd,
        key as *const FwdKey as *const u8,
        0,
    ) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}

/// Reads slot `slot` of the `counters` array `fd`.
pub(crate) fn counter(fd: RawFd, slot: u16) -> io::Result<Counter> {
    let key = u32::from(slot);
    let mut c = Counter::default();
    let v = &mut c as *mut Counter as u64;
    elem_op(BPF_MAP_LOOKUP_ELEM, fd, &key as *const u32 as *const u8, v)?;
    Ok(c)
}
