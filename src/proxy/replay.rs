//! The request body kept for sending a refused call again.

use bytes::Bytes;
use h2::SendStream;

/// Most request body bytes held for sending a refused call again; a call that sent more before the
/// refusal came back fails with it instead.
const REPLAY_LIMIT: usize = 64 * 1024;

/// The request body read from the client so far, kept until the upstream's response headers arrive so
/// that a call the upstream refused can be sent again. A copy: a frame's `Bytes` share h2's 32 KiB read
/// buffer, which a call waiting long for its response headers (a server stream whose first message is
/// minutes away) would otherwise keep alive. The frames' flow-control credit goes back to the client as
/// usual, so the client is not slowed.
#[derive(Default)]
pub(super) struct Replay {
    data: Vec<u8>,
    given_up: bool,
}

impl Replay {
    pub(super) fn record(&mut self, chunk: &Bytes) {
        if self.given_up {
            return;
        }
        if self.data.len() + chunk.len() > REPLAY_LIMIT {
            self.give_up();
        } else if self.data.is_empty() {
            // Most calls send one message: one exact allocation, not the growth path.
            self.data = chunk.to_vec();
        } else {
            self.data.extend_from_slice(chunk);
        }
    }

    pub(super) fn give_up(&mut self) {
        self.given_up = true;
        self.data = Vec::new();
    }

    pub(super) fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Whether everything read from the client so far is here.
    pub(super) fn is_complete(&self) -> bool {
        !self.given_up
    }

    /// Sends the recorded body on a new upstream stream, ending it if the client's body has ended.
    /// Sent without waiting for window: it is at most `REPLAY_LIMIT` bytes, which h2 queues.
    pub(super) fn send(&self, dst: &mut SendStream<Bytes>, ended: bool) -> Result<(), h2::Error> {
        if self.data.is_empty() && !ended {
            return Ok(());
        }
        dst.send_data(Bytes::copy_from_slice(&self.data), ended)
    }
}
