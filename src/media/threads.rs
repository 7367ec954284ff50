//! Media threads: the call relays run on their own OS threads, each a single-threaded tokio
//! runtime with its own I/O driver, one per core by default (thread-per-core).
//!
//! Why not the server's multi-threaded runtime: a relay does a few microseconds of work per
//! packet, so on the shared work-stealing runtime most of its cost was waking the other
//! worker (futex) and switching threads per packet (docs/BENCHMARKS.md, issue 5 profile).
//! On a media thread a packet's readiness, the relay task and its `sendto` all stay on one
//! thread: one `epoll_wait` wakes many relays and nothing crosses threads per packet. Relays
//! are spread round-robin; a relay and its four sockets never move between threads.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::{Builder, Handle};

/// The pool of media threads; cheap to share behind an `Arc`.
#[derive(Debug)]
pub(crate) struct MediaThreads {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

impl MediaThreads {
    /// Starts `count` media threads (0: one per available core) at nice value `nice`. They
    /// run until the process exits.
    pub(crate) fn start(count: usize, nice: i32) -> io::Result<MediaThreads> {
        let count = if count == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            count
        };
        let mut handles = Vec::with_capacity(count);
        for i in 0..count {
            let rt = Builder::new_current_thread()
                .enable_all()
                .thread_name(format!("cv-media-{i}"))
                .build()?;
            handles.push(rt.handle().clone());
            std::thread::Builder::new()
                .name(format!("cv-media-{i}"))
                // Drives the runtime's I/O and timers for the tasks spawned through its handle;
                // never returns.
                .spawn(move || {
                    if nice != 0 {
                        set_nice(nice, i);
                    }
                    rt.block_on(std::future::pending::<()>())
                })?;
        }
        Ok(MediaThreads {
            handles,
            next: AtomicUsize::new(0),
        })
    }

    /// The thread for the next relay (round-robin).
    pub(crate) fn pick(&self) -> Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[i].clone()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.handles.len()
    }
}

/// Sets the calling thread's nice value (Linux keeps one per thread). Refusal (no
/// CAP_SYS_NICE) is not an error: the thread runs at the process's priority.
fn set_nice(nice: i32, index: usize) {
    // SAFETY: plain syscalls on the calling thread; no memory is passed.
    let (tid, res) = unsafe {
        let tid = libc::gettid();
        // `who` = a thread id: the value applies to this thread only.
        let res = libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice);
        (tid, res)
    };
    if res != 0 {
        let err = io::Error::last_os_error();
        if index == 0 {
            tracing::info!(nice, error = %err, "media threads keep the default priority");
        }
    } else {
        tracing::debug!(tid, nice, "media thread priority set");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_over_distinct_threads() {
        let t = MediaThreads::start(2, 0).unwrap();
        assert_eq!(t.len(), 2);
        let names: Vec<String> = (0..4)
            .map(|_| {
                let (tx, rx) = std::sync::mpsc::channel();
                t.pick().spawn(async move {
                    let _ = tx.send(std::thread::current().name().map(str::to_string));
                });
                rx.recv().unwrap().unwrap()
            })
            .collect();
        assert_eq!(
            names,
            ["cv-media-0", "cv-media-1", "cv-media-0", "cv-media-1"]
        );
    }

    #[test]
    fn threads_run_at_the_nice_value_asked_for() {
        // Raising the nice value needs no privilege, so this holds wherever tests run.
        let t = MediaThreads::start(1, 5).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        t.pick().spawn(async move {
            // SAFETY: a plain syscall on the calling thread.
            let _ = tx.send(unsafe { libc::gettid() });
        });
        let tid = rx.recv().unwrap();
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // Fields after the parenthesised command name; nice is field 19 of the line.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let nice: i32 = after.split(' ').nth(16).unwrap().parse().unwrap();
        assert_eq!(nice, 5, "{stat}");
    }
}
