//! The hub's end of one device connection, as everyone but its actor sees it: a
//! bounded queue of commands for the actor, the reason it must stop, when the device
//! was last heard from, two request counters and the raw TCP streams open to it. [`ConnHandle`] is the cheap, clonable
//! handle to it; the registry holds one per connected device.
//!
//! It is one small allocation per device and stays so while the device is idle: the
//! queue holds a buffer only while commands wait in it, and nothing here pre-allocates
//! or holds a timer.
//! It must never block: every method takes the lock for a few instructions, and no
//! waker is woken and no command dropped while the lock is held.
//!
//! Bounds: at most [`MAX_QUEUED_REQUESTS`] requests (from callers on the hub) wait in
//! the queue; one more is refused at once with [`Refused::Full`], which callers report as
//! `Busy`. Answers to what the device itself asked never wait and are never dropped:
//! there can be at most [`MAX_DEVICE_REQUESTS`] of them, because each holds its
//! [`AskSlot`] until the actor has written it out.

use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

pub mod command;

use command::Command;

/// Requests queued for one device before callers are refused. Generous, because a
/// burst (64 proxied requests at once) must queue rather than fail, and cheap, because
/// the queue holds a buffer only while commands wait and each command is boxed.
pub const MAX_QUEUED_REQUESTS: usize = 1024;
/// Capability requests one device may have open at once; more are refused at once.
pub const MAX_DEVICE_REQUESTS: u32 = 256;

/// Why a connection's actor must stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A newer connection of the same device took its place.
    Replaced,
    /// Another agent process with the same device secret connected (from this
    /// address) and took the device's place; this agent must stop for good.
    Displaced(Option<std::net::SocketAddr>),
    /// The device sent nothing for too long.
    Silent,
    /// The hub is shutting down.
    Shutdown,
    /// An owner removed the device: its agent must stop for good.
    Removed,
}

/// Why a command was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue is full: the device is not keeping up.
    Full,
    /// The connection is stopping or gone.
    Closed,
}

/// What the actor gets next.
#[derive(Debug)]
pub enum Next {
    /// Stop, for this reason; checked before any queued command.
    Stop(Stop),
    /// Carry out this command.
    Command(Command),
}

/// A cheap handle to one connection's actor.
#[derive(Clone)]
pub struct ConnHandle {
    link: Arc<Link>,
}

struct Link {
    inner: Mutex<Inner>,
    /// When the device was last heard from, in the registry's milliseconds.
    last_heard_ms: AtomicU64,
    /// Capability requests this hub has sent the device and not yet seen answered.
    in_flight: AtomicU32,
    /// Capability requests the device has open (see [`AskSlot`]).
    asking: AtomicU32,
    /// Raw TCP streams open to the device through this connection (see [`TcpSlot`]).
    tcp_streams: AtomicU32,
}

#[derive(Default)]
struct Inner {
    queue: VecDeque<Command>,
    /// Requests in `queue`; answers are bounded by their slots instead.
    requests: usize,
    stop: Option<Stop>,
    closed: bool,
    /// The actor, when it waits for the next command.
    waker: Option<Waker>,
}

impl Inner {
    /// Whether no command is taken any more: the actor is stopping or gone.
    fn refuses(&self) -> bool {
        self.closed || self.stop.is_some()
    }
}

