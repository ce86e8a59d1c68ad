//! Byte streams multiplexed over one WebSocket, with per-stream credit flow control.
//!
//! Bodies (proxied HTTP requests and responses) travel as binary frames:
//! `[kind: u8][stream id: u32 big-endian][payload]`. A sender may have at most
//! [`INITIAL_WINDOW`] data frames of a stream unacknowledged; the receiver returns credit
//! with `WINDOW` frames as its consumer takes chunks. So one stream whose consumer is slow
//! stops only itself — the connection keeps carrying every other stream — and each side
//! buffers at most `INITIAL_WINDOW × MAX_CHUNK` bytes per stream, whatever the body size.
//!
//! This crate owns the stream table and its flow control; the frames' layout and codec
//! are `adi_protocol::frame`, with the other wire formats. It never touches a socket:
//! the connection's owner feeds it inbound binary frames ([`Streams::on_frame`]) and
//! writes the frames it produces (the `outbound` channel given to [`Streams::new`]).
//!
//! Layout: this file, the stream table ([`Streams`]) and each stream's ends
//! ([`BodySender`], [`BodyReceiver`], [`splice`]); [`batch`], how a socket's writer
//! batches the frames it carries, the same on both ends.

pub mod batch;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use adi_protocol::frame::{encode, whole, Frame, Kind, MAX_CHUNK};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Semaphore};

/// Data frames a sender may have in flight per stream before it waits for credit.
pub const INITIAL_WINDOW: u32 = 16;
/// Credit is returned in batches of this many frames, to keep WINDOW frames rare.
const CREDIT_BATCH: u32 = INITIAL_WINDOW / 4;

/// Why a stream ended early.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The peer abandoned the stream.
    #[error("stream reset by peer: {0}")]
    Reset(String),
    /// The connection carrying the stream ended.
    #[error("the connection carrying the stream closed")]
    ConnectionClosed,
    /// The peer sent more than its credit allowed.
    #[error("the peer overran its flow-control window")]
    Overrun,
}

struct Slot {
    incoming: Option<mpsc::Sender<Result<Bytes, StreamError>>>,
    credit: Arc<Semaphore>,
    /// Turns true when the peer stops reading this side's body; dropped (which its
    /// receivers see the same way) when the connection closes.
    stopped: watch::Sender<bool>,
    sending: bool,
}

struct Inner {
    slots: Mutex<HashMap<u32, Slot>>,
    outbound: mpsc::Sender<Bytes>,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Slot>> {
        // A panic while holding this lock leaves plain data behind; keep using it.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets a stream once neither direction uses it any more.
    fn retire(&self, id: u32, receiving_done: bool, sending_done: bool) {
        let mut slots = self.lock();
        if let Some(slot) = slots.get_mut(&id) {
            if receiving_done {
                slot.incoming = None;
            }
            if sending_done {
                slot.sending = false;
            }
            if slot.incoming.is_none() && !slot.sending {
                slots.remove(&id);
            }
        }
    }
}

/// The open streams of one connection.
#[derive(Clone)]
pub struct Streams {
    inner: Arc<Inner>,
}

impl Streams {
    /// A table whose frames go to `outbound`, to be written on the socket as binary
    /// frames. Bounded: writers wait when the socket does not keep up.
    pub fn new(outbound: mpsc::Sender<Bytes>) -> Self {
        Streams {
            inner: Arc::new(Inner {
                slots: Mutex::new(HashMap::new()),
                outbound,
            }),
        }
    }

    /// Opens stream `id` in both directions. Opening an id that is still open
    /// replaces it; callers allocate fresh ids.
    pub fn open(&self, id: u32) -> (BodyReceiver, BodySender) {
        let (tx, rx) = mpsc::channel(INITIAL_WINDOW as usize + 2);
        let credit = Arc::new(Semaphore::new(INITIAL_WINDOW as usize));
        let (stopped, stopped_rx) = watch::channel(false);
        self.inner.lock().insert(
            id,
            Slot {
                incoming: Some(tx),
                credit: credit.clone(),
                stopped,
                sending: true,
            },
        );
        (
            BodyReceiver {
                id,
                rx,
                inner: self.inner.clone(),
                consumed: 0,
                done: false,
            },
            BodySender {
                id,
                credit,
                stopped: stopped_rx,
                inner: self.inner.clone(),
                done: false,
            },
        )
    }

