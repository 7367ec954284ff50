//! This host's interfaces as the kernel path needs them: which to attach to, and by which
//! interface a relayed datagram leaves. Read once at start (`getifaddrs`).

use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One address of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IfAddr {
    pub name: String,
    pub index: u32,
    pub addr: IpAddr,
    pub prefix: u8,
    pub loopback: bool,
}

/// Every address of every interface that is up.
pub(crate) fn list() -> io::Result<Vec<IfAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_flags & libc::IFF_UP as u32 == 0 || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: the name and the two sockaddrs belong to the node (checked non-null).
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) };
        let (Some(addr), Some(mask)) = (unsafe { sockaddr_ip(ifa.ifa_addr) }, unsafe {
            sockaddr_ip(ifa.ifa_netmask)
        }) else {
            continue;
        };
        // SAFETY: a valid NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(ifa.ifa_name) };
        if index == 0 {
            continue;
        }
        out.push(IfAddr {
            name: name.to_string_lossy().into_owned(),
            index,
            addr,
            prefix: prefix_len(mask),
            loopback: ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0,
        });
    }
    // SAFETY: the list from getifaddrs above, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The IP address of a `sockaddr_in`/`sockaddr_in6`, None for other families or null.
///
/// # Safety
/// `sa` is null or points at a sockaddr of the size its family implies.
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    match i32::from((*sa).sa_family) {
        libc::AF_INET => {
            let s = &*(sa as *const libc::sockaddr_in);
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr))))
        }
        libc::AF_INET6 => {
            let s = &*(sa as *const libc::sockaddr_in6);
            Some(IpAddr::V6(Ipv6Addr::from(s.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

fn prefix_len(mask: IpAddr) -> u8 {
    match mask {
        IpAddr::V4(m) => u32::from(m).leading_ones() as u8,
        IpAddr::V6(m) => u128::from(m).leading_ones() as u8,
    }
}

/// Whether `ip` lies in `net`/`prefix`.
pub(crate) fn in_subnet(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let m = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            u32::from(a) & m == u32::from(n) & m
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let m = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            u128::from(a) & m == u128::from(n) & m
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_listed_and_subnets_match() {
        let all = list().unwrap();
        assert!(all
            .iter()
            .any(|i| i.loopback && i.addr == IpAddr::V4(Ipv4Addr::LOCALHOST)));
        let lo: IpAddr = "127.0.0.0".parse().unwrap();
        assert!(in_subnet("127.3.4.5".parse().unwrap(), lo, 8));
        assert!(!in_subnet("10.0.0.1".parse().unwrap(), lo, 8));
        assert!(in_subnet("10.0.0.1".parse().unwrap(), lo, 0));
        let v6: IpAddr = "fd00::".parse().unwrap();
        assert!(in_subnet("fd00::5".parse().unwrap(), v6, 64));
        assert!(!in_subnet("fd01::5".parse().unwrap(), v6, 64));
    }
}
