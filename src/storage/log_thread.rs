//! One thread that writes many store logs by polling them on a fixed tick: the writer side
//! of whole-call recordings.
//!
//! A [`WriterTask`] per store on the async runtime costs a wake-up of a runtime worker and a
//! blocking-pool hand-off per batch; with thousands of recorded directions that was most of
//! the server's CPU (docs/BENCHMARKS.md, issue 5). Here the ingest ends hand batches over
//! without waking anybody (nobody waits on those channels), and this thread drains every log
//! once per tick, so the cost is one wake-up per tick for all logs together. In-call stores
//! keep their own writer task: their receiver waits on each commit (threshold, live play).
//!
//! # The kernel's recording ring
//!
//! With the kernel fast path (`media::kernel`), the datagrams of a recorded direction the
//! kernel forwards never reach the relay: the program copies them into a ring buffer, and this
//! thread is the ring's consumer ([`RecordSource`]). Every [`RING_TICK`] it takes the ring's
//! records and appends each to the log its id names ([`Adopted::kernel_id`], put into the
//! direction's map entry by the relay), as the same segment records the relay's own batches
//! become; every `tick` it commits all logs as before. So durability, crash recovery and the
//! live tail are those of the user-space gear.
//!
//! Order within a log: a direction moves between the gears (latching, re-INVITE), and both
//! feed one log. Each time the kernel takes a direction over, the relay gives the entry a new
//! gear epoch (`media::kernel::ring`); at the first ring record of a new epoch the log's queued
//! batches are appended first, so a batch the relay handed over before the kernel took the
//! direction (it flushes at once then) stays before the kernel's records, and in steady state
//! no log's queue is looked at between passes; the relay's next batch after the kernel
//! gave a direction back comes at its next flush (100 ms), after the ring's last records were
//! drained (every 20 ms). Records of a log that already ended, and records that do not parse,
//! are counted in `callvault_recording_packets_refused_total`.

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::segments::{Pumped, RecordHeader, SegmentError, TailState, WriterTask};
use crate::media::kernel::ring::{log_of, Drained, KernelRing, RecIds, RingRecord};
use crate::media::rtp::RtpPacket;
use crate::metrics::METRICS;

/// How often the ring is drained: its records wait at most this long in the kernel.
pub(crate) const RING_TICK: Duration = Duration::from_millis(20);
/// Records taken from the ring in one drain at most (a full 16 MiB ring holds ~85k of
/// G.711); the rest waits for the next drain, so a pass stays bounded.
const RING_BATCH: usize = 100_000;