    /// Number of open streams.
    pub fn len(&self) -> usize {
        self.inner.lock().len()
    }

    /// Whether no stream is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Routes one inbound frame. Frames of unknown streams are ignored (they belong to
    /// streams already finished on this side). Never blocks.
    pub fn on_frame(&self, frame: Frame) {
        let mut slots = self.inner.lock();
        let Some(slot) = slots.get_mut(&frame.stream) else {
            return;
        };
        match frame.kind {
            Kind::Data => {
                if let Some(tx) = &slot.incoming {
                    if tx.try_send(Ok(frame.payload)).is_err() {
                        // Either the peer ignored its credit or our consumer is gone.
                        let _ = tx.try_send(Err(StreamError::Overrun));
                        slot.incoming = None;
                        let _ = self.inner.outbound.try_send(encode(
                            Kind::Stop,
                            frame.stream,
                            b"flow-control window overrun",
                        ));
                    }
                }
            }
            Kind::End => {
                slot.incoming = None;
            }
            Kind::Whole => {
                // The head is the connection owner's business; the body ends here.
                if let Some(tx) = slot.incoming.take() {
                    let (_, body) = frame.split_whole();
                    if !body.is_empty() {
                        let _ = tx.try_send(Ok(body));
                    }
                }
            }
            Kind::Reset => {
                let reason = String::from_utf8_lossy(&frame.payload).into_owned();
                if let Some(tx) = slot.incoming.take() {
                    let _ = tx.try_send(Err(StreamError::Reset(reason)));
                }
            }
            Kind::Stop => {
                slot.credit.close();
                slot.stopped.send_replace(true);
                slot.sending = false;
            }
            Kind::Window => {
                let n = u32::from_be_bytes([
                    frame.payload[0],
                    frame.payload[1],
                    frame.payload[2],
                    frame.payload[3],
                ]);
                let room = Semaphore::MAX_PERMITS.saturating_sub(slot.credit.available_permits());
                slot.credit.add_permits((n as usize).min(room));
            }
        }
        if slot.incoming.is_none() && !slot.sending {
            slots.remove(&frame.stream);
        }
    }

    /// Ends every stream: the connection is gone.
    pub fn close_all(&self) {
        let mut slots = self.inner.lock();
        for (_, slot) in slots.drain() {
            if let Some(tx) = slot.incoming {
                let _ = tx.try_send(Err(StreamError::ConnectionClosed));
            }
            slot.credit.close();
            slot.stopped.send_replace(true);
        }
    }
}

/// The receiving half of a stream: chunks in order, then `None` at the end.
pub struct BodyReceiver {
    id: u32,
    rx: mpsc::Receiver<Result<Bytes, StreamError>>,
    inner: Arc<Inner>,
    consumed: u32,
    done: bool,
}

impl BodyReceiver {
    /// The next chunk; `None` once the peer ended the body. Returns credit to the
    /// peer as chunks are taken.
    pub async fn recv(&mut self) -> Option<Result<Bytes, StreamError>> {
        let item = self.rx.recv().await;
        match &item {
            Some(Ok(_)) => {
                self.consumed += 1;
                if self.consumed >= CREDIT_BATCH {
                    let n = std::mem::take(&mut self.consumed);
                    let _ = self
                        .inner
                        .outbound
                        .send(encode(Kind::Window, self.id, &n.to_be_bytes()))
                        .await;
                }
            }
            Some(Err(_)) | None => {
                self.done = true;
                self.inner.retire(self.id, true, false);
            }
        }
        item
    }

