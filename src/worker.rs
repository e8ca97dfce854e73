//! Worker threads: the data plane runs on N threads, each with its own single-threaded tokio runtime,
//! the way NGINX workers and Envoy/HAProxy threads each own an event loop.
//!
//! Why not one multi-threaded runtime: a proxied call is a chain of small wake-ups (client connection
//! → call task → upstream connection → call task → client connection). On tokio's work-stealing
//! scheduler the woken connection task runs at once from the LIFO slot and flushes a socket write for
//! every stream that queued a frame; on a single-threaded runtime woken tasks queue in FIFO order, so
//! a connection task writes the frames of every call that became ready in one `writev`. On the
//! benchmark's unary load that cut write syscalls from ~1.5 to ~0.2 per call and CPU per call by a
//! quarter. A worker also needs no atomics to schedule its own tasks.
//!
//! Each listener's accept loop runs on a worker too. An accepted connection goes to the next worker
//! (round-robin) and stays there with all of its calls; when that is the accepting worker itself (always,
//! with one worker) the socket never leaves its reactor. Upstream connections belong to the worker that
//! opened them (see [`current`] and `upstream::Pool`), so a call never crosses threads. The control
//! plane (admin, health checks, signals, reloads) stays on the runtime that started the gateway.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(NOT_A_WORKER) };
}

/// [`current`] on a thread that is not a worker (tests, the control runtime).
pub const NOT_A_WORKER: usize = usize::MAX;

/// The index of the worker this thread is, or [`NOT_A_WORKER`].
pub fn current() -> usize {
    CURRENT.with(|c| c.get())
}

/// Keeps the worker from sleeping: a task that always yields makes the current-thread scheduler poll
/// the reactor with a zero timeout between rounds, so an arriving packet finds the thread running
/// instead of paying a wake-up (on a VM, an IPI and a vCPU exit: tens of µs per hop of a proxied
/// call). HAProxy's `busy-polling` trades a full CPU for the same latency.
async fn spin() {
    loop {
        tokio::task::yield_now().await;
    }
}

/// A set of worker threads; dropping it stops them (tasks still running on them are dropped).
pub struct Workers {
    spawner: Spawner,
    /// Dropping a sender ends its worker's `block_on`.
    _stop: Vec<oneshot::Sender<()>>,
}

/// Spawns onto the workers, round-robin. Unlike [`Workers`] it does not keep them running, so a task
/// on a worker (an accept loop) may hold one: dropping the `Workers` still stops every thread.
#[derive(Clone)]
pub struct Spawner {
    handles: Arc<[Handle]>,
    next: Arc<AtomicUsize>,
}

impl Spawner {
    /// The worker the next connection goes to.
    pub fn next_worker(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len()
    }

    /// Runs `task` on worker `index`. Futures do nothing until polled, so whatever the task registers
    /// with the reactor (a socket from `TcpStream::from_std`) belongs to that worker.
    pub fn spawn_on(&self, index: usize, task: impl Future<Output = ()> + Send + 'static) {
        self.handles[index].spawn(task);
    }
}

impl Workers {
    /// Starts `count` workers; 0 means one per CPU this process may run on (its affinity mask, so
    /// `taskset -c 1` gives one). With `busy_poll` each worker polls the reactor with a zero timeout
    /// instead of sleeping in `epoll_wait` (see [`spin`]).
    pub fn start(count: usize, busy_poll: bool) -> io::Result<Workers> {
        let count = match count {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let mut handles = Vec::with_capacity(count);
        let mut stop = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let (tx, rx) = oneshot::channel::<()>();
            stop.push(tx);
            std::thread::Builder::new()
                .name(format!("grpcgate-worker-{index}"))
                .spawn(move || {
                    CURRENT.with(|c| c.set(index));
                    // Ok or Err: the sender sent or was dropped; either way, stop.
                    if busy_poll {
                        runtime.block_on(async {
                            tokio::select! {
                                _ = rx => {}
                                _ = spin() => {}
                            }
                        });
                    } else {
                        let _ = runtime.block_on(rx);
                    }
                })?;
        }
        Ok(Workers {
            spawner: Spawner {
                handles: handles.into(),
                next: Arc::new(AtomicUsize::new(0)),
            },
            _stop: stop,
        })
    }

    /// How many workers run.
    pub fn len(&self) -> usize {
        self.spawner.handles.len()
    }

    /// Always false: there is at least one worker.
    pub fn is_empty(&self) -> bool {
        self.spawner.handles.is_empty()
    }

    /// Runs `task` on the next worker (round-robin); see [`Spawner::spawn_on`].
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let s = &self.spawner;
        s.spawn_on(s.next_worker(), task);
    }

    /// A spawner for tasks that run on the workers themselves.
    pub fn spawner(&self) -> Spawner {
        self.spawner.clone()
    }
}
