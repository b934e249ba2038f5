//! The compression pool: pinned workers that run tasks from one bounded queue, each worker
//! holding a compressor for every codec it may be asked for (all of
//! [`Codec::ADAPTIVE_CHOICES`] under `adaptive`), and, under `adaptive`, the policy that
//! chooses each task's codec from measured rates ([`crate::adaptive`]).
//!
//! The QEMU relay runs all of a session's carried streams on one pool: QEMU's channels
//! share the cores, as the engine's own connections share its workers, instead of each
//! stream starting workers of its own (with four multifd channels that was four pools on
//! the same CPUs). The engine's source runs the same compressors and policy on workers it
//! keeps in its own thread scope (they borrow the guest's memory), pinned by the same rule.

use crate::adaptive::AdaptivePolicy;
use migration::codec::{Codec, PageCompressor};
use std::sync::Arc;
use std::thread::JoinHandle;
use transport::abort::{Aborted, SessionAbort};
use transport::ring::Ring;

/// Tasks waiting for a worker, per worker: enough that a worker finishing one finds the
/// next, few enough that the queue never holds much more than the workers can start.
const QUEUED_PER_WORKER: usize = 2;

/// One unit of work: it gets the worker that runs it (its compressors, the policy).
pub type Task = Box<dyn FnOnce(&mut PoolWorker) + Send>;

/// How a pool is made.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Workers (at least one).
    pub workers: usize,
    /// Pin worker i to the first CPU no other vmigrate thread holds from `first_cpu + i`
    /// up (`transport::pin::claim_worker_cpu`, as the engine's own workers are); None
    /// leaves them to the scheduler.
    pub first_cpu: Option<usize>,
    /// The codec the tasks compress with; `Adaptive` gives every worker all the choices
    /// and the pool a policy.
    pub codec: Codec,
    /// The worker threads' name, before their index.
    pub name: String,
}

/// The compressors for `codec`: one, or one per adaptive choice.
pub fn compressors_for(codec: Codec) -> Vec<PageCompressor> {
    match codec {
        Codec::Adaptive => Codec::ADAPTIVE_CHOICES.iter().map(|&c| PageCompressor::new(c)).collect(),
        codec => vec![PageCompressor::new(codec)],
    }
}

/// What a task runs with: its worker's compressors and the pool's policy.
pub struct PoolWorker {
    index: usize,
    compressors: Vec<PageCompressor>,
    policy: Option<Arc<AdaptivePolicy>>,
}

impl PoolWorker {
    /// This worker's place in the pool.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The compressor for `codec`, which must be the pool's codec or, under `adaptive`,
    /// one of its choices.
    pub fn compressor(&mut self, codec: Codec) -> &mut PageCompressor {
        self.compressors
            .iter_mut()
            .find(|c| c.codec() == codec)
            .unwrap_or_else(|| panic!("no {codec} compressor in this pool"))
    }

    /// Every compressor this worker has (each adaptive choice, for measuring them all).
    pub fn compressors(&mut self) -> &mut [PageCompressor] {
        &mut self.compressors
    }

    /// Under `adaptive`, the policy that chooses each task's codec.
    pub fn policy(&self) -> Option<&AdaptivePolicy> {
        self.policy.as_deref()
    }
}

/// A running pool. Dropping it (or [`CompressionPool::stop`]) lets the workers finish the
/// tasks queued and joins them; the session's abort stops them at once.
pub struct CompressionPool {
    tasks: Arc<Ring<Option<Task>>>,
    workers: Vec<JoinHandle<()>>,
    abort: Arc<SessionAbort>,
    codec: Codec,
    policy: Option<Arc<AdaptivePolicy>>,
}

