//! An SSE client that behaves like a browser's `EventSource`: when its stream
//! ends or its connection fails, it reconnects to the same URL (usually a load
//! balancer) with `Last-Event-ID`, and it records every event and every HTTP
//! status it was answered with, so a test can check that nothing was lost,
//! duplicated or reordered, and that no answer would have made a browser give
//! up (anything but 200).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_protocol::sse::{Item, ParsedEvent};
use tokio_util::sync::CancellationToken;

use crate::{SseClient, subscriber_token};

/// A background client; stops when [`ResumingClient::stop`] is called or it is
/// dropped.
#[derive(Debug)]
pub struct ResumingClient {
    record: Arc<Record>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Record {
    events: Mutex<Vec<ParsedEvent>>,
    statuses: Mutex<Vec<u16>>,
    /// Streams that reached the client with a 200.
    streams: AtomicUsize,
}

/// The longest a client waits before reconnecting (the server's `retry:` hint
/// is followed up to this, to keep tests short).
const MAX_RETRY: Duration = Duration::from_millis(300);

impl ResumingClient {
    /// Starts reading `user`'s stream at `url` (e.g. `http://lb/v1/stream`).
    pub fn spawn(url: String, user: &str) -> ResumingClient {
        let record = Arc::new(Record::default());
        let stop = CancellationToken::new();
        let token = subscriber_token(user, &[]);
        let task = tokio::spawn(run(url, token, Arc::clone(&record), stop.clone()));
        ResumingClient {
            record,
            stop,
            task: Some(task),
        }
    }

    /// Events received so far, in order.
    pub fn events(&self) -> Vec<ParsedEvent> {
        lock(&self.record.events).clone()
    }

    /// The `data` of every event received so far, in order.
    pub fn data(&self) -> Vec<String> {
        lock(&self.record.events)
            .iter()
            .map(|e| e.data.clone())
            .collect()
    }

    /// How many events were received so far.
    pub fn received(&self) -> usize {
        lock(&self.record.events).len()
    }

    /// Every HTTP status the client was answered with.
    pub fn statuses(&self) -> Vec<u16> {
        lock(&self.record.statuses).clone()
    }

    /// Streams opened (the first one and every reconnection).
    pub fn streams(&self) -> usize {
        self.record.streams.load(Ordering::Relaxed)
    }

    /// Stops the client and waits for its task.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ResumingClient {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

async fn run(url: String, token: String, record: Arc<Record>, stop: CancellationToken) {
    let auth = format!("Bearer {token}");
    let mut last_event_id = String::new();
    let mut retry = Duration::from_millis(50);
    loop {
        let mut headers = vec![("authorization", auth.as_str())];
        if !last_event_id.is_empty() {
            headers.push(("last-event-id", last_event_id.as_str()));
        }
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            connected = SseClient::connect(&url, &headers) => connected,
        };
        if let Ok(mut client) = connected {
            lock(&record.statuses).push(client.status);
            if client.status == 200 {
                record.streams.fetch_add(1, Ordering::Relaxed);
                loop {
                    let item = tokio::select! {
                        _ = stop.cancelled() => return,
                        item = client.next_item(Duration::from_secs(3600)) => item,
                    };
                    match item {
                        Ok(Some(Item::Event(event))) => lock(&record.events).push(event),
                        Ok(Some(Item::Retry(ms))) => {
                            retry = Duration::from_millis(ms).min(MAX_RETRY)
                        }
                        Ok(Some(Item::Comment(_))) => {}
                        Ok(None) | Err(_) => break,
                    }
                }
                if !client.last_event_id().is_empty() {
                    last_event_id = client.last_event_id().to_string();
                }
            } else {
                // A browser would give up here; the test sees the status.
                return;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(retry) => {}
        }
    }
}