impl ConnHandle {
    /// A handle to a new connection, heard from at `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        ConnHandle {
            link: Arc::new(Link {
                inner: Mutex::new(Inner::default()),
                last_heard_ms: AtomicU64::new(now_ms),
                in_flight: AtomicU32::new(0),
                asking: AtomicU32::new(0),
                tcp_streams: AtomicU32::new(0),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding the lock, and the state stays consistent if
        // something did, so a poisoned lock is still good to use.
        self.link
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a request for the device, or says why not; never waits.
    pub fn try_send(&self, command: Command) -> Result<(), Refused> {
        self.try_send_or_return(command).map_err(|(why, _)| why)
    }

    /// Queues a command, or gives it back with the reason it was refused, for a caller
    /// that must end what the command carries itself.
    pub fn try_send_or_return(&self, command: Command) -> Result<(), (Refused, Command)> {
        let waker = {
            let mut inner = self.lock();
            if inner.refuses() {
                return Err((Refused::Closed, command));
            }
            if command.is_request() {
                if inner.requests >= MAX_QUEUED_REQUESTS {
                    return Err((Refused::Full, command));
                }
                inner.requests += 1;
            }
            inner.queue.push_back(command);
            inner.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Tells the actor to stop; the first reason given is the one it acts on.
    pub fn stop(&self, why: Stop) {
        let waker = {
            let mut inner = self.lock();
            if inner.stop.is_none() {
                inner.stop = Some(why);
            }
            inner.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Whether the connection takes no more commands: its actor is stopping or gone.
    pub fn is_closed(&self) -> bool {
        self.lock().refuses()
    }

    /// Whether the actor has been told to stop, and why.
    pub fn stopped(&self) -> Option<Stop> {
        self.lock().stop
    }

    /// The next thing for the actor to do: stop, if told to, else the oldest command.
    /// Only the connection's actor calls this.
    pub async fn recv(&self) -> Next {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The oldest queued command, if one is waiting and no stop is: lets the actor
    /// write everything that is ready before one flush. Only the actor calls this.
    pub fn try_recv(&self) -> Option<Command> {
        let mut inner = self.lock();
        if inner.stop.is_some() {
            return None;
        }
        let command = inner.queue.pop_front()?;
        if command.is_request() {
            inner.requests -= 1;
        }
        if inner.queue.is_empty() {
            inner.queue = VecDeque::new();
        }
        Some(command)
    }

    fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Next> {
        let mut inner = self.lock();
        if let Some(why) = inner.stop {
            return Poll::Ready(Next::Stop(why));
        }
        if let Some(command) = inner.queue.pop_front() {
            if command.is_request() {
                inner.requests -= 1;
            }
            if inner.queue.is_empty() {
                // An idle device holds no queue buffer; the next command allocates a
                // small one again, which costs far less than encoding that command.
                inner.queue = VecDeque::new();
            }
            return Poll::Ready(Next::Command(command));
        }
        match &mut inner.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Refuses every later command and drops the queued ones, so whoever waits on one
    /// learns at once that the device disconnected. Called by the actor as it ends.
    pub fn close(&self) {
        let dropped = {
            let mut inner = self.lock();
            inner.closed = true;
            inner.requests = 0;
            inner.waker = None;
            std::mem::take(&mut inner.queue)
        };
        drop(dropped);
    }

    /// Notes that the device was heard from at `now_ms`.
    pub fn heard(&self, now_ms: u64) {
        self.link.last_heard_ms.store(now_ms, Ordering::Relaxed);
    }

    /// When the device was last heard from, in the registry's milliseconds.
    pub fn last_heard_ms(&self) -> u64 {
        self.link.last_heard_ms.load(Ordering::Relaxed)
    }

    /// Capability requests this hub has in flight to the device.
    pub fn in_flight(&self) -> u32 {
        self.link.in_flight.load(Ordering::Relaxed)
    }

    /// The counter behind [`in_flight`](Self::in_flight), for routing's guard.
    pub(crate) fn in_flight_counter(&self) -> &AtomicU32 {
        &self.link.in_flight
    }

    /// Raw TCP streams open to the device through this connection.
    pub fn tcp_streams(&self) -> u32 {
        self.link.tcp_streams.load(Ordering::Relaxed)
    }

    /// Counts one more raw TCP stream, for as long as the slot lives.
    pub fn tcp_stream(&self) -> TcpSlot {
        self.link.tcp_streams.fetch_add(1, Ordering::Relaxed);
        TcpSlot {
            handle: self.clone(),
        }
    }

    /// A slot for one more capability request of the device's own, if it has fewer
    /// than [`MAX_DEVICE_REQUESTS`] open.
    pub fn try_ask(&self) -> Option<AskSlot> {
        self.link
            .asking
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_DEVICE_REQUESTS).then_some(n + 1)
            })
            .ok()?;
        Some(AskSlot {
            handle: self.clone(),
        })
    }
}

impl fmt::Debug for ConnHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("ConnHandle")
            .field("queued", &inner.queue.len())
            .field("stop", &inner.stop)
            .field("closed", &inner.closed)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// One open capability request of the device's own; travels with its answer and
/// frees the slot when dropped, after the actor has written the answer (or dropped it
/// because the connection ended).
pub struct AskSlot {
    handle: ConnHandle,
}

impl Drop for AskSlot {
    fn drop(&mut self) {
        self.handle.link.asking.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One raw TCP stream open to the device; counted in
/// [`ConnHandle::tcp_streams`] until dropped.
pub struct TcpSlot {
    handle: ConnHandle,
}

impl Drop for TcpSlot {
    fn drop(&mut self) {
        self.handle.link.tcp_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for AskSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AskSlot")
    }
}

#[cfg(test)]
mod tests {
    use super::command::{Answer, Call, ReplyTo, RpcError};
    use super::*;
    use adi_protocol::{DeviceReply, DeviceRequest, HubToDevice};
    use std::time::Duration;
    use tokio::sync::oneshot;

    fn request() -> (Command, oneshot::Receiver<Result<DeviceReply, RpcError>>) {
        let (tx, rx) = oneshot::channel();
        let call = Call {
            request: DeviceRequest::TaskStats,
            deadline: Duration::from_secs(1),
            reply: ReplyTo::Waiter(tx),
        };
        (Command::Request(Box::new(call)), rx)
    }

    #[test]
    fn tcp_streams_are_counted_while_their_slots_live() {
        let handle = ConnHandle::new(0);
        let first = handle.tcp_stream();
        let second = handle.clone().tcp_stream();
        assert_eq!(handle.tcp_streams(), 2);
        drop(first);
        assert_eq!(handle.tcp_streams(), 1);
        drop(second);
        assert_eq!(handle.tcp_streams(), 0);
    }

    fn answer(slot: AskSlot) -> Command {
        Command::Send(Box::new(Answer {
            msg: HubToDevice::Error {
                code: adi_protocol::ErrorCode::Internal,
                message: String::new(),
            },
            slot: Some(slot),
        }))
    }

    #[tokio::test]
    async fn commands_come_out_in_order_and_requests_are_bounded() {
        let h = ConnHandle::new(0);
        let mut waiting = Vec::new();
        for _ in 0..MAX_QUEUED_REQUESTS {
            let (c, rx) = request();
            h.try_send(c).expect("room");
            waiting.push(rx);
        }
        let (c, _rx) = request();
        assert_eq!(h.try_send(c).err(), Some(Refused::Full));
        // Answers to the device's own requests still go in: their slots bound them.
        let slot = h.try_ask().expect("slot");
        h.try_send(answer(slot)).expect("answers are not refused");
        for _ in 0..MAX_QUEUED_REQUESTS {
            assert!(matches!(h.recv().await, Next::Command(Command::Request(_))));
        }
        assert!(matches!(h.recv().await, Next::Command(Command::Send(_))));
        assert_eq!(h.link.asking.load(Ordering::Relaxed), 0, "slot freed");
        assert_eq!(
            h.lock().queue.capacity(),
            0,
            "an empty queue holds no buffer"
        );
        let (c, _rx) = request();
        h.try_send(c).expect("room again");
    }

    #[tokio::test]
    async fn stop_comes_first_and_close_fails_the_waiting_callers() {
        let h = ConnHandle::new(0);
        let (c, rx) = request();
        h.try_send(c).expect("room");
        h.stop(Stop::Replaced);
        h.stop(Stop::Shutdown);
        assert!(matches!(h.recv().await, Next::Stop(Stop::Replaced)));
        let (c, _) = request();
        assert_eq!(h.try_send(c).err(), Some(Refused::Closed));
        h.close();
        assert!(rx.await.is_err(), "the queued request was dropped");
    }

    #[tokio::test]
    async fn a_waiting_actor_wakes_for_a_command_and_for_stop() {
        let h = ConnHandle::new(0);
        let actor = tokio::spawn({
            let h = h.clone();
            async move {
                let first = matches!(h.recv().await, Next::Command(_));
                let second = matches!(h.recv().await, Next::Stop(Stop::Silent));
                first && second
            }
        });
        tokio::task::yield_now().await;
        let (c, _rx) = request();
        h.try_send(c).expect("room");
        tokio::task::yield_now().await;
        h.stop(Stop::Silent);
        assert!(actor.await.expect("actor"));
    }

    #[test]
    fn the_device_may_ask_a_bounded_number_of_things_at_once() {
        let h = ConnHandle::new(0);
        let slots: Vec<AskSlot> = (0..MAX_DEVICE_REQUESTS)
            .map(|_| h.try_ask().expect("slot"))
            .collect();
        assert!(h.try_ask().is_none());
        drop(slots);
        assert!(h.try_ask().is_some());
    }
}
