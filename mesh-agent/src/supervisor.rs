//! Supervision of discovery sources: each runs as its own task; when it ends, fails or panics the
//! agent is told (it turns unready with the reason) and the source is restarted after an
//! exponential backoff, until the agent drains.

use std::{future::Future, time::Duration};

use tokio::{sync::mpsc, time::Instant};
use tracing::{error, info};

use crate::{config::RESTART_BACKOFF_RESET_AFTER, discovery::Update, drain::DrainWatch};

/// What a supervised source tells the agent.
#[derive(Debug)]
pub enum SourceEvent {
    /// The source (re)started.
    Started { source: &'static str, restarts: u32 },
    /// An update from the source.
    Update {
        source: &'static str,
        update: Update,
    },
    /// The source stopped; it is restarted after `retry_in`.
    Down {
        source: &'static str,
        restarts: u32,
        reason: String,
        retry_in: Duration,
    },
}

/// Restart delays: `initial`, doubled per failure up to `max`; back to `initial` after a source
/// ran for [`RESTART_BACKOFF_RESET_AFTER`].
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

/// Runs `start` as `source` until the drain starts or the agent stops listening, restarting it
/// whenever it returns or panics. `start` gets the channel its run sends updates on.
pub async fn supervise<F, Fut, E>(
    source: &'static str,
    backoff: Backoff,
    events: mpsc::Sender<SourceEvent>,
    mut drain: DrainWatch,
    mut start: F,
) where
    F: FnMut(mpsc::Sender<Update>) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let mut delay = backoff.initial;
    let mut restarts = 0;
    loop {
        if events
            .send(SourceEvent::Started { source, restarts })
            .await
            .is_err()
        {
            return;
        }
        let (tx, mut rx) = mpsc::channel(16);
        let mut task = tokio::spawn(start(tx));
        let began = Instant::now();
        let mut open = true;
        let joined = loop {
            tokio::select! {
                biased;
                () = drain.signaled() => {
                    task.abort();
                    return;
                }
                update = rx.recv(), if open => match update {
                    Some(update) => {
                        if events.send(SourceEvent::Update { source, update }).await.is_err() {
                            task.abort();
                            return;
                        }
                    }
                    None => open = false,
                },
                joined = &mut task => break joined,
            }
        };
        // What the run sent before it stopped still counts.
        while let Ok(update) = rx.try_recv() {
            if events
                .send(SourceEvent::Update { source, update })
                .await
                .is_err()
            {
                return;
            }
        }
        let reason = match joined {
            Ok(Ok(())) => "ended".to_owned(),
            Ok(Err(e)) => format!("failed: {e}"),
            Err(e) if e.is_panic() => format!("panicked: {}", panic_message(&*e.into_panic())),
            Err(e) => format!("stopped: {e}"),
        };
        if began.elapsed() >= RESTART_BACKOFF_RESET_AFTER {
            delay = backoff.initial;
        }
        error!(source, %reason, retry_in = ?delay, "discovery source stopped; restarting after a backoff");
        let down = SourceEvent::Down {
            source,
            restarts,
            reason,
            retry_in: delay,
        };
        if events.send(down).await.is_err() {
            return;
        }
        tokio::select! {
            () = drain.signaled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(backoff.max);
        restarts += 1;
        info!(source, restarts, "restarting discovery source");
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic".to_owned())
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };

    use super::*;
    use crate::{drain::Drain, model::ClusterModel};

    #[tokio::test(start_paused = true)]
    async fn a_panicking_source_is_reported_and_restarted_with_growing_delays() {
        let (tx, mut rx) = mpsc::channel(16);
        let drain = Drain::new(Duration::from_secs(1));
        let runs = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&runs);
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(250),
        };
        let sup = tokio::spawn(supervise(
            "test",
            backoff,
            tx,
            drain.watch(),
            move |updates| {
                let run = counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    updates
                        .send(Update::Model(ClusterModel::default()))
                        .await
                        .map_err(|e| e.to_string())?;
                    match run {
                        0 => panic!("boom"),
                        1 => Err("watch failed".to_owned()),
                        _ => Ok(()),
                    }
                }
            },
        ));
        let mut seen = Vec::new();
        let started = Instant::now();
        while seen.len() < 9 {
            let ev = rx.recv().await.unwrap();
            seen.push(match ev {
                SourceEvent::Started { restarts, .. } => format!("started {restarts}"),
                SourceEvent::Update { .. } => "update".to_owned(),
                SourceEvent::Down {
                    reason, retry_in, ..
                } => format!("down {reason} {}ms", retry_in.as_millis()),
            });
        }
        assert_eq!(
            seen,
            [
                "started 0",
                "update",
                "down panicked: boom 100ms",
                "started 1",
                "update",
                "down failed: watch failed 200ms",
                "started 2",
                "update",
                "down ended 250ms",
            ]
        );
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        drop(rx);
        assert_eq!(drain.drain().await, crate::drain::DrainOutcome::Complete);
        sup.await.unwrap();
    }
}
