//! Moving a stream's body from one HTTP/2 stream to another with flow control end to end.

use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h2::{RecvStream, SendStream};

use super::missing_status;
use super::replay::Replay;
use crate::balancer::Endpoint;
use crate::grpc::{Code, GRPC_STATUS};

/// Which side of a [`Pump`] failed.
#[derive(Debug)]
pub(super) enum PumpError {
    /// Reading from the source stream failed (it was reset or its connection broke).
    Src(h2::Error),
    /// The destination stream was reset or closed; nothing more can be sent.
    Dst(Option<h2::Error>),
}

enum PumpState {
    Data,
    Trailers,
    Done,
}

/// Moves DATA frames and then trailers from one HTTP/2 stream to another. A frame's flow-control
/// credit is released to the source only after the destination accepted every byte of it, so the
/// source can never send faster than the destination drains. The streams are passed to each poll,
/// not held, so a request's pump can go on into a new upstream stream when a refused call is sent again.
pub(super) struct Pump<'a> {
    /// A frame being sent, and the credit to release once it is.
    pending: Option<(Bytes, usize)>,
    /// Whether the one frame allowed to go without reserved capacity has gone (see `send_pending`).
    sent_unreserved: bool,
    /// Whether the source had ended when the pending frame was read from it.
    src_ended: bool,
    state: PumpState,
    /// For a response: the upstream, named in the INTERNAL status sent if it ends without grpc-status
    /// (built only then). None for a request, which just ends.
    status_from: Option<&'a Endpoint>,
    /// DATA payload bytes the destination took (for the access log).
    moved: u64,
}

impl<'a> Pump<'a> {
    pub(super) fn new(status_from: Option<&'a Endpoint>) -> Self {
        Pump {
            pending: None,
            sent_unreserved: false,
            src_ended: false,
            state: PumpState::Data,
            status_from,
            moved: 0,
        }
    }

    /// The credit of a frame read from the source and not yet all sent (it is given up: see `Replay`,
    /// which sends it again whole, so it counts as moved).
    pub(super) fn take_pending(&mut self) -> Option<usize> {
        let credit = self.pending.take().map(|(_, credit)| credit)?;
        self.moved += credit as u64;
        Some(credit)
    }

    /// Starts over on a new destination (a refused call sent again), keeping the count of bytes moved.
    pub(super) fn restart(&mut self) {
        *self = Pump {
            moved: self.moved,
            ..Pump::new(self.status_from)
        };
    }

    /// DATA payload bytes the destination took so far.
    pub(super) fn moved(&self) -> u64 {
        self.moved
    }

