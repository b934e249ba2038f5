//! A compression device (DPDK's compressdev: `compress_isal`, `compress_zlib`, Intel QAT):
//! raw deflate, stateless, one operation per buffer, run asynchronously. `Compressor::run`
//! keeps up to its queue's depth of operations in flight, enqueueing what fits and taking
//! back what is done in bursts, so the caller's thread never waits on one buffer while the
//! device has room for more.
//!
//! The output is plain raw deflate (RFC 1951, no zlib or gzip wrapper): any inflater
//! decodes it, so a destination without the device decompresses on its CPU.

use crate::{DpdkError, Eal, Mempool};
use std::ffi::{c_void, CString};
use std::ptr::{null_mut, NonNull};

/// Most operations taken back from the device per dequeue call.
const BURST: usize = 32;
/// The most queue pairs one device is opened with. Every configuration asks the driver
/// for transforms enough for this many: the ISA-L driver keeps its pool of transforms from
/// the first configuration and refuses a later one that needs more ("Cannot allocate
/// memory"), as a second session with more workers would.
pub const MAX_QUEUE_PAIRS: u16 = 64;
/// Deflate's largest window (32 KiB), as log2.
const WINDOW_LOG2: u8 = 15;

/// Which way the data goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Compress,
    Decompress,
}

/// Why one buffer's operation failed (the others are unaffected).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpFailure {
    /// The output did not fit in the room given (incompressible input, or a decompressed
    /// size larger than expected).
    #[error("the output did not fit in {0} bytes")]
    OutOfSpace(usize),
    /// The device reported another status (`rte_comp_op_status`).
    #[error("the device failed the operation (status {0})")]
    Status(u8),
    /// The input was larger than the device's buffers.
    #[error("{0} bytes is more than one operation takes")]
    TooLarge(usize),
    /// No buffer or operation could be allocated for it.
    #[error("out of device buffers")]
    NoBuffers,
    /// The device took no operation, with none of ours in flight.
    #[error("the device takes no operations")]
    Refused,
}

/// A started compression device: stopped when the last of its queue pairs is dropped.
struct Device {
    id: u8,
    name: String,
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: every queue pair (and its transforms) is gone: each holds this device.
        unsafe { dpdk_sys::rte_compressdev_stop(self.id) };
    }
}

/// Pools of operations and buffers are named; each queue pair opened in the process gets
/// a number of its own, since a device may be opened again (a later session) before the
/// old names are gone.
static OPENED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// One queue pair of a started compression device, with the private transforms (deflate
/// compress, deflate decompress) and the pools its operations use. Not shared between
/// threads: each worker owns one queue pair.
pub struct Compressor {
    device: std::sync::Arc<Device>,
    queue: u16,
    depth: usize,
    compress: *mut c_void,
    decompress: *mut c_void,
    ops: NonNull<dpdk_sys::rte_mempool>,
    buffers: Mempool,
    /// The largest buffer an operation takes, in or out.
    room: usize,
}

// SAFETY: the queue pair, transforms and pools are used only through `&mut self`, from one
// thread at a time; DPDK lets a queue pair move between threads as long as two never use
// it at once.
unsafe impl Send for Compressor {}

impl Compressor {
    /// Configures and starts the device named `name` (as the EAL knows it: `--vdev
    /// compress_isal0`) with one queue pair of `depth` operations, for buffers of up to
    /// `room` bytes each way.
    pub fn open(eal: &Eal, name: &str, depth: u16, room: u16) -> Result<Compressor, DpdkError> {
        let mut queues = Compressor::open_queues(eal, name, 1, depth, room)?;
        Ok(queues.pop().expect("one queue pair asked for"))
    }

