//! The process's compute threads: one budget that every llama.cpp step of every generation
//! takes its threads from (THREAD_SAFETY_PATTERNS.md §9).
//!
//! Why: llama.cpp's CPU backend (built here without OpenMP) runs each decode on a pool of
//! `n_threads` threads that meet at a spinning barrier after every node of the graph. Two
//! generations that each decode with as many threads as the machine has cores put twice as many
//! spinning threads on the cores as there are cores; a thread preempted inside a step leaves the
//! others spinning for a scheduler time slice, at every barrier. Two 96-token answers then took
//! 79 s where one took 2.5 s (issue 23). With the budget, at most [`ComputeBudget::threads`]
//! compute threads run at once in the process, so N generations at once take about N times one.
//!
//! A step (decoding a batch, and sampling the token that follows it) holds a [`ComputeLease`]
//! for the threads its context decodes with; waiters are served in the order they asked
//! (first come, first served), so generations interleave step by step and none starves. A lease
//! is never held across anything that waits on something else (a slow client, a lock).

use std::num::NonZeroUsize;
use std::sync::{Condvar, Mutex, OnceLock, PoisonError};

/// A counting semaphore of compute threads, served in order of arrival.
#[derive(Debug)]
pub struct ComputeBudget {
    threads: usize,
    state: Mutex<Queue>,
    turn: Condvar,
}

#[derive(Debug)]
struct Queue {
    free: usize,
    /// The ticket the next caller of `acquire` takes.
    next: u64,
    /// The ticket served next: every earlier one has its lease.
    serving: u64,
}

/// Threads taken from a [`ComputeBudget`], given back when dropped.
#[derive(Debug)]
#[must_use = "the threads are given back when the lease is dropped"]
pub struct ComputeLease<'a> {
    budget: &'a ComputeBudget,
    threads: usize,
}

impl ComputeLease<'_> {
    /// How many threads this lease holds.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

impl Drop for ComputeLease<'_> {
    fn drop(&mut self) {
        let mut queue = self.budget.lock();
        queue.free += self.threads;
        debug_assert!(queue.free <= self.budget.threads);
        drop(queue);
        self.budget.turn.notify_all();
    }
}

impl ComputeBudget {
    pub fn new(threads: NonZeroUsize) -> ComputeBudget {
        ComputeBudget {
            threads: threads.get(),
            state: Mutex::new(Queue {
                free: threads.get(),
                next: 0,
                serving: 0,
            }),
            turn: Condvar::new(),
        }
    }

    /// The threads in the budget.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Waits for its turn and for `want` threads (at least 1, at most the budget), and takes them.
    pub fn acquire(&self, want: usize) -> ComputeLease<'_> {
        let want = want.clamp(1, self.threads);
        let mut queue = self.lock();
        let ticket = queue.next;
        queue.next += 1;
        while queue.serving != ticket || queue.free < want {
            queue = self
                .turn
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
        }
        queue.free -= want;
        queue.serving += 1;
        drop(queue);
        // The next in line may fit in what is left.
        self.turn.notify_all();
        ComputeLease {
            budget: self,
            threads: want,
        }
    }

    /// Threads not leased now.
    pub fn free(&self) -> usize {
        self.lock().free
    }

    /// The counters stay consistent across a panic (each change is one statement), so a
    /// poisoned lock is recovered. Held for a few instructions, never while waiting on anything
    /// but the condition variable.
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The budget of this process: as many threads as the machine gives it
/// (`std::thread::available_parallelism`, which counts CPU affinity and cgroup quotas).
pub fn compute_budget() -> &'static ComputeBudget {
    static BUDGET: OnceLock<ComputeBudget> = OnceLock::new();
    BUDGET.get_or_init(|| {
        ComputeBudget::new(std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn budget(n: usize) -> Arc<ComputeBudget> {
        Arc::new(ComputeBudget::new(NonZeroUsize::new(n).unwrap()))
    }

    /// Callers waiting for their turn now (a test's view of the queue).
    fn waiting(b: &ComputeBudget) -> u64 {
        let queue = b.lock();
        queue.next - queue.serving
    }

    fn until(mut condition: impl FnMut() -> bool) {
        while !condition() {
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_lease_takes_at_least_one_and_at_most_the_budget_and_gives_them_back() {
        let b = budget(4);
        let one = b.acquire(0);
        assert_eq!(one.threads(), 1);
        assert_eq!(b.free(), 3);
        drop(one);
        let all = b.acquire(9);
        assert_eq!(all.threads(), 4);
        assert_eq!(b.free(), 0);
        drop(all);
        assert_eq!(b.free(), 4);
    }

    #[test]
    fn never_more_threads_at_once_than_the_budget() {
        let b = budget(3);
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let workers: Vec<_> = (0..6)
            .map(|i| {
                let (b, now, most) = (Arc::clone(&b), Arc::clone(&now), Arc::clone(&most));
                std::thread::spawn(move || {
                    for _ in 0..300 {
                        let lease = b.acquire(1 + i % 3);
                        let held =
                            now.fetch_add(lease.threads(), Ordering::SeqCst) + lease.threads();
                        most.fetch_max(held, Ordering::SeqCst);
                        std::thread::yield_now();
                        now.fetch_sub(lease.threads(), Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        assert!(most.load(Ordering::SeqCst) <= 3, "{most:?} threads at once");
        assert_eq!(b.free(), 3);
    }

    #[test]
    fn waiters_are_served_in_order_so_a_large_step_is_never_overtaken() {
        let b = budget(2);
        let first = b.acquire(1);
        let order = Arc::new(Mutex::new(Vec::new()));
        let wants_two = {
            let (b, order) = (Arc::clone(&b), Arc::clone(&order));
            std::thread::spawn(move || {
                let _lease = b.acquire(2);
                order.lock().unwrap().push("two");
            })
        };
        until(|| waiting(&b) == 1);
        let wants_one = {
            let (b, order) = (Arc::clone(&b), Arc::clone(&order));
            std::thread::spawn(move || {
                let _lease = b.acquire(1);
                order.lock().unwrap().push("one");
            })
        };
        until(|| waiting(&b) == 2);
        // One thread is free and the later caller wants one: it still waits its turn.
        assert_eq!(b.free(), 1);
        assert!(order.lock().unwrap().is_empty());
        drop(first);
        wants_two.join().unwrap();
        wants_one.join().unwrap();
        assert_eq!(*order.lock().unwrap(), ["two", "one"]);
    }
}