    /// The stream id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Forgets this body without telling the peer: for a body the peer will never
    /// send (the head said it is empty) or already sent whole.
    pub fn finish_implied(mut self) {
        self.done = true;
        self.inner.retire(self.id, true, false);
    }
}

impl Drop for BodyReceiver {
    fn drop(&mut self) {
        if !self.done {
            // Nobody reads this body any more (the client went away, or it read all
            // it wanted): tell the peer to stop sending.
            let _ =
                self.inner
                    .outbound
                    .try_send(encode(Kind::Stop, self.id, b"receiver went away"));
            self.inner.retire(self.id, true, false);
        }
    }
}

/// The sending half of a stream.
pub struct BodySender {
    id: u32,
    credit: Arc<Semaphore>,
    stopped: watch::Receiver<bool>,
    inner: Arc<Inner>,
    done: bool,
}

impl BodySender {
    /// Sends a chunk (split into frames of at most [`MAX_CHUNK`]), waiting for credit
    /// and for room on the connection. Fails once the peer stopped reading.
    pub async fn send(&mut self, mut chunk: Bytes) -> Result<(), StreamError> {
        while !chunk.is_empty() {
            let piece = chunk.split_to(chunk.len().min(MAX_CHUNK));
            let permit = self
                .credit
                .acquire()
                .await
                .map_err(|_| StreamError::Reset("stream closed".into()))?;
            permit.forget();
            self.inner
                .outbound
                .send(encode(Kind::Data, self.id, &piece))
                .await
                .map_err(|_| StreamError::ConnectionClosed)?;
        }
        Ok(())
    }

    /// Resolves once nobody will read this body: the peer stopped reading (its client
    /// went away) or the connection closed. Lets a producer that is still waiting for
    /// its first byte, or between two chunks, give up instead of waiting on.
    pub async fn stopped(&self) {
        let mut stopped = self.stopped.clone();
        // An error means the slot is gone, which happens only with the connection.
        let _ = stopped.wait_for(|s| *s).await;
    }

    /// Ends the body.
    pub async fn finish(self) -> Result<(), StreamError> {
        let end = encode(Kind::End, self.id, &[]);
        self.end_with(end).await
    }

    /// Ends the body with `frame` as its last frame, unless the peer stopped reading.
    async fn end_with(mut self, frame: Bytes) -> Result<(), StreamError> {
        self.done = true;
        self.inner.retire(self.id, false, true);
        if self.credit.is_closed() {
            return Err(StreamError::Reset("stream closed".into()));
        }
        self.inner
            .outbound
            .send(frame)
            .await
            .map_err(|_| StreamError::ConnectionClosed)
    }

    /// Ends an empty body without a frame: for when the head already told the peer
    /// that no body follows.
    pub fn finish_implied(mut self) {
        self.done = true;
        self.inner.retire(self.id, false, true);
    }

    /// Sends `head` and the complete `body` in one frame and ends the body. Check
    /// [`fits_whole`] first: a pair that does not fit is refused with `Overrun`.
    pub async fn send_whole(self, head: &[u8], body: &[u8]) -> Result<(), StreamError> {
        let frame = whole(self.id, head, body).ok_or(StreamError::Overrun)?;
        self.end_with(frame).await
    }

    /// Abandons this body, telling the peer why; the peer's reader gets an error.
    pub async fn reset(mut self, reason: &str) {
        self.done = true;
        self.inner.retire(self.id, false, true);
        let _ = self
            .inner
            .outbound
            .send(encode(Kind::Reset, self.id, reason.as_bytes()))
            .await;
    }