    /// Moves what can move now; ready with the `grpc-status` of the trailers forwarded, if any, when
    /// the source has ended and everything went out. What is read from the source is also recorded in
    /// `replay`, when given.
    pub(super) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut RecvStream,
        dst: &mut SendStream<Bytes>,
        replay: Option<&mut Replay>,
    ) -> Poll<Result<Option<Code>, PumpError>> {
        match self.pump(cx, src, dst, replay) {
            // Only while waiting does a reset of the destination need watching (it ends the pump
            // early); a frame sent to a reset stream fails on its own. Checked here, not on every
            // poll: each check is a round trip through h2's stream lock, and a unary call's pumps
            // usually finish without ever waiting.
            Poll::Pending => match dst.poll_reset(cx) {
                Poll::Ready(r) => Poll::Ready(Err(PumpError::Dst(r.err()))),
                Poll::Pending => Poll::Pending,
            },
            done => done,
        }
    }

    /// Moves frames until one side must wait or the stream is done: sends the pending frame, reads
    /// the next, and after the last, forwards the trailers.
    fn pump(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut RecvStream,
        dst: &mut SendStream<Bytes>,
        mut replay: Option<&mut Replay>,
    ) -> Poll<Result<Option<Code>, PumpError>> {
        loop {
            match self.state {
                PumpState::Data if self.pending.is_some() => {
                    ready!(self.send_pending(cx, src, dst))?
                }
                PumpState::Data => ready!(self.read_frame(cx, src, dst, replay.as_deref_mut()))?,
                PumpState::Trailers => return self.forward_trailers(cx, src, dst, replay),
                PumpState::Done => return Poll::Ready(Ok(None)),
            }
        }
    }

    /// Sends what the destination's window allows of the pending frame; once all of it went, releases
    /// its credit to the source. Ready(Ok) when there is more to do (the pump loops).
    fn send_pending(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut RecvStream,
        dst: &mut SendStream<Bytes>,
    ) -> Poll<Result<(), PumpError>> {
        let Some((chunk, credit)) = &mut self.pending else {
            return Poll::Ready(Ok(()));
        };
        let cap = if !self.sent_unreserved {
            // The stream's first frame goes to h2 whole, without asking for capacity (nothing was
            // reserved before it) or the reserve and poll-capacity round trip, each through h2's
            // connection lock: most gRPC calls are one message each way. h2 holds it until the window
            // allows and counts it against any later reservation, so at most this one frame (≤ the
            // 16 KiB max frame size we advertise) is buffered beyond the end-to-end window.
            self.sent_unreserved = true;
            chunk.len()
        } else {
            let mut cap = dst.capacity();
            if cap == 0 {
                dst.reserve_capacity(chunk.len());
                match ready!(dst.poll_capacity(cx)) {
                    Some(Ok(_)) => cap = dst.capacity(),
                    Some(Err(e)) => return Poll::Ready(Err(PumpError::Dst(Some(e)))),
                    None => return Poll::Ready(Err(PumpError::Dst(None))),
                }
                if cap == 0 {
                    return Poll::Ready(Ok(()));
                }
            }
            cap
        };
        let part = chunk.split_to(cap.min(chunk.len()));
        // The source already ended with this frame (END_STREAM on DATA, no trailers): end ours with it
        // too rather than with a separate empty DATA frame, which doubles the frames and trips peers'
        // small-frame flood limits.
        let last = chunk.is_empty() && self.status_from.is_none() && self.src_ended;
        if let Err(e) = dst.send_data(part, last) {
            return Poll::Ready(Err(PumpError::Dst(Some(e))));
        }
        if chunk.is_empty() {
            // Connection-level credit must come back even for a stream's last frame.
            let credit = *credit;
            self.pending = None;
            self.moved += credit as u64;
            let _ = src.flow_control().release_capacity(credit);
            if last {
                self.state = PumpState::Done;
            }
        } else {
            dst.reserve_capacity(chunk.len());
        }
        Poll::Ready(Ok(()))
    }

    /// Reads the next DATA frame from the source into `pending` (and `replay`); at the end of the
    /// data, moves on to the trailers.
    fn read_frame(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut RecvStream,
        dst: &mut SendStream<Bytes>,
        replay: Option<&mut Replay>,
    ) -> Poll<Result<(), PumpError>> {
        // With the data, whether the source ended with it: asking h2 after would lock again.
        match ready!(src.poll_data_end(cx)) {
            Some(Ok((chunk, ended))) => {
                let len = chunk.len();
                if len == 0 {
                    return Poll::Ready(Ok(()));
                }
                if let Some(r) = replay {
                    r.record(&chunk);
                }
                // The first frame goes unreserved (see `send_pending`); h2 reserves what a frame
                // needs when it is sent, so reserving ahead for it costs a lock for nothing.
                if self.sent_unreserved {
                    dst.reserve_capacity(len);
                }
                self.src_ended = ended;
                self.pending = Some((chunk, len));
            }
            Some(Err(e)) => return Poll::Ready(Err(PumpError::Src(e))),
            None => self.state = PumpState::Trailers,
        }
        Poll::Ready(Ok(()))
    }

    /// Forwards the source's trailers (or ends the destination with an empty DATA frame if there are
    /// none); ready with their `grpc-status`. A response without one gets INTERNAL, naming the upstream.
    fn forward_trailers(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut RecvStream,
        dst: &mut SendStream<Bytes>,
        replay: Option<&mut Replay>,
    ) -> Poll<Result<Option<Code>, PumpError>> {
        let mut trailers = match ready!(src.poll_trailers(cx)) {
            Ok(t) => t,
            Err(e) => return Poll::Ready(Err(PumpError::Src(e))),
        };
        if let (Some(r), Some(_)) = (replay, &trailers) {
            // Request trailers are not gRPC; such a call is not sent again.
            r.give_up();
        }
        if let (Some(endpoint), Some(t)) = (self.status_from, &mut trailers) {
            endpoint.take_load_report(t);
        }
        // One lookup of grpc-status (a custom header name: hashed byte by byte).
        let mut code = trailers
            .as_ref()
            .and_then(|t| t.get(&GRPC_STATUS))
            .map(Code::from_header);
        if let (Some(endpoint), None) = (self.status_from, code) {
            let status = missing_status(endpoint);
            code = Some(status.code);
            match &mut trailers {
                Some(t) => status.write_to(t),
                None => trailers = Some(status.to_trailers()),
            }
        }
        self.state = PumpState::Done;
        let result = match trailers {
            Some(t) => dst.send_trailers(t).map(|()| code),
            None => dst.send_data(Bytes::new(), true).map(|()| None),
        };
        Poll::Ready(result.map_err(|e| PumpError::Dst(Some(e))))
    }
}
