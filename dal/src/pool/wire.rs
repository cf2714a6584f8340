//! What the wire tells of a tokio-postgres session, for the pool to check a connection without
//! a round trip: requests written and answered, the transaction status of the last
//! `ReadyForQuery`, and whether the connection task has work it has not done yet.
//!
//! tokio-postgres queues each request in a channel that its connection task drains onto the
//! socket. A future dropped after queuing a request (a `BEGIN`, say) leaves it to be sent later,
//! so the counts on the wire alone would read "all answered" while it waits. The connection
//! task is therefore watched as well: its waker notes every wake (a request queued, bytes
//! arrived) until its next poll, and a poll in progress is waited out. A session counts as
//! idle only when the task has nothing to do, has handed on everything it read, has flushed
//! every byte written, every request written has its `ReadyForQuery`, and the last one said
//! idle (`I`).
//!
//! Messages and their framing: PostgreSQL's frontend/backend protocol, "Message Formats"
//! (a type byte, then a 32-bit length that counts itself; the startup message has no type
//! byte). `ReadyForQuery` (`Z`) follows every simple query (`Q`) and every `Sync` (`S`) but
//! one read in copy-in mode, which the server ignores (see [`CopyIn`]), and the startup; its
//! one byte is `I` (idle), `T` (in a transaction block) or `E` (in a failed one).
//! `CommandComplete` (`C`) carries the command tag, `ROLLBACK` for a `COMMIT` of a
//! transaction an error aborted (PostgreSQL's `EndTransactionBlock`, in `xact.c`); the `C`
//! field of `ErrorResponse` (`E`), the SQLSTATE.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU64,
    Ordering::{Relaxed, SeqCst},
};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::future::BoxFuture;
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::Socket;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use crate::error::{STALE_PLAN, STALE_PLAN_ROUTINE, STALE_TYPE};

/// What a pool can tell of a session without a round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Session {
    /// Idle outside a transaction, with nothing in flight, queued or held back.
    Idle,
    /// Not known to be idle: a round trip tells.
    Unknown,
    /// Replies wait for a reader that does not take them (a row stream its last user kept
    /// after giving the client back): a request sent now would wait behind them.
    HeldBack,
}

/// Where a `COPY ... FROM STDIN` is. tokio-postgres writes `Bind`, `Execute` and `Sync`
/// together, then the rows, then `CopyDone` (or `CopyFail`) and a second `Sync`. The server
/// ignores a `Sync` it reads in copy-in mode, entered as it sends `CopyInResponse` (`G`), and
/// the second `Sync`'s `ReadyForQuery` answers both. A copy the server refused before it
/// read the first `Sync` (at `Execute`, such as a table that is not there, or before the
/// rows, such as a view with no `INSTEAD OF` trigger) has a `ReadyForQuery` for each
/// `Sync`, back to back; tokio-postgres takes the first as the copy's and hands the second to
/// the next request, every later reply to the request after its own (its issue #789), so
/// the stream is cut there (see [`Tracked`]). One that failed on a row has one for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum CopyIn {
    /// None in progress.
    None,
    /// `CopyInResponse` came: the server reads the rows.
    Rows,
    /// Its `CommandComplete` came: the server read `CopyDone`, after the first `Sync`, which
    /// it ignored.
    Done,
    /// Its `ErrorResponse` came while the server read the rows: whether it had read the first
    /// `Sync` shows after the next `ReadyForQuery`.
    Failed,
    /// Failed, then a `ReadyForQuery` came. Another right after it answers the second `Sync`;
    /// any other message begins the next request's answer, so the server had ignored the
    /// first `Sync`, counted answered then: when the client ended the rows with `CopyDone`
    /// or `CopyFail`, as `copy_in` does. A `COPY ... FROM STDIN` sent as a simple query has
    /// no such `Sync`: tokio-postgres sends no rows, and the server fails the copy on the
    /// next request's first message.
    FailedAnswered,
}

