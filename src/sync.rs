//! Locking shared by every module that holds a `std::sync::Mutex`.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, taking over the guard if a panic poisoned it. Every mutex in breakwater
/// guards data that each critical section leaves usable even if it panics (buffers,
/// queues, connection slots, state words), and the rescue boundary answers a panicking
/// request without taking the process down: a poisoned lock must not turn one panic
/// into a failure of every later request.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
