//! The vendored h2's retry API (`SendRequest::send_retryable_request`,
//! `ResponseFuture::take_request_head`), against a real h2 server over loopback: a refused request's
//! head comes back as it was sent, whether it was written, still queued, or never queued.

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::server::SendResponse;
use h2::{Reason, RecvStream};
use http::{Request, Response};
use std::future::Future;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

const WAIT: Duration = Duration::from_secs(10);

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(WAIT, f).await.expect("timed out")
}

type Accepted = (Request<RecvStream>, SendResponse<Bytes>);

/// A server allowing `max_streams` concurrent streams: hands over every stream it accepts, and sends
/// GOAWAY (its last processed stream id) when `goaway` fires.
struct Server {
    accepted: mpsc::UnboundedReceiver<Accepted>,
    goaway: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect(max_streams: u32) -> (SendRequest<Bytes>, Server) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, accepted) = mpsc::unbounded_channel();
    let (goaway, mut goaway_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        let mut conn = h2::server::Builder::new()
            .max_concurrent_streams(max_streams)
            .handshake::<_, Bytes>(sock)
            .await
            .unwrap();
        let mut sent_goaway = false;
        loop {
            tokio::select! {
                r = conn.accept() => match r {
                    Some(Ok(stream)) => { let _ = tx.send(stream); }
                    _ => break,
                },
                _ = &mut goaway_rx, if !sent_goaway => {
                    sent_goaway = true;
                    conn.abrupt_shutdown(Reason::NO_ERROR);
                }
            }
        }
    });
    let sock = bounded(TcpStream::connect(addr)).await.unwrap();
    let (client, conn) = bounded(h2::client::handshake(sock)).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let server = Server {
        accepted,
        goaway: Some(goaway),
        task,
    };
    (client, server)
}

fn request(n: u32) -> Request<()> {
    Request::builder()
        .method("POST")
        .uri("http://backend.test:50051/echo.Echo/Unary")
        .header("content-type", "application/grpc")
        .header("x-call", n.to_string())
        .body(())
        .unwrap()
}

fn assert_same_head(got: &Request<()>, want: &Request<()>) {
    assert_eq!(got.method(), want.method());
    assert_eq!(got.uri(), want.uri());
    assert_eq!(got.headers(), want.headers());
}

async fn send(client: &mut SendRequest<Bytes>, n: u32) -> ResponseFuture {
    bounded(client.clone().ready()).await.unwrap();
    client
        .send_retryable_request(request(n), true)
        .map_err(|(e, _)| e)
        .expect("send")
        .0
}

/// A call answered in full on the connection, which also means the client has the server's SETTINGS.
async fn answered_call(client: &mut SendRequest<Bytes>, server: &mut Server) -> ResponseFuture {
    let mut response = send(client, 0).await;
    let (_, mut respond) = bounded(server.accepted.recv()).await.unwrap();
    respond
        .send_response(Response::new(()), true)
        .expect("respond");
    bounded(&mut response).await.expect("response");
    response
}

/// A written request the server resets with REFUSED_STREAM comes back whole; an answered one does not
/// (its head was dropped when the response head arrived).
#[tokio::test]
async fn refused_stream_gives_the_written_head_back() {
    let (mut client, mut server) = connect(100).await;
    let mut answered = answered_call(&mut client, &mut server).await;
    assert!(
        answered.take_request_head().is_none(),
        "answered call kept its head"
    );

    let mut refused = send(&mut client, 1).await;
    let (req, mut respond) = bounded(server.accepted.recv()).await.unwrap();
    assert_eq!(req.headers()["x-call"], "1");
    respond.send_reset(Reason::REFUSED_STREAM);
    let err = bounded(&mut refused).await.expect_err("refused");
    assert_eq!(err.reason(), Some(Reason::REFUSED_STREAM));
    let head = refused.take_request_head().expect("refused call's head");
    assert_same_head(&head, &request(1));
    assert!(refused.take_request_head().is_none(), "taken twice");
}

/// A request still queued behind the server's stream limit when a GOAWAY refuses it comes back too;
/// and one sent after the GOAWAY fails with the request itself.
#[tokio::test]
async fn goaway_gives_queued_and_unsent_requests_back() {
    let (mut client, mut server) = connect(1).await;
    drop(answered_call(&mut client, &mut server).await);

    // Takes the only stream slot; the next request waits in h2's queue, unwritten.
    let _open = send(&mut client, 1).await;
    let (_open_req, _open_respond) = bounded(server.accepted.recv()).await.unwrap();
    let (mut queued, _) = client
        .send_retryable_request(request(2), true)
        .map_err(|(e, _)| e)
        .expect("queue");

    server.goaway.take().unwrap().send(()).unwrap();
    let err = bounded(&mut queued).await.expect_err("refused by GOAWAY");
    assert!(err.is_go_away() && err.is_remote(), "{err:?}");
    let head = queued.take_request_head().expect("queued call's head");
    assert_same_head(&head, &request(2));

    let (err, returned) = client
        .send_retryable_request(request(3), true)
        .map(|_| ())
        .expect_err("sent after GOAWAY");
    assert!(err.is_go_away(), "{err:?}");
    assert_same_head(&returned.expect("request given back"), &request(3));
}
