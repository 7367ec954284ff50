//! One thread that writes many store logs by polling them on a fixed tick: the writer side
//! of whole-call recordings.
//!
//! A [`WriterTask`] per store on the async runtime costs a wake-up of a runtime worker and a
//! blocking-pool hand-off per batch; with thousands of recorded directions that was most of
//! the server's CPU (docs/BENCHMARKS.md, issue 5). Here the ingest ends hand batches over
//! without waking anybody (nobody waits on those channels), and this thread drains every log
//! once per tick, so the cost is one wake-up per tick for all logs together. In-call stores
//! keep their own writer task: their receiver waits on each commit (threshold, live play).

use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::segments::{Pumped, SegmentError, TailState, WriterTask};

/// Why [`LogThread::adopt`] could not take a log.
#[derive(Debug, thiserror::Error)]
#[error("the log writer thread has stopped")]
pub(crate) struct LogThreadGone;

struct Adopted {
    task: WriterTask,
    done: oneshot::Sender<Result<TailState, SegmentError>>,
}

/// Handle of the writer thread; dropping every handle ends the thread once its logs finish.
#[derive(Debug, Clone)]
pub(crate) struct LogThread {
    tx: std_mpsc::Sender<Adopted>,
}

impl LogThread {
    /// Starts the thread; every log is written once per `tick`.
    pub(crate) fn start(name: &str, tick: Duration) -> std::io::Result<LogThread> {
        let (tx, rx) = std_mpsc::channel::<Adopted>();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || run(rx, tick))?;
        Ok(LogThread { tx })
    }

    /// Hands a log to the thread; the receiver gets the log's end (what
    /// [`WriterTask::run`] would have returned) once the ingest end is closed and everything
    /// is written.
    pub(crate) fn adopt(
        &self,
        task: WriterTask,
    ) -> Result<oneshot::Receiver<Result<TailState, SegmentError>>, LogThreadGone> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Adopted { task, done })
            .map_err(|_| LogThreadGone)?;
        Ok(rx)
    }
}

fn run(rx: std_mpsc::Receiver<Adopted>, tick: Duration) {
    let mut logs: Vec<Adopted> = Vec::new();
    let mut handles_alive = true;
    let mut next_pass = Instant::now() + tick;
    loop {
        let now = Instant::now();
        if now >= next_pass {
            pump_all(&mut logs);
            if !handles_alive && logs.is_empty() {
                return;
            }
            next_pass = now + tick;
            continue;
        }
        // Between passes: take new logs (served from the next pass on, so a burst of new
        // calls does not make extra passes over every log).
        if handles_alive {
            match rx.recv_timeout(next_pass - now) {
                Ok(a) => logs.push(a),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => handles_alive = false,
            }
        } else {
            std::thread::sleep(next_pass - now);
        }
    }
}

/// One pass: every log writes what is queued; finished logs report and leave.
fn pump_all(logs: &mut Vec<Adopted>) {
    let mut i = 0;
    while i < logs.len() {
        match logs[i].task.pump() {
            Pumped::Open => i += 1,
            Pumped::Finished(res) => {
                let a = logs.swap_remove(i);
                // Nobody waiting for the end is fine: the log is written either way.
                let _ = a.done.send(res);
            }
        }
    }
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
        let thread = LogThread::start("test-logs", Duration::from_millis(5)).unwrap();
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
            ends.push(thread.adopt(task).unwrap());
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
        let thread = LogThread::start("test-logs-drop", Duration::from_millis(5)).unwrap();
        let w = SegmentWriter::create(&dir.path().join("s"), SegmentOptions::default()).unwrap();
        let (mut ingest, task) = pipeline(w, PipelineOptions::default());
        let end = thread.adopt(task).unwrap();
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
}
