//! Test helper: a private network namespace for the calling thread, so a test's tc program
//! (and any leftover of it) can never touch the machine's own loopback.

use std::io;

/// Moves the calling thread (and what it spawns from now on: threads, child processes) into a
/// new network namespace with `lo` up. False, after a SKIPPED line, when not root — a failure
/// instead with `CALLVAULT_REQUIRE_TOOLS=1` (CI runs as root).
pub(crate) fn enter() -> bool {
    // SAFETY: plain syscalls; `ifr` is a zeroed ifreq with a NUL-terminated name.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        if std::env::var("CALLVAULT_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("kernel path tests need root (CALLVAULT_REQUIRE_TOOLS=1)");
        }
        eprintln!("SKIPPED: kernel path tests need root");
        return false;
    }
    if let Err(e) = unshare_net() {
        panic!("unshare(CLONE_NEWNET): {e}");
    }
    if let Err(e) = loopback_up() {
        panic!("bringing lo up: {e}");
    }
    true
}

fn unshare_net() -> io::Result<()> {
    // SAFETY: affects only the calling thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn loopback_up() -> io::Result<()> {
    // SAFETY: a socket for the ioctls, closed below; `ifr` is a valid ifreq naming "lo".
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        let mut r = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr);
        if r == 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            r = libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        }
        let err = io::Error::last_os_error();
        libc::close(fd);
        if r != 0 {
            return Err(err);
        }
    }
    Ok(())
}