/// What one session's wire has shown, shared by its connection task and its pool.
#[derive(Debug, Default)]
pub(crate) struct Wire {
    /// Requests written that the server answers with a `ReadyForQuery`.
    sent: AtomicU64,
    /// `ReadyForQuery` messages received, and the `Sync` one of them answers with its own
    /// after a copy (see [`CopyIn`]).
    answered: AtomicU64,
    /// Where a `COPY ... FROM STDIN` is, as a [`CopyIn`].
    copy: AtomicU8,
    /// The last message the backend sent, those it may send at any time aside, was a
    /// `ReadyForQuery`.
    ready: AtomicBool,
    /// The frontend ended a copy's rows (`CopyDone` or `CopyFail`) since the last
    /// `CopyInResponse`.
    rows_ended: AtomicBool,
    /// The status byte of the last `ReadyForQuery`.
    status: AtomicU8,
    /// Bytes were written and not yet flushed.
    unflushed: AtomicBool,
    /// The connection task was woken and has not been polled since.
    woken: AtomicBool,
    /// The connection task is being polled.
    busy: AtomicBool,
    /// Wakes of the connection task so far: socket readiness (a reply to read), a row taken
    /// by its reader, a request to send.
    wakes: AtomicU64,
    /// A statement failed because a prepared statement is stale (see [`STALE_PLAN`]), or named
    /// a type that is gone (see [`STALE_TYPE`]).
    stale: AtomicBool,
    /// The tag of the last `CommandComplete` was `ROLLBACK`.
    rolled_back: AtomicBool,
    /// The SQLSTATE of the last `ErrorResponse`, its five bytes in the low bytes; 0 for none.
    last_error: AtomicU64,
    /// The SQLSTATE of the `ErrorResponse` that ended the session, packed as `last_error`.
    ended_by: AtomicU64,
    /// The last read of the connection task found the socket empty: everything read before
    /// was handed on to its readers.
    drained: AtomicBool,
    /// Someone waits for the end of the connection task's next poll.
    watching: AtomicBool,
    /// Notified at the end of each poll while someone is watching.
    polled: tokio::sync::Notify,
}

impl Wire {
    /// Whether the connection that just opened runs over a [`Tracked`] stream: its startup
    /// was seen, and answered. Not so without TLS, whose plain socket tokio-postgres keeps to
    /// itself (nor after a TLS attempt that failed, then one without).
    pub(crate) fn attached(&self) -> bool {
        self.sent.load(SeqCst) == 1
            && self.answered.load(SeqCst) == 1
            && self.status.load(SeqCst) == b'I'
    }

    /// Forgets what an earlier connection attempt showed.
    fn reset(&self) {
        for counter in [&self.sent, &self.answered] {
            counter.store(0, SeqCst);
        }
        self.copy.store(CopyIn::None as u8, SeqCst);
        self.ready.store(false, SeqCst);
        self.rows_ended.store(false, SeqCst);
        self.status.store(0, SeqCst);
        self.stale.store(false, SeqCst);
        self.rolled_back.store(false, SeqCst);
        self.last_error.store(0, SeqCst);
        self.ended_by.store(0, SeqCst);
    }

    /// The status of the last `ReadyForQuery`: `b'I'`, `b'T'` or `b'E'`.
    pub(crate) fn status(&self) -> u8 {
        self.status.load(SeqCst)
    }

    /// Whether a statement failed on a stale prepared statement.
    pub(crate) fn stale(&self) -> bool {
        self.stale.load(SeqCst)
    }

    /// Whether the last statement answered was completed as `ROLLBACK`: right after a
    /// `COMMIT` returned, the server rolled the transaction back instead, for a statement
    /// failed in it, and [`last_error`](Self::last_error) is that statement's SQLSTATE.
    #[cfg(feature = "diesel")]
    pub(crate) fn rolled_back(&self) -> bool {
        self.rolled_back.load(SeqCst)
    }

    /// How many requests answered with a `ReadyForQuery` were written whole so far: one
    /// that was not can have run no statement.
    #[cfg(feature = "diesel")]
    pub(crate) fn requests_sent(&self) -> u64 {
        self.sent.load(SeqCst)
    }