    /// Configures and starts the device named `name` with `count` queue pairs, one for
    /// each thread that will use it, each of `depth` operations for buffers of up to
    /// `room` bytes each way. The device stops when the last is dropped.
    pub fn open_queues(eal: &Eal, name: &str, count: u16, depth: u16, room: u16) -> Result<Vec<Compressor>, DpdkError> {
        let c_name = CString::new(name).map_err(|_| DpdkError::BadArgument(name.to_string()))?;
        // SAFETY: a valid C string; the EAL is initialised (`eal`).
        let id = unsafe { dpdk_sys::rte_compressdev_get_dev_id(c_name.as_ptr()) };
        let id = u8::try_from(id).map_err(|_| DpdkError::NoSuchDevice(name.to_string()))?;
        let mut info = dpdk_sys::rte_compressdev_info::default();
        // SAFETY: a valid device id; `info` outlives the call.
        unsafe { dpdk_sys::rte_compressdev_info_get(id, &mut info) };
        // Zero: the driver sets no limit.
        let max = match info.max_nb_queue_pairs {
            0 => MAX_QUEUE_PAIRS,
            max => max.min(MAX_QUEUE_PAIRS),
        };
        if count > max {
            return Err(DpdkError::TooManyCompressQueues { device: name.to_string(), asked: count, max });
        }
        let socket = dpdk_sys::consts::SOCKET_ID_ANY;
        let mut config = dpdk_sys::rte_compressdev_config {
            socket_id: socket,
            nb_queue_pairs: count,
            max_nb_priv_xforms: 2 * MAX_QUEUE_PAIRS,
            max_nb_streams: 0,
        };
        // SAFETY: `id` is a valid device (stopped: a started one refuses and says so);
        // `config` outlives the call.
        check("rte_compressdev_configure", unsafe { dpdk_sys::rte_compressdev_configure(id, &mut config) })?;
        for queue in 0..count {
            // SAFETY: the device is configured with `count` queue pairs.
            let setup = unsafe { dpdk_sys::rte_compressdev_queue_pair_setup(id, queue, u32::from(depth), socket) };
            check("rte_compressdev_queue_pair_setup", setup)?;
        }
        // SAFETY: configured, its queue pairs set up.
        check("rte_compressdev_start", unsafe { dpdk_sys::rte_compressdev_start(id) })?;
        let device = std::sync::Arc::new(Device { id, name: name.to_string() });
        (0..count).map(|queue| Compressor::queue(eal, &device, queue, depth, room)).collect()
    }

    /// Queue pair `queue` of a started device: its pools and transforms.
    fn queue(
        eal: &Eal,
        device: &std::sync::Arc<Device>,
        queue: u16,
        depth: u16,
        room: u16,
    ) -> Result<Compressor, DpdkError> {
        let number = OPENED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = &device.name;
        let bad_name = || DpdkError::BadArgument(name.to_string());
        let pool_name = CString::new(format!("cops-{name}-{number}")).map_err(|_| bad_name())?;
        let count = u32::from(depth) * 2;
        let socket = dpdk_sys::consts::SOCKET_ID_ANY;
        // SAFETY: a valid C string; the EAL is initialised.
        let ops = unsafe { dpdk_sys::rte_comp_op_pool_create(pool_name.as_ptr(), count, 0, 0, socket) };
        let ops = NonNull::new(ops).ok_or_else(|| DpdkError::from_errno("rte_comp_op_pool_create"))?;
        let headroom = dpdk_sys::consts::RTE_PKTMBUF_HEADROOM as u16;
        let buffers = Mempool::with_data_room(eal, &format!("cbufs-{name}-{number}"), count * 2, 0, room + headroom);
        let buffers = match buffers {
            Ok(buffers) => buffers,
            Err(err) => {
                // SAFETY: made above, never used.
                unsafe { dpdk_sys::rte_mempool_free(ops.as_ptr()) };
                return Err(err);
            }
        };
        let mut compressor = Compressor {
            device: device.clone(),
            queue,
            depth: usize::from(depth),
            compress: null_mut(),
            decompress: null_mut(),
            ops,
            buffers,
            room: usize::from(room),
        };
        compressor.compress = compressor.transform(Direction::Compress)?;
        compressor.decompress = compressor.transform(Direction::Decompress)?;
        Ok(compressor)
    }

    pub fn name(&self) -> &str {
        &self.device.name
    }

    /// The largest input or output one operation takes.
    pub fn room(&self) -> usize {
        self.room
    }

    /// The device's private transform for raw deflate `direction` (fastest level: the
    /// device's own minimum; dynamic Huffman codes).
    fn transform(&self, direction: Direction) -> Result<*mut c_void, DpdkError> {
        let mut xform = dpdk_sys::rte_comp_xform::default();
        match direction {
            Direction::Compress => {
                xform.type_ = dpdk_sys::rte_comp_xform_type_RTE_COMP_COMPRESS;
                // SAFETY: writing the union's member that `type_` names.
                let compress = unsafe { &mut xform.__bindgen_anon_1.compress };
                compress.algo = dpdk_sys::rte_comp_algorithm_RTE_COMP_ALGO_DEFLATE;
                compress.__bindgen_anon_1.deflate.huffman = dpdk_sys::rte_comp_huffman_RTE_COMP_HUFFMAN_DYNAMIC;
                compress.level = 1; // RTE_COMP_LEVEL_MIN
                compress.window_size = WINDOW_LOG2;
                compress.chksum = dpdk_sys::rte_comp_checksum_type_RTE_COMP_CHECKSUM_NONE;
            }
            Direction::Decompress => {
                xform.type_ = dpdk_sys::rte_comp_xform_type_RTE_COMP_DECOMPRESS;
                // SAFETY: writing the union's member that `type_` names.
                let decompress = unsafe { &mut xform.__bindgen_anon_1.decompress };
                decompress.algo = dpdk_sys::rte_comp_algorithm_RTE_COMP_ALGO_DEFLATE;
                decompress.window_size = WINDOW_LOG2;
                decompress.chksum = dpdk_sys::rte_comp_checksum_type_RTE_COMP_CHECKSUM_NONE;
            }
        }
        let mut private = null_mut();
        // SAFETY: the device is started; `xform` and `private` outlive the call.
        let created = unsafe { dpdk_sys::rte_compressdev_private_xform_create(self.device.id, &xform, &mut private) };
        check("rte_compressdev_private_xform_create", created)?;
        Ok(private)
    }

