//! The engine's view of anchored media: one relay per SDP media section of a call.
//!
//! The engine is sans-IO, so it reaches sockets through [`MediaBackend`]: the real
//! [`RelayMedia`] binds port pairs and runs `media::relay` tasks; tests use a fake.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::mpsc;

pub(crate) use crate::media::latch::{Expect, PtSet};
use crate::media::ports::{PortAllocator, PortsError};
pub(crate) use crate::media::relay::Side;
use crate::media::relay::{
    RecordCounters, RecordSinks, Relay, RelayConfig, RelayCounters, RelayEvent, RelayHandle,
    RelayId, SrtpDir,
};
use crate::media::srtp::SrtpContext;
use crate::media::threads::MediaThreads;

/// Engine-wide call key.
pub(crate) type CallKey = u64;

#[derive(Debug, Error)]
pub enum MediaError {
    #[error("RTP port range exhausted")]
    Exhausted,
    #[error("cannot bind RTP ports: {0}")]
    Bind(String),
}

/// Local RTP ports of one media section: the one leg A sends to and the one leg B sends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPorts {
    pub a: u16,
    pub b: u16,
}

impl StreamPorts {
    pub fn facing(&self, side: Side) -> u16 {
        match side {
            Side::A => self.a,
            Side::B => self.b,
        }
    }
}

/// What the admin listing shows of one stream: the remote each side's SDP announced and the
/// RTP packets relayed from each side (index 0 = A).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    pub remote: [Option<SocketAddr>; 2],
    pub packets_from: [u64; 2],
}

pub trait MediaBackend: Send {
    /// Remotes and packet counts of one stream of `call` (None: no such stream, or a backend
    /// that does not count).
    fn stream_stats(&self, _call: CallKey, _stream: usize) -> Option<StreamStats> {
        None
    }
    /// Binds one more relay for `call` (media section `stream`, in SDP order).
    fn add_stream(&mut self, call: CallKey) -> Result<StreamPorts, MediaError>;
    /// What one side's SDP says about its media in a stream (address, payload types, NAT):
    /// where that side's packets are taken from and sent to ([`crate::media::latch`]).
    fn set_remote(&mut self, call: CallKey, stream: usize, side: Side, expect: Expect);
    /// The RFC 4733 telephone-event payload type one side's SDP announced for a stream
    /// (`None`: none), so the relay can hold back the DTMF feature code.
    fn set_dtmf_pt(&mut self, call: CallKey, stream: usize, side: Side, pt: Option<u8>);
    /// The DTMF feature code (`store.feature_code`) for streams added from now on; the engine
    /// sets it once at start.
    fn set_feature_code(&mut self, code: &str);
    /// The call is answered: from now on RTP silence ends it.
    fn arm_timeout(&mut self, call: CallKey);
    /// Installs (None: removes) the SRTP context of `side` for `dir` on a stream (SRTP
    /// terminated per leg). Backends without SRTP ignore it.
    fn set_srtp(
        &mut self,
        _call: CallKey,
        _stream: usize,
        _side: Side,
        _dir: SrtpDir,
        _ctx: Option<Box<SrtpContext>>,
    ) {
    }
    /// Stops every relay of the call and frees its ports.
    fn release(&mut self, call: CallKey);
    /// `callvault_rtp_ports_in_use`.
    fn ports_in_use(&self) -> usize;
}

/// Reported to the core by the relays of a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MediaEvent {
    /// No RTP from either side for `rtp_timeout`.
    Timeout(CallKey),
    /// `*7 PIN #` keyed by the party on `side` as RFC 4733 telephone-events (swallowed).
    FeatureCode {
        call: CallKey,
        side: Side,
        pin: String,
    },
}

/// One relay's own counters and the remotes announced for sides A and B.
type RelayStats = (Arc<RelayCounters>, [Option<SocketAddr>; 2]);

/// Real relays on real sockets.
pub(crate) struct RelayMedia {
    ip: IpAddr,
    ports: PortAllocator,
    config: RelayConfig,
    counters: Arc<RelayCounters>,
    relay_events: mpsc::Sender<RelayEvent>,
    /// Where relays run; None: the runtime `add_stream` is called on (tests).
    threads: Option<Arc<MediaThreads>>,
    calls: HashMap<CallKey, Vec<RelayHandle>>,
    owners: HashMap<RelayId, CallKey>,
    /// Per stream of a call: its relay's own counters and the announced remotes (admin API).
    stats: HashMap<CallKey, Vec<RelayStats>>,
}