    /// The SQLSTATE of the last error the server sent on this session, if any.
    #[cfg(feature = "diesel")]
    pub(crate) fn last_error(&self) -> Option<String> {
        unpacked(self.last_error.load(SeqCst))
    }

    /// The SQLSTATE of the error that ended the session (severity `FATAL` or `PANIC`), if
    /// the server ended it with one.
    #[cfg(feature = "diesel")]
    pub(crate) fn ended_by(&self) -> Option<String> {
        unpacked(self.ended_by.load(SeqCst))
    }

    /// Notes a message the frontend wrote, of type `kind` (0 for the startup message).
    fn wrote(&self, kind: u8) {
        match kind {
            0 | b'Q' | b'S' => {
                self.sent.fetch_add(1, SeqCst);
            }
            b'c' | b'f' => self.rows_ended.store(true, Relaxed),
            _ => {}
        }
    }

    /// Notes a message the backend sent, of type `kind`, with `body` (its first bytes).
    /// Returns `false` for a `ReadyForQuery` right after another: the second `Sync` of a copy
    /// refused before its rows (see [`CopyIn`]), which tokio-postgres would hand to the next
    /// request; the session is out of step, and not counted further.
    fn read(&self, kind: u8, body: &[u8]) -> bool {
        // `NoticeResponse`, `NotificationResponse` and `ParameterStatus` may come at any time,
        // and answer no request.
        if matches!(kind, b'N' | b'A' | b'S') {
            return true;
        }
        // `ready`, `copy` and `rows_ended` are the connection task's alone (its reads and
        // writes), so it reads them back as it wrote them, at the cost of plain loads.
        let ready = kind == b'Z';
        if self.ready.load(Relaxed) != ready {
            self.ready.store(ready, Relaxed);
        } else if ready {
            return false;
        }
        let copy = self.copy.load(Relaxed);
        if !ready && copy == CopyIn::FailedAnswered as u8 {
            self.copy.store(CopyIn::None as u8, Relaxed);
            if self.rows_ended.load(Relaxed) {
                // The first `Sync` of the copy that failed on a row, ignored.
                self.answered.fetch_add(1, SeqCst);
            }
        }
        // The end of a copy in progress, if one is: its `CommandComplete` or its error.
        let copy_ends = |then: CopyIn| {
            if copy == CopyIn::Rows as u8 {
                self.copy.store(then as u8, Relaxed);
            }
        };
        match kind {
            b'Z' => {
                self.status
                    .store(body.first().copied().unwrap_or(0), SeqCst);
                if copy != CopyIn::None as u8 {
                    let failed = copy == CopyIn::Failed as u8;
                    let next = if failed {
                        CopyIn::FailedAnswered
                    } else {
                        CopyIn::None
                    };
                    self.copy.store(next as u8, Relaxed);
                }
                let ignored = u64::from(copy == CopyIn::Done as u8);
                self.answered.fetch_add(1 + ignored, SeqCst);
            }
            b'G' => {
                self.rows_ended.store(false, Relaxed);
                self.copy.store(CopyIn::Rows as u8, Relaxed);
            }
            b'C' => {
                copy_ends(CopyIn::Done);
                self.rolled_back.store(body == b"ROLLBACK\0", SeqCst);
            }
            b'E' => {
                copy_ends(CopyIn::Failed);
                self.note_error(body);
            }
            _ => {}
        }
        true
    }

    /// Notes an `ErrorResponse` (its body): its SQLSTATE, whether it ended the session, and
    /// whether it tells of a stale prepared statement.
    fn note_error(&self, body: &[u8]) {
        let code = error_field(body, b'C').unwrap_or_default();
        if let Ok(code) = <[u8; 5]>::try_from(code) {
            let mut packed = [0; 8];
            packed[3..].copy_from_slice(&code);
            let packed = u64::from_be_bytes(packed);
            self.last_error.store(packed, SeqCst);
            // `V`, the severity never translated (PostgreSQL 9.6 on), else `S`.
            let severity = error_field(body, b'V').or_else(|| error_field(body, b'S'));
            if matches!(severity, Some(b"FATAL" | b"PANIC")) {
                self.ended_by.store(packed, SeqCst);
            }
        }
        let message = error_field(body, b'M').unwrap_or_default();
        let stale_plan = code == b"0A000"
            && (error_field(body, b'R') == Some(STALE_PLAN_ROUTINE.as_bytes())
                || message == STALE_PLAN.as_bytes());
        let stale_type = code == b"XX000" && message.starts_with(STALE_TYPE.as_bytes());
        if stale_plan || stale_type {
            tracing::debug!(
                "a prepared statement is stale after a schema change; the connection will be replaced"
            );
            self.stale.store(true, SeqCst);
        }
    }