/// Where recorded datagrams the relays never saw come from: the kernel's ring, or a test's
/// list.
pub(crate) trait RecordSource: Send + 'static {
    /// Hands up to `max` records to `each`, oldest first.
    fn drain(&mut self, max: usize, each: &mut dyn FnMut(RingRecord<'_>)) -> Drained;
}

impl RecordSource for KernelRing {
    fn drain(&mut self, max: usize, each: &mut dyn FnMut(RingRecord<'_>)) -> Drained {
        KernelRing::drain(self, max, each)
    }
}

/// Why [`LogThread::adopt`] could not take a log.
#[derive(Debug, thiserror::Error)]
#[error("the log writer thread has stopped")]
pub(crate) struct LogThreadGone;

struct Adopted {
    task: WriterTask,
    /// Taken when the log finishes.
    done: Option<oneshot::Sender<LogEnd>>,
    /// The record id (log and gear epoch) of the last ring record (see the module doc).
    last_rec_id: u32,
}

/// How a log ended: what [`WriterTask::run`] would have returned.
pub(crate) type LogEnd = Result<TailState, SegmentError>;

/// What [`LogThread::adopt`] hands back.
#[derive(Debug)]
pub(crate) struct AdoptedLog {
    /// The log's end.
    pub end: oneshot::Receiver<LogEnd>,
    /// The id the kernel's map entry names this log by, when the thread drains a ring.
    pub kernel_id: Option<u32>,
}

/// Handle of the writer thread; dropping every handle ends the thread once its logs finish.
#[derive(Debug, Clone)]
pub(crate) struct LogThread {
    tx: std_mpsc::Sender<(u32, Adopted)>,
    ids: Arc<RecIds>,
    ring: bool,
}

impl LogThread {
    /// Starts the thread; every log is written once per `tick`, and `ring` (if any) drained
    /// every [`RING_TICK`].
    pub(crate) fn start(
        name: &str,
        tick: Duration,
        ring: Option<Box<dyn RecordSource>>,
    ) -> std::io::Result<LogThread> {
        let (tx, rx) = std_mpsc::channel();
        let has_ring = ring.is_some();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || run(rx, tick, ring))?;
        Ok(LogThread {
            tx,
            ids: Arc::new(RecIds::default()),
            ring: has_ring,
        })
    }

    /// Hands a log to the thread; the receiver gets the log's end once the ingest end is
    /// closed and everything is written.
    pub(crate) fn adopt(&self, task: WriterTask) -> Result<AdoptedLog, LogThreadGone> {
        let (done, end) = oneshot::channel();
        let id = self.ids.next();
        let a = Adopted {
            task,
            done: Some(done),
            last_rec_id: 0,
        };
        self.tx.send((id, a)).map_err(|_| LogThreadGone)?;
        Ok(AdoptedLog {
            end,
            kernel_id: self.ring.then_some(id),
        })
    }
}

fn run(
    rx: std_mpsc::Receiver<(u32, Adopted)>,
    tick: Duration,
    mut ring: Option<Box<dyn RecordSource>>,
) {
    let mut logs: HashMap<u32, Adopted> = HashMap::new();
    let mut handles_alive = true;
    let start = Instant::now();
    let mut next_pass = start + tick;
    let mut next_drain = start + RING_TICK;
    loop {
        let now = Instant::now();
        let pass = now >= next_pass;
        // Before a pass too, so a log that closed is finished with its last kernel records.
        if let Some(r) = ring.as_deref_mut().filter(|_| pass || now >= next_drain) {
            // Logs adopted since the last look first: the relay may already have put a new
            // log's id into the kernel's map, and its records must not find it missing.
            while let Ok((id, a)) = rx.try_recv() {
                logs.insert(id, a);
            }
            drain_ring(r, &mut logs);
            next_drain = now + RING_TICK;
        }
        if pass {
            pump_all(&mut logs);
            if !handles_alive && logs.is_empty() {
                return;
            }
            next_pass = now + tick;
            continue;
        }
        let wake = if ring.is_some() {
            next_pass.min(next_drain)
        } else {
            next_pass
        };
        // Between passes: take new logs (served from the next pass on, so a burst of new
        // calls does not make extra passes over every log).
        if handles_alive {
            match rx.recv_timeout(wake.saturating_duration_since(now)) {
                Ok((id, a)) => {
                    logs.insert(id, a);
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => handles_alive = false,
            }
        } else {
            std::thread::sleep(wake.saturating_duration_since(now));
        }
    }
}

/// Appends the ring's records to their logs (module doc: the log's queued batches first).
fn drain_ring(ring: &mut dyn RecordSource, logs: &mut HashMap<u32, Adopted>) {
    let (mut stored, mut bytes, mut lost) = (0u64, 0u64, 0u64);
    let d = ring.drain(RING_BATCH, &mut |r: RingRecord<'_>| {
        let (Some(log), Ok(rtp)) = (logs.get_mut(&log_of(r.rec_id)), RtpPacket::parse(r.rtp))
        else {
            lost += 1;
            return;
        };
        if log.last_rec_id != r.rec_id {
            log.last_rec_id = r.rec_id;
            log.task.take_queued();
        }
        let h = RecordHeader {
            arrival_us: r.arrival_us,
            seq: rtp.sequence(),
            timestamp: rtp.timestamp(),
            ssrc: rtp.ssrc(),
            payload_type: rtp.payload_type(),
            marker: rtp.marker(),
        };
        log.task.append_record(&h, rtp.payload());
        stored += 1;
        bytes += rtp.payload().len() as u64;
    });
    lost += d.malformed;
    METRICS.rtp_packets_stored_total.add(stored);
    METRICS.rtp_bytes_stored_total.add(bytes);
    METRICS.rtp_packets_stored_kernel_total.add(stored);
    METRICS.recording_packets_refused_total.add(lost);
}

/// One pass: every log writes what is queued; finished logs report and leave.
fn pump_all(logs: &mut HashMap<u32, Adopted>) {
    logs.retain(|_, a| match a.task.pump() {
        Pumped::Open => true,
        Pumped::Finished(res) => {
            // Nobody waiting for the end is fine: the log is written either way.
            if let Some(done) = a.done.take() {
                let _ = done.send(res);
            }
            false
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::segments::{
        pipeline, PipelineOptions, RecordHeader, SegmentOptions, SegmentReader, SegmentWriter,
    };

    fn header(seq: u16) -> RecordHeader {
        RecordHeader {
            arrival_us: 1_000_000 + u64::from(seq) * 20_000,
            seq,
            timestamp: u32::from(seq) * 160,
            ssrc: 7,
            payload_type: 0,
            marker: false,
        }
    }

    #[tokio::test]
    async fn many_logs_written_by_one_thread_and_finished_when_closed() {
        let dir = tempfile::tempdir().unwrap();
        let thread = LogThread::start("test-logs", Duration::from_millis(5), None).unwrap();
        let mut ends = Vec::new();
        let mut ingests = Vec::new();
        for i in 0..20 {
            let w =
                SegmentWriter::create(&dir.path().join(format!("s{i}")), SegmentOptions::default())
                    .unwrap();
            let (ingest, task) = pipeline(
                w,
                PipelineOptions {
                    batch_bytes: 512,
                    ..PipelineOptions::default()
                },
            );
            ends.push(thread.adopt(task).unwrap().end);
            ingests.push(ingest);
        }
        for (i, ingest) in ingests.iter_mut().enumerate() {
            for seq in 0..(50 + i as u16) {
                ingest.push(&header(seq), &[i as u8; 160]).unwrap();
            }
            ingest.flush().unwrap();
        }
        for ingest in ingests {
            ingest.close().await.unwrap();
        }
        for (i, end) in ends.into_iter().enumerate() {
            let tail = end.await.unwrap().unwrap();
            assert!(tail.finished);
            assert_eq!(tail.records, 50 + i as u64);
            assert_eq!(tail.payload_bytes, (50 + i as u64) * 160);
            // Every record reads back with its payload.
            let mut r = SegmentReader::open(&dir.path().join(format!("s{i}")), 0, None);
            let mut n = 0;
            while let Some(rec) = r.next().await.unwrap() {
                assert_eq!(rec.header.seq, n);
                assert!(rec.payload.iter().all(|b| *b == i as u8));
                n += 1;
            }
            assert_eq!(u64::from(n), tail.records);
        }
    }

    #[tokio::test]
    async fn logs_adopted_before_the_last_handle_drops_are_still_finished() {
        let dir = tempfile::tempdir().unwrap();
        let thread = LogThread::start("test-logs-drop", Duration::from_millis(5), None).unwrap();
        let w = SegmentWriter::create(&dir.path().join("s"), SegmentOptions::default()).unwrap();
        let (mut ingest, task) = pipeline(w, PipelineOptions::default());
        let end = thread.adopt(task).unwrap().end;
        drop(thread);
        for seq in 0..10 {
            ingest.push(&header(seq), &[9; 160]).unwrap();
        }
        ingest.close().await.unwrap();
        let tail = tokio::time::timeout(Duration::from_secs(5), end)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(tail.finished);
        assert_eq!(tail.records, 10);
    }

    /// Records as the kernel's ring hands them over, from a list.
    struct ListSource(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

    impl RecordSource for ListSource {
        fn drain(&mut self, max: usize, each: &mut dyn FnMut(RingRecord<'_>)) -> Drained {
            let mut d = Drained::default();
            let taken: Vec<Vec<u8>> = {
                let mut l = self.0.lock().unwrap();
                let n = l.len().min(max);
                l.drain(..n).collect()
            };
            for b in &taken {
                match crate::media::kernel::ring::parse(b, 0) {
                    Some(r) => {
                        d.records += 1;
                        each(r);
                    }
                    None => d.malformed += 1,
                }
            }
            d
        }
    }

    fn ring_record(id: u32, seq: u16) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(2_000_000_000u64 + u64::from(seq) * 20_000_000).to_ne_bytes());
        b.extend_from_slice(&id.to_ne_bytes());
        b.extend_from_slice(&(12u16 + 160).to_ne_bytes());
        b.extend_from_slice(&[0, 0]);
        let mut rtp = vec![0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
        rtp[2..4].copy_from_slice(&seq.to_be_bytes());
        rtp[4..8].copy_from_slice(&(u32::from(seq) * 160).to_be_bytes());
        rtp.extend_from_slice(&[seq as u8; 160]);
        b.extend_from_slice(&rtp);
        b
    }

    /// The relay's batch handed over before the kernel took the direction stays before the
    /// ring's records in the log; records of a log that ended, or that do not parse, are
    /// refused and counted; a closed log gets its last ring records before it finishes.
    #[tokio::test]
    async fn ring_records_join_the_log_after_its_queued_batches() {
        let dir = tempfile::tempdir().unwrap();
        let list = Arc::new(std::sync::Mutex::new(Vec::new()));
        let thread = LogThread::start(
            "test-logs-ring",
            Duration::from_millis(200),
            Some(Box::new(ListSource(list.clone()))),
        )
        .unwrap();
        let w = SegmentWriter::create(&dir.path().join("s"), SegmentOptions::default()).unwrap();
        let (mut ingest, task) = pipeline(w, PipelineOptions::default());
        let adopted = thread.adopt(task).unwrap();
        let id = adopted.kernel_id.expect("an id: the thread drains a ring");
        // User space relayed 1..=3 and handed them over; the kernel then took 4..=6.
        for seq in 1..=3 {
            ingest.push(&header(seq), &[seq as u8; 160]).unwrap();
        }
        ingest.flush().unwrap();
        let refused = METRICS.recording_packets_refused_total.get();
        {
            let mut l = list.lock().unwrap();
            l.extend((4..=6).map(|seq| ring_record(id, seq)));
            l.push(ring_record(id + 1000, 1));
            l.push(vec![1, 2, 3]);
        }
        // The ring is drained every 20 ms, the log committed every 200 ms.
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(list.lock().unwrap().is_empty());
        // A re-INVITE: user space relays 7..=8, then the kernel takes the direction again in
        // a new gear epoch; the relay's batch was handed over first.
        for seq in 7..=8 {
            ingest.push(&header(seq), &[seq as u8; 160]).unwrap();
        }
        ingest.flush().unwrap();
        let again = crate::media::kernel::ring::with_epoch(id, 1);
        list.lock()
            .unwrap()
            .extend((9..=10).map(|seq| ring_record(again, seq)));
        tokio::time::sleep(Duration::from_millis(60)).await;
        // The relay stops: the kernel's last records are still in the ring when it closes.
        list.lock().unwrap().push(ring_record(again, 11));
        ingest.close().await.unwrap();
        let tail = tokio::time::timeout(Duration::from_secs(5), adopted.end)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(tail.records, 11);
        assert!(METRICS.recording_packets_refused_total.get() >= refused + 2);
        let mut r = SegmentReader::open(&dir.path().join("s"), 0, None);
        let mut seqs = Vec::new();
        while let Some(rec) = r.next().await.unwrap() {
            assert_eq!(rec.payload, vec![rec.header.seq as u8; 160]);
            seqs.push(rec.header.seq);
        }
        assert_eq!(seqs, (1..=11).collect::<Vec<u16>>());
    }
}
