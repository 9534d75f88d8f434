//! A connection's watchers (its head deadline, idle timer and shutdown signal)
//! polled only when one of them was woken.
//!
//! A connection task is woken several times per request: the caller's bytes,
//! Tallyfy's answer, the socket taking the response. `tokio::select!` polls
//! every branch on every wake, so each watcher re-checked its sleep or its
//! cancellation token, and re-registered its waker, every time: about 0.2 µs
//! of user time per request, for futures that fire once a minute at most.
//! [`Watched`] gives its future a waker of its own, which records the wake and
//! then wakes the task; a wake meant for the connection passes it by at the cost
//! of one atomic load.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use pin_project_lite::pin_project;

pin_project! {
    /// `inner`, polled only on its own wake (or when the task's waker changed).
    pub(super) struct Watched<F> {
        #[pin]
        inner: F,
        signal: Arc<Signal>,
        // `signal` as a `Waker`, made once.
        own: Waker,
        // The task waker last handed to `signal`, to notice a new one without
        // taking its lock.
        task: Option<Waker>,
    }
}

/// What the inner future's waker does: note the wake, then wake the task.
#[derive(Default)]
struct Signal {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Some(task) = &*self.task.lock().unwrap_or_else(PoisonError::into_inner) {
            task.wake_by_ref();
        }
    }
}

impl<F: Future> Watched<F> {
    pub fn new(inner: F) -> Self {
        let signal = Arc::new(Signal::default());
        let own = Waker::from(signal.clone());
        Watched { inner, signal, own, task: None }
    }
}

impl<F: Future> Future for Watched<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let fresh = !this.task.as_ref().is_some_and(|task| task.will_wake(cx.waker()));
        if fresh {
            // First poll, or a new task: hand over its waker, and poll the
            // inner future so that it registers the signal's waker.
            *this.signal.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(cx.waker().clone());
            *this.task = Some(cx.waker().clone());
        }
        // Cleared before polling: a wake during the poll is kept for the next one.
        if !this.signal.woken.swap(false, Ordering::Acquire) && !fresh {
            return Poll::Pending;
        }
        this.inner.poll(&mut Context::from_waker(this.own))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    pin_project! {
        /// Counts its polls.
        struct Counting<F> {
            #[pin]
            inner: F,
            polls: Arc<AtomicUsize>,
        }
    }

    impl<F: Future> Future for Counting<F> {
        type Output = F::Output;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
            let this = self.project();
            this.polls.fetch_add(1, Ordering::Relaxed);
            this.inner.poll(cx)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_wake_for_the_task_does_not_poll_the_watcher_and_its_own_wake_does() {
        let polls = Arc::new(AtomicUsize::new(0));
        let sleep = Counting { inner: tokio::time::sleep(Duration::from_secs(60)), polls: polls.clone() };
        let watched = Watched::new(sleep);
        tokio::pin!(watched);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let sender = tokio::spawn(async move {
            for _ in 0..100 {
                tx.send(()).expect("receiver");
                tokio::task::yield_now().await;
            }
        });
        let mut received = 0;
        let began = tokio::time::Instant::now();
        let served = async {
            loop {
                tokio::select! {
                    () = &mut watched => break,
                    Some(()) = rx.recv() => received += 1,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(120), served).await.expect("the watcher fired");
        sender.await.expect("sender");
        assert_eq!(received, 100, "the task's own wakes were all served");
        assert_eq!(began.elapsed(), Duration::from_secs(60), "the watcher fired on time");
        assert_eq!(polls.load(Ordering::Relaxed), 2, "polled to register, then when its timer fired");
    }

    #[tokio::test(start_paused = true)]
    async fn a_watcher_moved_to_another_task_is_polled_there() {
        let watched = Box::pin(Watched::new(tokio::time::sleep(Duration::from_secs(5))));
        let mut watched = Some(watched);
        // Polled once by this task, then finished by another.
        std::future::poll_fn(|cx| {
            assert!(watched.as_mut().expect("watcher").as_mut().poll(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        let watched = watched.take().expect("watcher");
        let finished = tokio::spawn(watched);
        tokio::time::timeout(Duration::from_secs(6), finished)
            .await
            .expect("the new task was woken when the sleep ended")
            .expect("task");
    }
}