    /// How many times the connection task was woken: unchanged over a while, nothing came
    /// from the server nor was taken by a reader meanwhile.
    pub(crate) fn wakes(&self) -> u64 {
        self.wakes.load(SeqCst)
    }

    /// What the wire tells of the session: a request queued by a dropped future counts as in
    /// flight. Waits out a poll of the connection task in progress for a few microseconds;
    /// longer, the answer is [`Session::Unknown`].
    pub(crate) fn session(&self) -> Session {
        for _ in 0..1_000 {
            if !self.busy.load(SeqCst) {
                break;
            }
            std::hint::spin_loop();
        }
        self.session_now()
    }

    /// Returns once the session is [`Session::HeldBack`], checked at the end of each poll of
    /// the connection task: a request sent to a session whose replies wait for a reader
    /// that never takes them is never answered.
    pub(crate) async fn held_back(&self) {
        loop {
            let polled = self.polled.notified();
            tokio::pin!(polled);
            polled.as_mut().enable();
            self.watching.store(true, SeqCst);
            if self.session_now() == Session::HeldBack {
                return;
            }
            polled.await;
        }
    }

    fn session_now(&self) -> Session {
        // In this order: a wake noted before the task's last poll began was handled by it,
        // and that poll has ended when `busy` reads false after `woken` did.
        if self.woken.load(SeqCst) || self.busy.load(SeqCst) {
            return Session::Unknown;
        }
        // A poll that ends without finding the socket empty stopped at a reply its reader
        // did not take.
        if !self.drained.load(SeqCst) {
            return Session::HeldBack;
        }
        if self.answered_idle() {
            Session::Idle
        } else {
            Session::Unknown
        }
    }

    /// Whether every request written was flushed and answered, the last answer saying idle
    /// (`I`): no transaction block is open, whatever statement opened or ended one. A
    /// request still queued in the client (its future dropped before it was written) is not
    /// counted: its caller counts it.
    pub(crate) fn answered_idle(&self) -> bool {
        !self.unflushed.load(SeqCst)
            && self.sent.load(SeqCst) == self.answered.load(SeqCst)
            && self.status.load(SeqCst) == b'I'
    }
}

/// Follows a stream of protocol messages, a byte slice at a time, to the end of each message.
#[derive(Debug, Default)]
struct Framing {
    header: [u8; 5],
    have: usize,
    left: usize,
    /// The first message has no type byte (the startup message), on the frontend only.
    untyped: bool,
    /// The first bytes of the body of a message this side keeps.
    body: Vec<u8>,
}

/// Bytes kept of a message body: enough for the status of `ReadyForQuery` and for the code and
/// message of an error.
const KEEP: usize = 1024;

