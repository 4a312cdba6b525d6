//! How an accept or receive loop waits after its socket fails, instead of
//! spinning: the DNS relay's sockets, the token listener.

use std::time::Duration;

/// The wait after a failed receive or accept (out of descriptors or
/// buffers, say): 10 ms, doubling up to 1 s, from 10 ms again once one
/// succeeds.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::new()
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    pub fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    /// The wait now, and a longer one the next time.
    pub fn step(&mut self) -> Duration {
        let now = self.next;
        self.next = (now * 2).min(Self::MAX);
        now
    }

    pub async fn wait(&mut self) {
        tokio::time::sleep(self.step()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_doubling_to_a_second_and_start_over_on_success() {
        let mut b = Backoff::new();
        let waits: Vec<u64> = (0..9).map(|_| b.step().as_millis() as u64).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        assert_eq!(b.step(), Duration::from_millis(10));
    }
}
