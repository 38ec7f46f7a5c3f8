//! The drain hook: at shutdown the agent signals every subscriber (the proxies, next) and waits
//! until each has let go of its [`DrainWatch`], for at most the drain period.
//!
//! Istio's `terminationDrainDuration` (5 s by default) and ztunnel's drain work the same way:
//! listeners stop accepting, connections in flight get the period to finish, then the process
//! exits whatever is left.

use std::time::Duration;

use tokio::sync::watch;

/// The sending side, held by the agent's wiring.
#[derive(Debug)]
pub struct Drain {
    tx: watch::Sender<bool>,
    period: Duration,
}

/// One subscriber's view: hold it while there is work to finish, drop it when done.
#[derive(Clone, Debug)]
pub struct DrainWatch {
    rx: watch::Receiver<bool>,
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every subscriber let go within the period.
    Complete,
    /// The period ended with this many subscribers still holding on.
    TimedOut { remaining: usize },
}

impl Drain {
    /// A drain hook whose subscribers get `period` to finish.
    #[must_use]
    pub fn new(period: Duration) -> Self {
        Self {
            tx: watch::channel(false).0,
            period,
        }
    }

    /// A new subscriber.
    #[must_use]
    pub fn watch(&self) -> DrainWatch {
        DrainWatch {
            rx: self.tx.subscribe(),
        }
    }

    /// The drain period.
    #[must_use]
    pub fn period(&self) -> Duration {
        self.period
    }

    /// Signals every subscriber, then waits until all have dropped their watch or the period
    /// has passed, whichever comes first.
    pub async fn drain(&self) -> DrainOutcome {
        self.tx.send_replace(true);
        match tokio::time::timeout(self.period, self.tx.closed()).await {
            Ok(()) => DrainOutcome::Complete,
            Err(_) => DrainOutcome::TimedOut {
                remaining: self.tx.receiver_count(),
            },
        }
    }
}

impl DrainWatch {
    /// Whether the drain has started.
    #[must_use]
    pub fn is_draining(&self) -> bool {
        *self.rx.borrow()
    }

    /// Completes when the drain starts (at once if it has). Also completes if the [`Drain`] is
    /// gone: nothing is left to wait for.
    pub async fn signaled(&mut self) {
        let _ = self.rx.wait_for(|draining| *draining).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_subscribers_but_never_longer_than_the_period() {
        let drain = Drain::new(Duration::from_secs(5));
        let mut quick = drain.watch();
        let finished = tokio::spawn(async move {
            quick.signaled().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(quick);
        });
        let started = tokio::time::Instant::now();
        assert_eq!(drain.drain().await, DrainOutcome::Complete);
        assert_eq!(started.elapsed(), Duration::from_millis(200));
        finished.await.unwrap();

        let drain = Drain::new(Duration::from_secs(5));
        let stuck = drain.watch();
        let started = tokio::time::Instant::now();
        assert_eq!(drain.drain().await, DrainOutcome::TimedOut { remaining: 1 });
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert!(stuck.is_draining());
    }
}
