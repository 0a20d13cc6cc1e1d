//! The state a zygote shares with its workers: a `MAP_SHARED` page of
//! atomics (see the zygote's module doc for the protocol).

use std::sync::atomic::{AtomicU32, AtomicU64};

/// One worker's place in the shared pool state.
#[derive(Debug, Default)]
#[repr(C)]
pub(crate) struct Slot {
    /// `pool.concurrency` permits in use right now: one per instance
    /// running, that is per http request (HTTP/1 request or HTTP/2 stream)
    /// or stdio connection. Idle connections do not count: the zygote forks
    /// on requests, not on clients that hold a socket open.
    pub(crate) in_flight: AtomicU32,
    /// 1 once the worker has taken itself out of `live` (idle or
    /// max-requests retirement): it accepts nothing more.
    pub(crate) retiring: AtomicU32,
    /// Requests (http) or connections (stdio) served.
    pub(crate) served: AtomicU64,
    /// Connections the worker holds open (idle ones too): what accepts are
    /// balanced on (a worker past its share leaves the next accept to the
    /// others).
    pub(crate) connections: AtomicU32,
    /// 1 while the worker's accept loops run.
    pub(crate) accepting: AtomicU32,
}

/// The head of the shared pool state.
#[derive(Debug, Default)]
#[repr(C)]
pub(crate) struct PoolHeader {
    /// Workers that accept (forked and not retiring).
    pub(crate) live: AtomicU32,
    /// 1: every worker stops accepting and exits when done.
    pub(crate) draining: AtomicU32,
}

/// A [`PoolHeader`] and its [`Slot`]s in memory shared with every process
/// forked after it was made.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SharedPool {
    header: &'static PoolHeader,
    slots: &'static [Slot],
}

impl SharedPool {
    pub(crate) fn new(slots: usize) -> std::io::Result<SharedPool> {
        let (header, slots) = crate::sys::map_pool(slots)?;
        Ok(SharedPool { header, slots })
    }

    pub(crate) fn header(&self) -> &'static PoolHeader {
        self.header
    }

    pub(crate) fn slots(&self) -> &'static [Slot] {
        self.slots
    }
}