impl Framing {
    /// Feeds `bytes`, calling `end(kind, body)` at the end of each message (`kind` 0 for the
    /// startup message); the body is kept for the kinds `keep` names. Stops at a message
    /// `end` returns `false` for, and returns where in `bytes` it began (0 when it began in
    /// an earlier call).
    fn feed(
        &mut self,
        mut bytes: &[u8],
        keep: fn(u8) -> bool,
        mut end: impl FnMut(u8, &[u8]) -> bool,
    ) -> Option<usize> {
        let whole = bytes.len();
        let mut began = 0;
        while !bytes.is_empty() {
            if self.have == 0 {
                began = whole - bytes.len();
            }
            let start = usize::from(self.untyped);
            if self.have < 5 {
                let take = (5 - self.have).min(bytes.len());
                self.header[self.have..self.have + take].copy_from_slice(&bytes[..take]);
                self.have += take;
                bytes = &bytes[take..];
                if self.have < 5 {
                    return None;
                }
                let length = if self.untyped {
                    // No type byte: the four bytes of the length, then the body's first.
                    u32::from_be_bytes(self.header[..4].try_into().expect("4 bytes"))
                } else {
                    u32::from_be_bytes(self.header[1..].try_into().expect("4 bytes"))
                };
                self.left = (length as usize).saturating_sub(4 + start);
                self.body.clear();
                if self.untyped {
                    self.body.push(self.header[4]);
                }
            } else {
                let take = self.left.min(bytes.len());
                if keep(self.kind()) && self.body.len() < KEEP {
                    let room = (KEEP - self.body.len()).min(take);
                    self.body.extend_from_slice(&bytes[..room]);
                }
                self.left -= take;
                bytes = &bytes[take..];
            }
            if self.left == 0 {
                let go_on = end(self.kind(), &self.body);
                self.have = 0;
                self.untyped = false;
                if !go_on {
                    return Some(began);
                }
            }
        }
        None
    }

    fn kind(&self) -> u8 {
        if self.untyped { 0 } else { self.header[0] }
    }
}

/// A stream whose messages are counted into a [`Wire`]: the plain side of a TLS stream. Cut
/// at a `ReadyForQuery` that answers no request tokio-postgres waits for (see [`CopyIn`]):
/// what came before it is read, then an error (`InvalidData`) ends the connection, so that
/// the requests in line fail instead of each getting the reply to the one before.
pub(crate) struct Tracked<S> {
    inner: S,
    wire: Arc<Wire>,
    read: Framing,
    written: Framing,
    /// Cut: every read fails.
    out_of_step: bool,
}

impl<S> Tracked<S> {
    fn new(inner: S, wire: Arc<Wire>) -> Self {
        wire.reset();
        Self {
            inner,
            wire,
            read: Framing::default(),
            written: Framing {
                untyped: true,
                ..Framing::default()
            },
            out_of_step: false,
        }
    }
}

/// A SQLSTATE packed in the low five bytes of `packed`; `None` for 0.
#[cfg(feature = "diesel")]
fn unpacked(packed: u64) -> Option<String> {
    let code = packed.to_be_bytes();
    (code[3] != 0).then(|| String::from_utf8_lossy(&code[3..]).into_owned())
}