impl RelayMedia {
    /// Also returns the receiver the core must drain through [`RelayMedia::on_relay_event`].
    pub(crate) fn new(
        ip: IpAddr,
        ports: PortAllocator,
        rtp_timeout: Duration,
        counters: Arc<RelayCounters>,
    ) -> (RelayMedia, mpsc::Receiver<RelayEvent>) {
        let (tx, rx) = mpsc::channel(1024);
        (
            RelayMedia {
                ip,
                ports,
                config: RelayConfig {
                    timeout_armed_at_start: false,
                    ..RelayConfig::new(rtp_timeout)
                },
                counters,
                relay_events: tx,
                threads: None,
                calls: HashMap::new(),
                owners: HashMap::new(),
                stats: HashMap::new(),
            },
            rx,
        )
    }

    /// Hands latched legs to the kernel fast path (None: user space only).
    pub(crate) fn with_kernel(
        mut self,
        kernel: Option<Arc<crate::media::kernel::KernelPath>>,
    ) -> RelayMedia {
        self.config.kernel = kernel;
        self
    }

    /// Runs the relays on `threads` instead of the current runtime.
    pub(crate) fn with_threads(mut self, threads: Arc<MediaThreads>) -> RelayMedia {
        self.threads = Some(threads);
        self
    }

    /// Records the call's first media section into `sinks` (whole-call recording) until the
    /// call is released. False (and the sinks dropped, so their writers finish empty) when the
    /// call has no relay any more.
    pub(crate) fn record(
        &mut self,
        call: CallKey,
        sinks: RecordSinks,
        counters: Arc<RecordCounters>,
    ) -> bool {
        match self.calls.get(&call).and_then(|v| v.first()) {
            Some(h) => {
                h.record(sinks, counters);
                true
            }
            None => false,
        }
    }

    /// Maps a relay's own event to the call it belongs to. A call whose relay timed out is
    /// reported once, however many streams it had; events of released calls are dropped.
    pub(crate) fn on_relay_event(&mut self, ev: RelayEvent) -> Option<MediaEvent> {
        match ev {
            RelayEvent::Timeout { relay } => {
                let call = self.owners.remove(&relay)?;
                self.calls
                    .contains_key(&call)
                    .then_some(MediaEvent::Timeout(call))
            }
            RelayEvent::FeatureCode { relay, side, pin } => {
                let call = *self.owners.get(&relay)?;
                self.calls
                    .contains_key(&call)
                    .then_some(MediaEvent::FeatureCode { call, side, pin })
            }
        }
    }
}

impl MediaBackend for RelayMedia {
    fn stream_stats(&self, call: CallKey, stream: usize) -> Option<StreamStats> {
        let (c, remote) = self.stats.get(&call)?.get(stream)?;
        Some(StreamStats {
            remote: *remote,
            packets_from: [c.rtp_packets_from(Side::A), c.rtp_packets_from(Side::B)],
        })
    }

    fn add_stream(&mut self, call: CallKey) -> Result<StreamPorts, MediaError> {
        let map = |e: PortsError| match e {
            PortsError::PortsExhausted => MediaError::Exhausted,
            other => MediaError::Bind(other.to_string()),
        };
        // Both legs on one runtime: the relay task drives all four sockets.
        let rt = match &self.threads {
            Some(t) => t.pick(),
            None => {
                tokio::runtime::Handle::try_current().map_err(|_| map(PortsError::NoRuntime))?
            }
        };
        let a = self.ports.allocate_on(self.ip, &rt).map_err(map)?;
        let b = self.ports.allocate_on(self.ip, &rt).map_err(map)?;
        let own = Arc::new(RelayCounters::with_parent(self.counters.clone()));
        let handle = Relay::start_on(
            &rt,
            a,
            b,
            self.config.clone(),
            own.clone(),
            self.relay_events.clone(),
        );
        self.stats
            .entry(call)
            .or_default()
            .push((own, [None, None]));
        let ports = StreamPorts {
            a: handle.local_rtp_port(Side::A),
            b: handle.local_rtp_port(Side::B),
        };
        self.owners.insert(handle.id(), call);
        self.calls.entry(call).or_default().push(handle);
        Ok(ports)
    }