    /// The stream id.
    pub fn id(&self) -> u32 {
        self.id
    }
}

impl Drop for BodySender {
    fn drop(&mut self) {
        if !self.done {
            let _ = self
                .inner
                .outbound
                .try_send(encode(Kind::Reset, self.id, b"sender went away"));
            self.inner.retire(self.id, false, true);
        }
    }
}

/// Joins a byte stream (an upgraded connection: a WebSocket, a raw TCP stream) to a
/// stream of this table: what `io` reads goes out on `sender`, what `receiver` gets is
/// written to `io`. Ends when both directions have ended.
///
/// A half-close passes through: `io` reaching its end finishes `sender`, and the peer
/// finishing its body shuts down `io`'s writing side, while the other direction goes on.
/// A broken stream ends both directions at once instead: the peer reset its body (or
/// the connection carrying it closed), writing to `io` failed, or the peer stopped
/// reading what this side sends. Then `io` is dropped (closed) and the peer's reader
/// sees its body reset, so neither end waits on a stream that can carry nothing more.
pub async fn splice<IO>(io: IO, mut sender: BodySender, mut receiver: BodyReceiver)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut read, mut write) = tokio::io::split(io);
    // Each direction says whether it ended cleanly (an end of stream passed on), after
    // which the other may still go on.
    let outbound = async move {
        let mut buf = BytesMut::with_capacity(16 * 1024);
        loop {
            buf.reserve(16 * 1024);
            let read = tokio::select! {
                // Nobody reads what would be sent: stop reading, and drop the sender,
                // which tells the peer this body is abandoned.
                () = sender.stopped() => return false,
                read = read.read_buf(&mut buf) => read,
            };
            match read {
                Ok(0) => break,
                Err(_) => return false,
                Ok(_) => {
                    if sender.send(buf.split().freeze()).await.is_err() {
                        return false;
                    }
                }
            }
        }
        sender.finish().await.is_ok()
    };
    let inbound = async move {
        loop {
            match receiver.recv().await {
                Some(Ok(chunk)) => {
                    if write.write_all(&chunk).await.is_err() {
                        return false;
                    }
                }
                Some(Err(_)) => return false,
                None => {
                    let _ = write.shutdown().await;
                    return true;
                }
            }
        }
    };
    tokio::pin!(outbound, inbound);
    tokio::select! {
        ended = &mut outbound => {
            if ended {
                inbound.await;
            }
        }
        ended = &mut inbound => {
            if ended {
                outbound.await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adi_protocol::frame::decode;
    use std::time::Duration;

    /// Two tables wired back to back, as the hub and a cocoon would be.
    fn pair() -> (Streams, Streams, tokio::task::JoinHandle<()>) {
        let (a_out, mut a_rx) = mpsc::channel::<Bytes>(64);
        let (b_out, mut b_rx) = mpsc::channel::<Bytes>(64);
        let a = Streams::new(a_out);
        let b = Streams::new(b_out);
        let (a2, b2) = (a.clone(), b.clone());
        let wire = tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(f) = a_rx.recv() => b2.on_frame(decode(f).expect("valid frame")),
                    Some(f) = b_rx.recv() => a2.on_frame(decode(f).expect("valid frame")),
                    else => break,
                }
            }
        });
        (a, b, wire)
    }

    #[tokio::test]
    async fn a_large_body_crosses_in_order_within_the_window() {
        let (a, b, _wire) = pair();
        let (_a_rx, mut a_tx) = a.open(1);
        let (mut b_rx, _b_tx) = b.open(1);
        let total = 10 * 1024 * 1024;
        let sender = tokio::spawn(async move {
            let mut sent = Vec::new();
            let mut n = 0u8;
            while sent.len() < total {
                let chunk: Vec<u8> = (0..100_000u32).map(|i| n.wrapping_add(i as u8)).collect();
                n = n.wrapping_add(1);
                sent.extend_from_slice(&chunk);
                a_tx.send(Bytes::from(chunk)).await.expect("send");
            }
            a_tx.finish().await.expect("finish");
            sent
        });
        let mut got = Vec::new();
        while let Some(chunk) = b_rx.recv().await {
            got.extend_from_slice(&chunk.expect("chunk"));
        }
        let sent = sender.await.expect("sender");
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "bytes arrive intact and in order");
    }

    #[tokio::test]
    async fn a_stalled_stream_does_not_block_another() {
        let (a, b, _wire) = pair();
        let (_r1, mut slow_tx) = a.open(1);
        let (_slow_rx, _t1) = b.open(1); // never read
        let (_r2, mut fast_tx) = a.open(2);
        let (mut fast_rx, _t2) = b.open(2);
        // Fill stream 1's window completely; its sender then waits for credit.
        let stalled = tokio::spawn(async move {
            for _ in 0..(INITIAL_WINDOW + 4) {
                slow_tx
                    .send(Bytes::from(vec![1u8; 1000]))
                    .await
                    .expect("send");
            }
        });
        fast_tx
            .send(Bytes::from_static(b"ping"))
            .await
            .expect("send");
        fast_tx.finish().await.expect("finish");
        let got = tokio::time::timeout(Duration::from_secs(5), fast_rx.recv())
            .await
            .expect("stream 2 is not blocked by stream 1");
        assert_eq!(
            got.expect("chunk").expect("ok"),
            Bytes::from_static(b"ping")
        );
        assert!(!stalled.is_finished(), "stream 1 waits for credit");
        stalled.abort();
    }

    #[tokio::test]
    async fn dropping_the_receiver_resets_the_sender() {
        let (a, b, _wire) = pair();
        let (_r, mut tx) = a.open(3);
        let (rx, _t) = b.open(3);
        drop(rx);
        let mut failed = false;
        for _ in 0..(INITIAL_WINDOW * 4) {
            if tx.send(Bytes::from_static(b"x")).await.is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "sender learns the receiver went away");
    }

    #[tokio::test]
    async fn a_sender_learns_it_was_stopped_without_sending() {
        let (a, b, _wire) = pair();
        let (_r, tx) = a.open(8);
        let (rx, _t) = b.open(8);
        let mut waiting = Box::pin(tx.stopped());
        assert!(
            futures_poll_once(waiting.as_mut()).await.is_none(),
            "not stopped while the receiver lives"
        );
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the sender hears of the stop");

        let (_r, tx) = a.open(9);
        a.close_all();
        tokio::time::timeout(Duration::from_secs(5), tx.stopped())
            .await
            .expect("a closed connection counts as stopped");
    }

    /// Polls a future once: `Some` if it is ready.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }

    #[tokio::test]
    async fn a_receiver_that_stops_early_leaves_the_other_direction_alone() {
        let (a, b, _wire) = pair();
        let (mut a_rx, mut a_tx) = a.open(6);
        let (b_rx, mut b_tx) = b.open(6);
        // b reads no more of a's body (say it had all the bytes it wanted)...
        drop(b_rx);
        let mut stopped = false;
        for _ in 0..(INITIAL_WINDOW * 4) {
            if a_tx.send(Bytes::from_static(b"x")).await.is_err() {
                stopped = true;
                break;
            }
        }
        assert!(stopped, "a learns b stopped reading");
        // ...but b's own body still reaches a in full.
        b_tx.send(Bytes::from_static(b"answer"))
            .await
            .expect("send");
        b_tx.finish().await.expect("finish");
        assert_eq!(a_rx.recv().await, Some(Ok(Bytes::from_static(b"answer"))));
        assert_eq!(a_rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_reset_body_fails_its_reader() {
        let (a, b, _wire) = pair();
        let (_a_rx, a_tx) = a.open(7);
        let (mut b_rx, _b_tx) = b.open(7);
        a_tx.reset("upstream failed").await;
        assert_eq!(
            b_rx.recv().await,
            Some(Err(StreamError::Reset("upstream failed".into())))
        );
    }

    #[tokio::test]
    async fn closing_the_connection_fails_open_streams() {
        let (a, _b, _wire) = pair();
        let (mut rx, _tx) = a.open(4);
        a.close_all();
        assert_eq!(rx.recv().await, Some(Err(StreamError::ConnectionClosed)));
        assert!(a.is_empty());
    }

    #[tokio::test]
    async fn finished_streams_are_forgotten() {
        let (a, b, _wire) = pair();
        let (mut a_rx, a_tx) = a.open(5);
        let (mut b_rx, b_tx) = b.open(5);
        a_tx.finish().await.expect("finish");
        b_tx.finish().await.expect("finish");
        assert_eq!(b_rx.recv().await, None);
        assert_eq!(a_rx.recv().await, None);
        assert!(a.is_empty() && b.is_empty());
    }

    #[tokio::test]
    async fn a_whole_frame_carries_head_and_body_and_ends_the_stream() {
        let (a, b, _wire) = pair();
        let (_a_rx, a_tx) = a.open(11);
        let (mut b_rx, b_tx) = b.open(11);
        b_tx.finish_implied();
        a_tx.send_whole(b"head", b"the body").await.expect("sent");
        assert_eq!(b_rx.recv().await, Some(Ok(Bytes::from_static(b"the body"))));
        assert_eq!(b_rx.recv().await, None);
        drop(_a_rx);
        assert!(b.is_empty(), "both directions of b's stream are done");
    }

    /// A splice on `a`'s stream `id`, its io the far end of a duplex pipe; returns the
    /// near end (the client, as it were), `b`'s ends of the stream, and the splice.
    fn spliced(
        a: &Streams,
        b: &Streams,
        id: u32,
    ) -> (
        tokio::io::DuplexStream,
        BodyReceiver,
        BodySender,
        tokio::task::JoinHandle<()>,
    ) {
        let (client, io) = tokio::io::duplex(64 * 1024);
        let (a_rx, a_tx) = a.open(id);
        let (b_rx, b_tx) = b.open(id);
        let splice = tokio::spawn(splice(io, a_tx, a_rx));
        (client, b_rx, b_tx, splice)
    }

    #[tokio::test]
    async fn a_splice_passes_a_half_close_and_the_answer_still_comes_back() {
        let (a, b, _wire) = pair();
        let (mut client, mut b_rx, mut b_tx, splice) = spliced(&a, &b, 20);
        client.write_all(b"question").await.expect("write");
        client.shutdown().await.expect("half-close");
        assert_eq!(b_rx.recv().await, Some(Ok(Bytes::from_static(b"question"))));
        assert_eq!(b_rx.recv().await, None, "the half-close arrives as the end");
        b_tx.send(Bytes::from_static(b"answer"))
            .await
            .expect("send");
        b_tx.finish().await.expect("finish");
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"answer");
        tokio::time::timeout(Duration::from_secs(5), splice)
            .await
            .expect("both directions ended")
            .expect("splice");
    }

    #[tokio::test]
    async fn a_broken_stream_ends_both_directions_of_a_splice() {
        let (a, b, _wire) = pair();
        // The peer resets its body: the client's connection closes though it is idle,
        // and the peer's reader hears the other direction is abandoned.
        let (mut client, mut b_rx, b_tx, splice) = spliced(&a, &b, 21);
        b_tx.reset("service connection reset").await;
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("read");
        assert!(got.is_empty());
        tokio::time::timeout(Duration::from_secs(5), splice)
            .await
            .expect("the splice ended")
            .expect("splice");
        assert!(matches!(b_rx.recv().await, Some(Err(_))));

        // The peer stops reading: the splice ends too, without waiting for the idle
        // client to send or close.
        let (_client, b_rx, _b_tx, splice) = spliced(&a, &b, 22);
        drop(b_rx);
        tokio::time::timeout(Duration::from_secs(5), splice)
            .await
            .expect("the splice ended")
            .expect("splice");

        // The connection closes.
        let (_client, _b_rx, _b_tx, splice) = spliced(&a, &b, 23);
        a.close_all();
        tokio::time::timeout(Duration::from_secs(5), splice)
            .await
            .expect("the splice ended")
            .expect("splice");
    }

    #[tokio::test]
    async fn implied_ends_send_nothing() {
        let (a_out, mut a_frames) = mpsc::channel::<Bytes>(8);
        let a = Streams::new(a_out);
        let (rx, tx) = a.open(12);
        rx.finish_implied();
        tx.finish_implied();
        assert!(a.is_empty(), "the stream is forgotten");
        assert!(a_frames.try_recv().is_err(), "and no frame was sent for it");
    }
}