    /// Runs every input through the device `direction`, each output limited to `out_room`
    /// bytes (at most the device's buffer room); returns the outputs in input order.
    pub fn run(&mut self, direction: Direction, inputs: &[&[u8]], out_room: usize) -> Vec<Result<Vec<u8>, OpFailure>> {
        let mut results: Vec<Result<Vec<u8>, OpFailure>> =
            (0..inputs.len()).map(|_| Err(OpFailure::NoBuffers)).collect();
        self.run_with(direction, inputs, |_| out_room, |index, result| results[index] = result.map(<[u8]>::to_vec));
        results
    }

    /// Runs every input through the device `direction`, input i's output limited to
    /// `out_room(i)` bytes (at most the device's buffer room), and hands each result to
    /// `done` with its
    /// input's index as it comes back (in the order the device finishes them), the output
    /// borrowed from the device's buffer. Up to the queue's depth of operations are in
    /// flight at once: the thread enqueues what fits and takes back bursts of what is
    /// done, never waiting on one buffer while the device has room for more.
    pub fn run_with(
        &mut self,
        direction: Direction,
        inputs: &[&[u8]],
        out_room: impl Fn(usize) -> usize,
        mut done: impl FnMut(usize, Result<&[u8], OpFailure>),
    ) {
        let room = self.room;
        let out_room = |index: usize| out_room(index).min(room);
        let mut next = 0;
        // Each operation in flight, and the input it carries.
        let mut in_flight: Vec<(*mut dpdk_sys::rte_comp_op, usize)> = Vec::with_capacity(self.depth);
        let mut finished: [*mut dpdk_sys::rte_comp_op; BURST] = [null_mut(); BURST];
        while next < inputs.len() || !in_flight.is_empty() {
            // Enqueue what the queue has room for.
            while next < inputs.len() && in_flight.len() < self.depth {
                match self.prepare(direction, inputs[next], out_room(next)) {
                    Ok(mut op) => {
                        // SAFETY: `op` is a prepared operation of this device's pool; the
                        // queue pair is ours (`&mut self`).
                        let taken =
                            unsafe { dpdk_sys::rte_compressdev_enqueue_burst(self.device.id, self.queue, &mut op, 1) };
                        if taken == 0 {
                            // The queue is full after all: give it back, take results first.
                            self.release(op);
                            if in_flight.is_empty() {
                                done(next, Err(OpFailure::Refused));
                                next += 1;
                            }
                            break;
                        }
                        in_flight.push((op, next));
                        next += 1;
                    }
                    Err(failure) => {
                        done(next, Err(failure));
                        next += 1;
                    }
                }
            }
            // SAFETY: `finished` has room for BURST pointers; the queue pair is ours.
            let count = unsafe {
                dpdk_sys::rte_compressdev_dequeue_burst(self.device.id, self.queue, finished.as_mut_ptr(), BURST as u16)
            };
            for &op in &finished[..usize::from(count)] {
                let Some(at) = in_flight.iter().position(|(flying, _)| *flying == op) else { continue };
                let (_, index) = in_flight.swap_remove(at);
                self.finish(op, out_room(index), |result| done(index, result));
            }
            if count == 0 {
                std::hint::spin_loop();
            }
        }
    }