impl CompressionPool {
    /// Starts the workers; they stop when the pool does or when `abort` is raised.
    pub fn start(config: &PoolConfig, abort: Arc<SessionAbort>) -> std::io::Result<CompressionPool> {
        let count = config.workers.max(1);
        let tasks: Arc<Ring<Option<Task>>> = Arc::new(Ring::new(QUEUED_PER_WORKER * count));
        let policy = (config.codec == Codec::Adaptive).then(|| Arc::new(AdaptivePolicy::new(count)));
        let mut workers = Vec::with_capacity(count);
        for index in 0..count {
            let (tasks, abort) = (tasks.clone(), abort.clone());
            let mut worker = PoolWorker { index, compressors: compressors_for(config.codec), policy: policy.clone() };
            let first_cpu = config.first_cpu;
            let thread = std::thread::Builder::new().name(format!("{}-{index}", config.name)).spawn(move || {
                let _cpu = first_cpu.map(|first| transport::pin::claim_worker_cpu(first + index));
                while let Ok(Some(task)) = tasks.pop(&abort) {
                    task(&mut worker);
                }
            })?;
            workers.push(thread);
        }
        Ok(CompressionPool { tasks, workers, abort, codec: config.codec, policy })
    }

    /// Queues `task`, waiting while the queue is full (the workers set the pace).
    pub fn submit(&self, task: Task) -> Result<(), Aborted> {
        self.tasks.push(Some(task), &self.abort)
    }

    /// Whether tasks wait for a worker (the producers are ahead of the workers).
    pub fn backlog(&self) -> bool {
        !self.tasks.is_empty()
    }

    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// The codec the pool was made for (`Adaptive`: chosen per task).
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Under `adaptive`, the pool's policy.
    pub fn policy(&self) -> Option<&AdaptivePolicy> {
        self.policy.as_deref()
    }

    /// Lets the workers finish what is queued, then joins them.
    pub fn stop(mut self) {
        self.join();
    }

    fn join(&mut self) {
        for _ in 0..self.workers.len() {
            if self.tasks.push(None, &self.abort).is_err() {
                break;
            }
        }
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

impl Drop for CompressionPool {
    fn drop(&mut self) {
        self.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    fn config(workers: usize, codec: Codec) -> PoolConfig {
        PoolConfig { workers, first_cpu: None, codec, name: "test-pool".into() }
    }

    #[test]
    fn every_task_runs_once_on_some_worker() {
        let pool = CompressionPool::start(&config(3, Codec::Lz4), Arc::new(SessionAbort::new())).unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
        for _ in 0..100 {
            let (ran, seen) = (ran.clone(), seen.clone());
            pool.submit(Box::new(move |worker| {
                assert_eq!(worker.compressor(Codec::Lz4).codec(), Codec::Lz4);
                assert!(worker.policy().is_none());
                seen.lock().unwrap().insert(worker.index());
                ran.fetch_add(1, Ordering::SeqCst);
            }))
            .unwrap();
        }
        pool.stop();
        assert_eq!(ran.load(Ordering::SeqCst), 100);
        assert!(seen.lock().unwrap().iter().all(|&i| i < 3));
    }

    #[test]
    fn an_adaptive_pool_has_every_choice_and_a_policy() {
        let pool = CompressionPool::start(&config(1, Codec::Adaptive), Arc::new(SessionAbort::new())).unwrap();
        assert!(pool.policy().is_some());
        let (tx, rx) = std::sync::mpsc::channel();
        pool.submit(Box::new(move |worker| {
            let codecs: Vec<Codec> = worker.compressors().iter().map(|c| c.codec()).collect();
            tx.send((codecs, worker.policy().is_some())).unwrap();
        }))
        .unwrap();
        assert_eq!(rx.recv().unwrap(), (Codec::ADAPTIVE_CHOICES.to_vec(), true));
    }

    #[test]
    fn an_abort_stops_a_producer_waiting_on_a_full_queue() {
        let abort = Arc::new(SessionAbort::new());
        let pool = CompressionPool::start(&config(1, Codec::None), abort.clone()).unwrap();
        let (hold, held) = std::sync::mpsc::channel::<()>();
        // The one worker waits; the queue fills behind it.
        pool.submit(Box::new(move |_| {
            let _ = held.recv();
        }))
        .unwrap();
        let raiser = std::thread::spawn({
            let abort = abort.clone();
            move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                abort.raise("test");
            }
        });
        let mut refused = false;
        for _ in 0..10 {
            if pool.submit(Box::new(|_| {})).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused, "a full queue under an abort refuses");
        raiser.join().unwrap();
        drop(hold);
        drop(pool);
    }
}
