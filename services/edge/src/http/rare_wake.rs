//! A waker for a task's rare wake-ups ([`RareWake`]): what a stream waits on
//! besides its data (its kill switch, the node going away, timers, the
//! client hanging up) is polled with it, and polled again only after it
//! fired. A stream woken by its data alone then polls its data alone:
//! polling a cancellation token or a `Notify` takes a lock, and an idle
//! wait polled at every event was a measurable part of each delivery.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Records that a rare wait may be ready and wakes the task.
pub(crate) struct RareWake {
    shared: Arc<Shared>,
    waker: Waker,
}

struct Shared {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl RareWake {
    /// Woken from the start: every rare wait is polled once, to register.
    pub(crate) fn new() -> Self {
        let shared = Arc::new(Shared {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(Arc::clone(&shared));
        RareWake { shared, waker }
    }

    /// Whether a rare wait woke since the last call (then poll them all,
    /// with [`RareWake::context`]); the task to wake next is `cx`'s.
    pub(crate) fn woken(&self, cx: &Context<'_>) -> bool {
        // Registered first, so a wake between the two is not lost.
        self.shared.task.register(cx.waker());
        self.shared.woken.swap(false, Ordering::AcqRel)
    }

    /// The context to poll rare waits with.
    pub(crate) fn context(&self) -> Context<'_> {
        Context::from_waker(&self.waker)
    }

    /// Polls every rare wait again at the next wake-up (one was ready, or a
    /// timer was reset after it fired).
    pub(crate) fn rearm(&self) {
        self.shared.woken.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::Poll;

    fn noop_context() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    #[tokio::test]
    async fn a_rare_wait_is_polled_once_then_again_only_after_it_woke() {
        let rare = RareWake::new();
        let cx = noop_context();
        let notify = tokio::sync::Notify::new();
        let mut waiting = pin!(notify.notified());
        assert!(rare.woken(&cx), "polled once at first");
        assert!(waiting.as_mut().poll(&mut rare.context()).is_pending());
        assert!(!rare.woken(&cx), "nothing woke it");
        notify.notify_waiters();
        assert!(rare.woken(&cx), "its notification woke it");
        assert_eq!(waiting.as_mut().poll(&mut rare.context()), Poll::Ready(()));
        assert!(!rare.woken(&cx));
        rare.rearm();
        assert!(rare.woken(&cx), "rearmed");
    }

    #[tokio::test]
    async fn the_task_polling_it_is_woken_by_a_rare_wait() {
        let rare = Arc::new(RareWake::new());
        let notify = Arc::new(tokio::sync::Notify::new());
        let task = {
            let (rare, notify) = (Arc::clone(&rare), Arc::clone(&notify));
            tokio::spawn(async move {
                let mut waiting = pin!(notify.notified());
                std::future::poll_fn(|cx| {
                    if rare.woken(cx) && waiting.as_mut().poll(&mut rare.context()).is_ready() {
                        return Poll::Ready(());
                    }
                    Poll::Pending
                })
                .await
            })
        };
        // Notified until the task has registered (bounded by the timeout).
        let woke = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            let mut task = pin!(task);
            loop {
                notify.notify_waiters();
                tokio::select! {
                    done = &mut task => return done.is_ok(),
                    _ = tokio::time::sleep(std::time::Duration::from_millis(10)) => {}
                }
            }
        })
        .await;
        assert_eq!(woke, Ok(true));
    }
}