    fn set_remote(&mut self, call: CallKey, stream: usize, side: Side, expect: Expect) {
        if let Some(h) = self.calls.get(&call).and_then(|v| v.get(stream)) {
            h.set_expect(side, expect);
        }
        if let Some((_, remote)) = self.stats.get_mut(&call).and_then(|v| v.get_mut(stream)) {
            remote[usize::from(side == Side::B)] = expect.addr;
        }
    }

    fn set_dtmf_pt(&mut self, call: CallKey, stream: usize, side: Side, pt: Option<u8>) {
        if let Some(h) = self.calls.get(&call).and_then(|v| v.get(stream)) {
            h.set_dtmf_pt(side, pt);
        }
    }

    fn set_feature_code(&mut self, code: &str) {
        self.config.feature_code = code.to_string();
    }

    fn set_srtp(
        &mut self,
        call: CallKey,
        stream: usize,
        side: Side,
        dir: SrtpDir,
        ctx: Option<Box<SrtpContext>>,
    ) {
        if let Some(h) = self.calls.get(&call).and_then(|v| v.get(stream)) {
            h.set_srtp(side, dir, ctx);
        }
    }

    fn arm_timeout(&mut self, call: CallKey) {
        for h in self.calls.get(&call).into_iter().flatten() {
            h.arm_timeout();
        }
    }

    fn release(&mut self, call: CallKey) {
        self.stats.remove(&call);
        for h in self.calls.remove(&call).unwrap_or_default() {
            self.owners.remove(&h.id());
            // Stopping waits for the task to flush counters and free ports; do it off the core.
            tokio::spawn(h.stop());
        }
    }

    fn ports_in_use(&self) -> usize {
        self.ports.ports_in_use()
    }
}

/// A fake stream: its ports and the remote announced by each side (A, B).
#[cfg(test)]
pub(crate) type FakeStream = (StreamPorts, [Option<SocketAddr>; 2]);

/// In-memory stand-in for engine tests: hands out fake port numbers, records remotes.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct FakeMedia {
    next_port: u16,
    pub capacity: usize,
    pub streams: HashMap<CallKey, Vec<FakeStream>>,
    pub armed: Vec<CallKey>,
    /// Telephone-event type per (call, stream, side), as last set.
    pub dtmf_pts: HashMap<(CallKey, usize, Side), Option<u8>>,
    pub feature_code: String,
}

#[cfg(test)]
impl FakeMedia {
    pub(crate) fn new(capacity: usize) -> FakeMedia {
        FakeMedia {
            next_port: 40000,
            capacity,
            streams: HashMap::new(),
            armed: Vec::new(),
            dtmf_pts: HashMap::new(),
            feature_code: String::new(),
        }
    }

    pub(crate) fn remote(&self, call: CallKey, stream: usize, side: Side) -> Option<SocketAddr> {
        let s = self.streams.get(&call)?.get(stream)?;
        s.1[match side {
            Side::A => 0,
            Side::B => 1,
        }]
    }
}

#[cfg(test)]
impl MediaBackend for FakeMedia {
    fn add_stream(&mut self, call: CallKey) -> Result<StreamPorts, MediaError> {
        let used: usize = self.streams.values().map(Vec::len).sum();
        if used >= self.capacity {
            return Err(MediaError::Exhausted);
        }
        let ports = StreamPorts {
            a: self.next_port,
            b: self.next_port + 2,
        };
        self.next_port += 4;
        self.streams
            .entry(call)
            .or_default()
            .push((ports, [None, None]));
        Ok(ports)
    }

    fn set_remote(&mut self, call: CallKey, stream: usize, side: Side, expect: Expect) {
        if let Some(s) = self.streams.get_mut(&call).and_then(|v| v.get_mut(stream)) {
            s.1[match side {
                Side::A => 0,
                Side::B => 1,
            }] = expect.addr;
        }
    }

    fn set_dtmf_pt(&mut self, call: CallKey, stream: usize, side: Side, pt: Option<u8>) {
        if self.streams.get(&call).is_some_and(|v| stream < v.len()) {
            self.dtmf_pts.insert((call, stream, side), pt);
        }
    }

    fn set_feature_code(&mut self, code: &str) {
        self.feature_code = code.to_string();
    }

    fn arm_timeout(&mut self, call: CallKey) {
        self.armed.push(call);
    }

    fn release(&mut self, call: CallKey) {
        self.streams.remove(&call);
        self.dtmf_pts.retain(|k, _| k.0 != call);
    }

    fn ports_in_use(&self) -> usize {
        self.streams.values().map(Vec::len).sum::<usize>() * 4
    }
}