/// An error's field `code` (`C` for the SQLSTATE, `M` for the message), from the body of an
/// `ErrorResponse`: fields of a type byte and a NUL-terminated string, ending with a NUL.
fn error_field(body: &[u8], code: u8) -> Option<&[u8]> {
    let mut fields = body;
    while let [kind, rest @ ..] = fields {
        if *kind == 0 {
            return None;
        }
        let end = rest.iter().position(|b| *b == 0)?;
        if *kind == code {
            return Some(&rest[..end]);
        }
        fields = &rest[end + 1..];
    }
    None
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let out_of_step = || {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the server answered a COPY's two Syncs apart (it refused the copy before its \
                 rows): the connection is closed before a request gets the reply to another",
            )
        };
        if this.out_of_step {
            return Poll::Ready(Err(out_of_step()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.wire.drained.store(polled.is_pending(), SeqCst);
        if let Poll::Ready(Ok(())) = polled {
            let wire = &this.wire;
            let cut = this.read.feed(
                &buf.filled()[before..],
                |kind| matches!(kind, b'Z' | b'E' | b'C'),
                |kind, body| wire.read(kind, body),
            );
            if let Some(at) = cut {
                tracing::warn!(
                    "a COPY refused before its rows left a reply no request waits for; \
                     closing the connection"
                );
                this.out_of_step = true;
                buf.set_filled(before + at);
                if at == 0 {
                    return Poll::Ready(Err(out_of_step()));
                }
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.wire.unflushed.store(true, SeqCst);
        let polled = Pin::new(&mut this.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = polled {
            let wire = &this.wire;
            this.written.feed(
                &data[..n],
                |_| false,
                |kind, _| {
                    wire.wrote(kind);
                    true
                },
            );
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = polled {
            this.wire.unflushed.store(false, SeqCst);
        }
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: TlsStream + Unpin> TlsStream for Tracked<S> {
    fn channel_binding(&self) -> ChannelBinding {
        self.inner.channel_binding()
    }
}

/// A TLS connector whose streams are [`Tracked`] into `wire`.
pub(crate) struct TrackedTls<M> {
    inner: M,
    wire: Arc<Wire>,
}

impl<M> TrackedTls<M> {
    /// `inner`, followed into a new session's wire, which it returns too.
    pub(crate) fn new(inner: M) -> (Self, Arc<Wire>) {
        let wire = Arc::new(Wire::default());
        let tls = Self {
            inner,
            wire: Arc::clone(&wire),
        };
        (tls, wire)
    }
}

impl<M> MakeTlsConnect<Socket> for TrackedTls<M>
where
    M: MakeTlsConnect<Socket>,
    M::TlsConnect: Send + 'static,
    <M::TlsConnect as TlsConnect<Socket>>::Future: Send + 'static,
{
    type Stream = Tracked<M::Stream>;
    type TlsConnect = TrackedTls<M::TlsConnect>;
    type Error = M::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, Self::Error> {
        Ok(TrackedTls {
            inner: self.inner.make_tls_connect(domain)?,
            wire: Arc::clone(&self.wire),
        })
    }
}

impl<C> TlsConnect<Socket> for TrackedTls<C>
where
    C: TlsConnect<Socket>,
    C::Future: Send + 'static,
{
    type Stream = Tracked<C::Stream>;
    type Error = C::Error;
    type Future = BoxFuture<'static, Result<Self::Stream, Self::Error>>;

    fn connect(self, stream: Socket) -> Self::Future {
        let handshake = self.inner.connect(stream);
        let wire = self.wire;
        Box::pin(async move { Ok(Tracked::new(handshake.await?, wire)) })
    }
}

/// A connection task's future, watched: notes into `wire` each wake until the next poll, and
/// each poll while it runs.
pub(crate) struct Watched<F> {
    inner: F,
    wire: Arc<Wire>,
    flag: Arc<WakeFlag>,
    waker: Waker,
}

struct WakeFlag {
    wire: Arc<Wire>,
    task: AtomicWaker,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wire.wakes.fetch_add(1, SeqCst);
        self.wire.woken.store(true, SeqCst);
        self.task.wake();
    }
}

impl<F> Watched<F> {
    /// Watches `inner`, a task about to be spawned: woken, until its first poll.
    pub(crate) fn new(inner: F, wire: Arc<Wire>) -> Self {
        wire.woken.store(true, SeqCst);
        let flag = Arc::new(WakeFlag {
            wire: Arc::clone(&wire),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(Arc::clone(&flag));
        Self {
            inner,
            wire,
            flag,
            waker,
        }
    }
}

impl<F: Future + Unpin> Future for Watched<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        this.flag.task.register(cx.waker());
        this.wire.busy.store(true, SeqCst);
        this.wire.woken.store(false, SeqCst);
        let polled = Pin::new(&mut this.inner).poll(&mut Context::from_waker(&this.waker));
        this.wire.busy.store(false, SeqCst);
        if this.wire.watching.swap(false, SeqCst) {
            this.wire.polled.notify_waiters();
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// Every split of a stream into two reads gives the same messages.
    #[test]
    fn messages_are_found_across_any_split() {
        let mut stream = message(b'C', b"SELECT 1\0");
        stream.extend(message(b'Z', b"T"));
        stream.extend(message(
            b'E',
            b"SERROR\0C0A000\0Mcached plan must not change result type\0\0",
        ));
        stream.extend(message(b'Z', b"E"));
        for split in 0..=stream.len() {
            let mut framing = Framing::default();
            let mut seen = Vec::new();
            for part in [&stream[..split], &stream[split..]] {
                framing.feed(
                    part,
                    |k| matches!(k, b'Z' | b'E'),
                    |kind, body| {
                        seen.push((kind, body.to_vec()));
                        true
                    },
                );
            }
            let kinds: Vec<u8> = seen.iter().map(|(k, _)| *k).collect();
            assert_eq!(kinds, b"CZEZ", "split at {split}");
            assert_eq!(seen[1].1, b"T");
            assert_eq!(error_field(&seen[2].1, b'C'), Some(&b"0A000"[..]));
            assert_eq!(error_field(&seen[2].1, b'M'), Some(STALE_PLAN.as_bytes()));
            assert_eq!(seen[3].1, b"E");
        }
    }

    /// Only an error of severity `FATAL` (or `PANIC`) ended the session: an `ERROR` with the
    /// same SQLSTATE (postgres_fdw passes a remote session's on) did not, and a COMMIT after
    /// it may commit.
    #[cfg(feature = "diesel")]
    #[test]
    fn only_a_fatal_error_ends_the_session() {
        let wire = Wire::default();
        wire.note_error(b"SERROR\0VERROR\0C25P03\0Mremote session ended\0\0");
        assert_eq!(wire.last_error().as_deref(), Some("25P03"));
        assert_eq!(wire.ended_by(), None);
        // A server whose messages are in German: `S` translated, `V` not.
        wire.note_error(b"SFATAL\0VFATAL\0C25P03\0Mterminating connection\0\0");
        assert_eq!(wire.ended_by().as_deref(), Some("25P03"));
        wire.note_error(b"SFEHLER\0VERROR\0C42601\0Msyntax\0\0");
        assert_eq!(wire.last_error().as_deref(), Some("42601"));
        assert_eq!(wire.ended_by().as_deref(), Some("25P03"));
    }

    /// The startup message has no type byte; the messages after it have one.
    #[test]
    fn the_startup_message_is_counted_as_one_request() {
        let mut stream = 12u32.to_be_bytes().to_vec();
        stream.extend_from_slice(&[0, 3, 0, 0, 0, 0, 0, 0]);
        stream.extend(message(b'p', b"secret\0"));
        stream.extend(message(b'Q', b"BEGIN\0"));
        stream.extend(message(b'P', b"\0SELECT 1\0\0\0"));
        stream.extend(message(b'S', b""));
        for split in 0..=stream.len() {
            let mut framing = Framing {
                untyped: true,
                ..Framing::default()
            };
            let mut kinds = Vec::new();
            for part in [&stream[..split], &stream[split..]] {
                framing.feed(
                    part,
                    |_| false,
                    |kind, _| {
                        kinds.push(kind);
                        true
                    },
                );
            }
            assert_eq!(kinds, [0, b'p', b'Q', b'P', b'S'], "split at {split}");
        }
    }

    /// A copy's two `Sync`s are answered by one `ReadyForQuery` when it succeeds or fails on
    /// a row, and the session never reads as idle while one is unanswered; when the server
    /// refused the copy before it read the first `Sync`, a second `ReadyForQuery` comes right
    /// after the first, which the wire takes for what it is: out of step.
    #[test]
    fn a_copy_is_counted_answered_only_when_it_is() {
        let idle = |wire: &Wire| wire.answered_idle();
        // Bind, Execute and Sync; the startup's answer, and the copy's start.
        let copy = |wire: &Wire| {
            for kind in [0, b'B', b'E', b'S'] {
                wire.wrote(kind);
            }
            assert!(wire.read(b'Z', b"I"));
            assert!(wire.read(b'2', b""));
            assert!(wire.read(b'G', b""));
        };
        let error = b"SERROR\0VERROR\0C55000\0Mcannot copy to view\0\0";

        // The rows, CopyDone and Sync: one ReadyForQuery answers both Syncs.
        let wire = Wire::default();
        copy(&wire);
        for kind in [b'd', b'c', b'S'] {
            wire.wrote(kind);
        }
        assert!(!idle(&wire));
        wire.read(b'C', b"COPY 1\0");
        assert!(!idle(&wire));
        assert!(wire.read(b'Z', b"I"));
        assert!(
            idle(&wire),
            "a copy that succeeded leaves a request unanswered"
        );

        // Failed on a row: one ReadyForQuery for both Syncs, which shows once the next
        // request's answer begins.
        let wire = Wire::default();
        copy(&wire);
        for kind in [b'd', b'c', b'S'] {
            wire.wrote(kind);
        }
        wire.read(b'E', error);
        assert!(wire.read(b'Z', b"I"));
        assert!(!idle(&wire), "idle before the first Sync is known ignored");
        wire.wrote(b'Q');
        // A notice may come between, and tells nothing.
        assert!(wire.read(b'N', b""));
        assert!(wire.read(b'I', b""));
        assert!(wire.read(b'Z', b"I"));
        assert!(
            idle(&wire),
            "a request left unanswered after a copy failed on a row"
        );

        // Sent as a simple query: no rows, and the next request's first message fails the
        // copy; the server answers the query, then that request.
        let wire = Wire::default();
        wire.wrote(0);
        wire.read(b'Z', b"I");
        wire.wrote(b'Q');
        wire.read(b'G', b"");
        for kind in [b'P', b'B', b'E', b'S'] {
            wire.wrote(kind);
        }
        for _ in 0..2 {
            assert!(wire.read(b'E', error));
            assert!(wire.read(b'Z', b"I"));
        }
        assert!(
            idle(&wire),
            "a simple query's copy counted as answering a Sync it never had"
        );
        wire.wrote(b'Q');
        assert!(
            !idle(&wire),
            "idle with a request in flight after a simple query's copy"
        );

        // Refused before the rows, or at Execute: the first Sync has its own answer, the
        // second follows it, with nothing between, and answers no request of the client's.
        for refused in [&b"GE"[..], b"E"] {
            let wire = Wire::default();
            for kind in [0, b'B', b'E', b'S'] {
                wire.wrote(kind);
            }
            wire.read(b'Z', b"I");
            wire.read(b'2', b"");
            for kind in refused {
                wire.read(*kind, error);
            }
            assert!(wire.read(b'Z', b"I"));
            for kind in [b'c', b'S'] {
                wire.wrote(kind);
            }
            assert!(!idle(&wire), "idle with the second Sync unanswered");
            assert!(wire.read(b'S', b""));
            assert!(
                !wire.read(b'Z', b"I"),
                "the second Sync's answer taken as a request's"
            );
        }
    }

    /// A stream cut at a `ReadyForQuery` that answers no request: the reader gets what came
    /// before it, then an error, never that `ReadyForQuery` nor what follows.
    #[tokio::test]
    async fn a_stream_out_of_step_is_cut_before_the_reply_no_request_waits_for() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let error = b"SERROR\0VERROR\0C42P01\0Mrelation does not exist\0\0";
        let mut first = message(b'2', b"");
        first.extend(message(b'E', error));
        first.extend(message(b'Z', b"I"));
        let mut second = message(b'Z', b"I");
        second.extend(message(b'2', b""));
        let whole = first.len() + second.len();
        // Whole, and split inside the second ReadyForQuery: the reader gets the first reply,
        // and the two bytes of the second that came before it was whole, at most.
        for (split, readable) in [(whole, first.len()), (first.len() + 2, first.len() + 2)] {
            let mut stream = first.clone();
            stream.extend(&second);
            let (mut server, client) = tokio::io::duplex(1024);
            let mut tracked = Tracked::new(client, Arc::new(Wire::default()));
            server.write_all(&stream[..split]).await.unwrap();
            let mut seen = vec![0; 1024];
            let n = tracked.read(&mut seen).await.unwrap();
            assert_eq!(&seen[..n], &stream[..readable], "split at {split}");
            server.write_all(&stream[split..]).await.unwrap();
            let mut rest = Vec::new();
            let e = tracked.read_to_end(&mut rest).await.unwrap_err();
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::InvalidData,
                "split at {split}"
            );
            assert!(rest.is_empty(), "read past the cut: {rest:?}");
        }
    }
}
