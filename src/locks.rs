//! Locks that a panic elsewhere cannot poison. Nothing berth keeps behind a
//! lock is left half-changed across a step that can fail (each critical
//! section is a few statements on plain data), so the data of a lock a
//! panicking thread held is still whole, and one failed request must not
//! fail every later one.

use std::sync::{Mutex, MutexGuard, PoisonError};

pub trait Lock<T> {
    /// The guard, whether or not a thread panicked while holding it.
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T> Lock<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_while_holding_it_does_not_fail_the_next_user() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("a request handler failed");
        })
        .join();
        assert!(m.is_poisoned());
        *m.locked() += 1;
        assert_eq!(*m.locked(), 2);
    }
}