    /// An operation for `input`, its buffers filled, or why not.
    fn prepare(
        &mut self,
        direction: Direction,
        input: &[u8],
        out_room: usize,
    ) -> Result<*mut dpdk_sys::rte_comp_op, OpFailure> {
        if input.len() > self.room {
            return Err(OpFailure::TooLarge(input.len()));
        }
        // SAFETY: the op pool is live.
        let op = unsafe { dpdk_sys::rte_comp_op_alloc(self.ops.as_ptr()) };
        if op.is_null() {
            return Err(OpFailure::NoBuffers);
        }
        let src = self.buffer(input.len());
        let dst = self.buffer(out_room);
        // SAFETY: `op` is a fresh operation owned here until enqueued.
        let op_ref = unsafe { &mut *op };
        op_ref.m_src = src.unwrap_or(null_mut());
        op_ref.m_dst = dst.unwrap_or(null_mut());
        if src.is_none() || dst.is_none() {
            self.release(op);
            return Err(OpFailure::NoBuffers);
        }
        // SAFETY: `src` holds `input.len()` appended bytes starting at its data pointer.
        unsafe {
            let data = dpdk_sys::vm_rte_pktmbuf_mtod(op_ref.m_src).cast::<u8>();
            std::ptr::copy_nonoverlapping(input.as_ptr(), data, input.len());
        }
        op_ref.op_type = dpdk_sys::rte_comp_op_type_RTE_COMP_OP_STATELESS;
        op_ref.__bindgen_anon_1.private_xform = match direction {
            Direction::Compress => self.compress,
            Direction::Decompress => self.decompress,
        };
        op_ref.src.offset = 0;
        op_ref.src.length = input.len() as u32;
        op_ref.dst.offset = 0;
        op_ref.flush_flag = dpdk_sys::rte_comp_flush_flag_RTE_COMP_FLUSH_FINAL;
        Ok(op)
    }

    /// An mbuf of the pool with `len` bytes appended (its data length), or None.
    fn buffer(&self, len: usize) -> Option<*mut dpdk_sys::rte_mbuf> {
        // SAFETY: the pool is live.
        let mbuf = unsafe { dpdk_sys::vm_rte_pktmbuf_alloc(self.buffers.as_ptr()) };
        if mbuf.is_null() {
            return None;
        }
        // SAFETY: a fresh mbuf of a pool whose data room holds `self.room` bytes after the
        // headroom, and `len` is at most that.
        if unsafe { dpdk_sys::vm_rte_pktmbuf_append(mbuf, len as u16) }.is_null() {
            // SAFETY: the mbuf is ours, freed once.
            unsafe { dpdk_sys::vm_rte_pktmbuf_free(mbuf) };
            return None;
        }
        Some(mbuf)
    }

    /// Hands a dequeued operation's result to `done`; then its buffers and itself go back
    /// to their pools.
    fn finish(&self, op: *mut dpdk_sys::rte_comp_op, out_room: usize, done: impl FnOnce(Result<&[u8], OpFailure>)) {
        // SAFETY: a dequeued operation of ours: the device is done with it.
        let op_ref = unsafe { &*op };
        match u32::from(op_ref.status) {
            dpdk_sys::rte_comp_op_status_RTE_COMP_OP_STATUS_SUCCESS => {
                let produced = op_ref.produced as usize;
                // SAFETY: the device wrote `produced` bytes at the destination's start; the
                // buffer is released only after `done` returns.
                let out = unsafe {
                    let data = dpdk_sys::vm_rte_pktmbuf_mtod(op_ref.m_dst).cast::<u8>();
                    std::slice::from_raw_parts(data, produced)
                };
                done(Ok(out));
            }
            dpdk_sys::rte_comp_op_status_RTE_COMP_OP_STATUS_OUT_OF_SPACE_TERMINATED
            | dpdk_sys::rte_comp_op_status_RTE_COMP_OP_STATUS_OUT_OF_SPACE_RECOVERABLE => {
                done(Err(OpFailure::OutOfSpace(out_room)))
            }
            status => done(Err(OpFailure::Status(status as u8))),
        }
        self.release(op);
    }

    /// Frees an operation and its buffers.
    fn release(&self, op: *mut dpdk_sys::rte_comp_op) {
        // SAFETY: `op` is ours (never enqueued, or dequeued); each mbuf is freed once.
        unsafe {
            for mbuf in [(*op).m_src, (*op).m_dst] {
                if !mbuf.is_null() {
                    dpdk_sys::vm_rte_pktmbuf_free(mbuf);
                }
            }
            dpdk_sys::rte_comp_op_free(op);
        }
    }
}

impl Drop for Compressor {
    fn drop(&mut self) {
        // SAFETY: nothing is in flight (`run` returns only when every operation is back);
        // the transforms were made on this device and are freed once, before it stops
        // (`Device` stops it when its last queue pair is gone).
        unsafe {
            for xform in [self.compress, self.decompress] {
                if !xform.is_null() {
                    dpdk_sys::rte_compressdev_private_xform_free(self.device.id, xform);
                }
            }
            dpdk_sys::rte_mempool_free(self.ops.as_ptr());
        }
    }
}

fn check(call: &'static str, code: i32) -> Result<(), DpdkError> {
    if code < 0 {
        Err(DpdkError::from_code(call, code))
    } else {
        Ok(())
    }
}
