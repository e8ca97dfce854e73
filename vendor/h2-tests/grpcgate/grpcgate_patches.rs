//! grpcgate's own tests of the API and behaviour its h2 fork adds (vendor/h2/PATCHES.md), written with
//! upstream's test helpers (h2-support). vendor/h2-check.sh copies this file into
//! tests/h2-tests/tests/ of its scratch workspace; it is not an upstream file.

use futures::future::poll_fn;
use h2_support::prelude::*;

fn get(uri: &str) -> Request<()> {
    Request::builder()
        .method(Method::GET)
        .uri(uri)
        .header("x-call", "7")
        .body(())
        .unwrap()
}

/// A client connection that receives a GOAWAY with an error code fails its streams at once (at or
/// below last_stream_id with an I/O error naming the reason and the debug data, above it with the
/// GOAWAY error, as upstream) and closes the socket itself, without a GOAWAY of its own, though the
/// server keeps it open.
#[tokio::test]
async fn client_error_goaway_fails_streams_at_once() {
    h2_support::trace_init!();
    let (io, mut srv) = mock::new();

    let srv = async move {
        let settings = srv.assert_client_handshake().await;
        assert_default_settings!(settings);
        srv.recv_frame(
            frames::headers(1)
                .request("GET", "https://a.example/x")
                .field("x-call", "7"),
        )
        .await;
        srv.recv_frame(
            frames::headers(3)
                .request("GET", "https://a.example/y")
                .field("x-call", "7"),
        )
        .await;
        srv.send_frame(
            frames::go_away(1)
                .reason(Reason::COMPRESSION_ERROR)
                .data("header block too large"),
        )
        .await;
        // The client closes; the server never does.
        srv.recv_eof().await;
    };

    let client = async move {
        let (mut client, h2) = client::handshake(io).await.expect("handshake");
        let (rsp1, _body1) = client
            .send_request(get("https://a.example/x"), false)
            .unwrap();
        let (rsp3, _body3) = client
            .send_request(get("https://a.example/y"), false)
            .unwrap();
        let h2 = tokio::spawn(h2);
        let e1 = rsp1.await.expect_err("stream 1");
        assert!(e1.is_io(), "{:?}", e1);
        let msg = e1.to_string();
        assert!(msg.contains("COMPRESSION_ERROR"), "{}", msg);
        assert!(msg.contains("header block too large"), "{}", msg);
        // Above last_stream_id: unprocessed, failed with the GOAWAY itself (as upstream does).
        let e3 = rsp3.await.expect_err("stream 3");
        assert!(e3.is_go_away() && e3.is_remote(), "{:?}", e3);
        assert_eq!(e3.reason(), Some(Reason::COMPRESSION_ERROR), "{:?}", e3);
        let e = h2.await.unwrap().expect_err("connection");
        assert!(e.is_go_away() && e.is_remote(), "{:?}", e);
        assert_eq!(e.reason(), Some(Reason::COMPRESSION_ERROR));
    };

    join(srv, client).await;
}

/// A GOAWAY(NO_ERROR) is as upstream: the streams at or below last_stream_id go on.
#[tokio::test]
async fn client_graceful_goaway_lets_streams_finish() {
    h2_support::trace_init!();
    let (io, mut srv) = mock::new();

    let srv = async move {
        let settings = srv.assert_client_handshake().await;
        assert_default_settings!(settings);
        srv.recv_frame(
            frames::headers(1)
                .request("GET", "https://a.example/x")
                .field("x-call", "7")
                .eos(),
        )
        .await;
        srv.send_frame(frames::go_away(1)).await;
        srv.send_frame(frames::headers(1).response(200).eos()).await;
    };

    let client = async move {
        let (mut client, h2) = client::handshake(io).await.expect("handshake");
        let (rsp, _) = client
            .send_request(get("https://a.example/x"), true)
            .unwrap();
        let h2 = tokio::spawn(h2);
        assert_eq!(rsp.await.unwrap().status(), StatusCode::OK);
        h2.await.unwrap().unwrap();
    };

    join(srv, client).await;
}

/// `send_retryable_request` keeps the request head until the response head arrives:
/// `take_request_head` gives back a refused request (REFUSED_STREAM, or above a GOAWAY's
/// last_stream_id) as it was sent, and nothing once the response head has arrived.
#[tokio::test]
async fn retryable_request_head_comes_back_when_refused() {
    h2_support::trace_init!();
    let (io, mut srv) = mock::new();

    let srv = async move {
        let settings = srv.assert_client_handshake().await;
        assert_default_settings!(settings);
        srv.recv_frame(
            frames::headers(1)
                .request("GET", "https://a.example/one")
                .field("x-call", "7")
                .eos(),
        )
        .await;
        srv.send_frame(frames::reset(1).refused()).await;
        srv.recv_frame(
            frames::headers(3)
                .request("GET", "https://a.example/two")
                .field("x-call", "7")
                .eos(),
        )
        .await;
        srv.send_frame(frames::headers(3).response(200).eos()).await;
        srv.recv_frame(
            frames::headers(5)
                .request("GET", "https://a.example/three")
                .field("x-call", "7")
                .eos(),
        )
        .await;
        srv.send_frame(frames::go_away(3)).await;
        // The client, idle, ends the connection gracefully (as upstream).
        srv.recv_frame(frames::go_away(0)).await;
        srv.recv_eof().await;
    };

    let client = async move {
        let (client, h2) = client::handshake(io).await.expect("handshake");
        let h2 = tokio::spawn(h2);

        let (mut rsp, _) = client
            .send_retryable_request(get("https://a.example/one"), true)
            .map_err(|(e, _)| e)
            .unwrap();
        let e = (&mut rsp).await.unwrap_err();
        assert_eq!(e.reason(), Some(Reason::REFUSED_STREAM), "{:?}", e);
        let head = rsp.take_request_head().expect("refused request's head");
        assert_eq!(head.method(), Method::GET);
        assert_eq!(head.uri(), "https://a.example/one");
        assert_eq!(head.headers()["x-call"], "7");
        assert!(rsp.take_request_head().is_none(), "taken twice");

        let (mut rsp, _) = client
            .send_retryable_request(get("https://a.example/two"), true)
            .map_err(|(e, _)| e)
            .unwrap();
        let res = (&mut rsp).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert!(rsp.take_request_head().is_none(), "answered request");

        let (mut rsp, _) = client
            .send_retryable_request(get("https://a.example/three"), true)
            .map_err(|(e, _)| e)
            .unwrap();
        let e = (&mut rsp).await.unwrap_err();
        assert!(e.is_go_away() && e.is_remote(), "{:?}", e);
        let head = rsp
            .take_request_head()
            .expect("request above last_stream_id");
        assert_eq!(head.uri(), "https://a.example/three");

        // The connection is going away: a new request fails before it is queued, and comes back.
        let (e, req) = client
            .send_retryable_request(get("https://a.example/four"), true)
            .map(|_| ())
            .unwrap_err();
        assert!(e.is_go_away() || e.is_io(), "{:?}", e);
        assert_eq!(req.expect("unsent request").uri(), "https://a.example/four");
        drop(client);
        h2.await.unwrap().unwrap();
    };

    join(srv, client).await;
}

/// `take_unwritten_request_head` gives back the head of a request whose HEADERS were still queued
/// when the connection ended without a GOAWAY (the server's process died): nothing of it reached the
/// peer. A request already written gets `None` from it (it may have been processed), though
/// `take_request_head` still has its head.
#[tokio::test]
async fn unwritten_request_head_comes_back_when_the_connection_ends() {
    h2_support::trace_init!();
    let (io, mut srv) = mock::new();
    let (written_tx, written_rx) = futures::channel::oneshot::channel::<()>();
    let (queued_tx, queued_rx) = futures::channel::oneshot::channel::<()>();
    let (closed_tx, closed_rx) = futures::channel::oneshot::channel::<()>();

    let srv = async move {
        let settings = srv.assert_client_handshake().await;
        assert_default_settings!(settings);
        srv.recv_frame(
            frames::headers(1)
                .request("GET", "https://a.example/one")
                .field("x-call", "7")
                .eos(),
        )
        .await;
        written_tx.send(()).unwrap();
        queued_rx.await.unwrap();
        // The connection ends with no GOAWAY, as a killed server's does.
        drop(srv);
        closed_tx.send(()).unwrap();
    };

    let client = async move {
        let (client, mut h2) = client::handshake(io).await.expect("handshake");
        let (mut one, _) = client
            .send_retryable_request(get("https://a.example/one"), true)
            .map_err(|(e, _)| e)
            .unwrap();
        // The connection writes the first request; then it is not polled until the server is gone.
        h2.drive(written_rx).await.unwrap();
        let (mut two, _) = client
            .send_retryable_request(get("https://a.example/two"), true)
            .map_err(|(e, _)| e)
            .unwrap();
        queued_tx.send(()).unwrap();
        // Polled again only once the server is gone: it reads the end of the connection before it
        // writes the queued request. (Polled before, it would write the request first: that is
        // the race a proxy cannot win, and `take_unwritten_request_head` then says `None`.)
        closed_rx.await.unwrap();
        let _ = h2.await;

        let e = (&mut two).await.unwrap_err();
        assert!(e.is_io(), "{:?}", e);
        let head = two
            .take_unwritten_request_head()
            .expect("a request never written");
        assert_eq!(head.uri(), "https://a.example/two");
        assert_eq!(head.headers()["x-call"], "7");
        assert!(two.take_request_head().is_none(), "taken already");

        let e = (&mut one).await.unwrap_err();
        assert!(e.is_io(), "{:?}", e);
        assert!(
            one.take_unwritten_request_head().is_none(),
            "a written request is not given back as unwritten"
        );
        assert_eq!(
            one.take_request_head().expect("kept head").uri(),
            "https://a.example/one"
        );
        drop(client);
    };

    join(srv, client).await;
}

/// `ended_with_head` says whether END_STREAM had arrived with (or before the taking of) a head, on
/// both sides; `poll_data_end` says whether the stream ended with the data it returns.
#[tokio::test]
async fn ended_with_head_and_poll_data_end() {
    h2_support::trace_init!();
    let (io, mut client) = mock::new();

    let client = async move {
        let settings = client.assert_server_handshake().await;
        assert_default_settings!(settings);
        client
            .send_frame(
                frames::headers(1)
                    .request("GET", "https://a.example/")
                    .eos(),
            )
            .await;
        client
            .send_frame(frames::headers(3).request("POST", "https://a.example/"))
            .await;
        client.send_frame(frames::data(3, "ab")).await;
        client.send_frame(frames::data(3, "cd").eos()).await;
        client
            .recv_frame(frames::headers(1).response(200).eos())
            .await;
        client
            .recv_frame(frames::headers(3).response(200).eos())
            .await;
    };

    let srv = async move {
        let mut srv = server::handshake(io).await.expect("handshake");
        let (req1, mut respond1) = srv.accept().await.unwrap().unwrap();
        let (req2, mut respond2) = srv.accept().await.unwrap().unwrap();
        let work = async move {
            assert!(req1.body().ended_with_head(), "GET with END_STREAM");
            respond1
                .send_response(Response::builder().status(200).body(()).unwrap(), true)
                .unwrap();
            let mut body = req2.into_body();
            assert!(!body.ended_with_head(), "POST with a body");
            let mut got = vec![];
            while let Some(item) = poll_fn(|cx| body.poll_data_end(cx)).await {
                let (data, end) = item.unwrap();
                let _ = body.flow_control().release_capacity(data.len());
                got.push((data, end));
            }
            assert_eq!(got, [(Bytes::from("ab"), false), (Bytes::from("cd"), true)]);
            respond2
                .send_response(Response::builder().status(200).body(()).unwrap(), true)
                .unwrap();
        };
        let (_, closed) = join(work, poll_fn(|cx| srv.poll_closed(cx))).await;
        closed.unwrap();
    };

    join(client, srv).await;
}

/// The client side of `ended_with_head`: a trailers-less response with END_STREAM on its head.
#[tokio::test]
async fn response_ended_with_head() {
    h2_support::trace_init!();
    let (io, mut srv) = mock::new();

    let srv = async move {
        let settings = srv.assert_client_handshake().await;
        assert_default_settings!(settings);
        srv.recv_frame(
            frames::headers(1)
                .request("GET", "https://a.example/x")
                .field("x-call", "7")
                .eos(),
        )
        .await;
        srv.send_frame(frames::headers(1).response(200).eos()).await;
        srv.recv_frame(
            frames::headers(3)
                .request("GET", "https://a.example/x")
                .field("x-call", "7")
                .eos(),
        )
        .await;
        srv.send_frame(frames::headers(3).response(200)).await;
        srv.send_frame(frames::data(3, "z").eos()).await;
    };

    let client = async move {
        let (mut client, h2) = client::handshake(io).await.expect("handshake");
        let h2 = tokio::spawn(h2);
        let (rsp, _) = client
            .send_request(get("https://a.example/x"), true)
            .unwrap();
        assert!(rsp.await.unwrap().body().ended_with_head());
        let (rsp, _) = client
            .send_request(get("https://a.example/x"), true)
            .unwrap();
        let mut body = rsp.await.unwrap().into_body();
        // The snapshot may or may not have seen the DATA frame; what follows must end the stream.
        if !body.ended_with_head() {
            let (data, end) = poll_fn(|cx| body.poll_data_end(cx)).await.unwrap().unwrap();
            assert_eq!((data, end), (Bytes::from("z"), true));
        }
        drop((client, body));
        h2.await.unwrap().unwrap();
    };

    join(srv, client).await;
}

/// `Codec::release_buffers` (called by a connection whenever a poll ends with no open streams) drops
/// only empty buffers: half a frame already read, and a frame buffered but not yet written, survive
/// it; and an idle codec whose buffers were released reads and writes again.
#[tokio::test]
async fn release_buffers_keeps_what_they_hold() {
    use futures::StreamExt;

    h2_support::trace_init!();
    let (io, mut peer) = mock::new();
    let mut codec: Codec<_> = h2::Codec::new(io);

    // Read side: half a PING frame arrives, the buffers are released, the rest arrives.
    let ping: [u8; 17] = [0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    peer.send_bytes(&ping[..12]).await;
    let pending = poll_fn(|cx| std::task::Poll::Ready(codec.poll_next_unpin(cx).is_pending()));
    assert!(pending.await, "half a frame");
    codec.release_buffers();
    peer.send_bytes(&ping[12..]).await;
    let frame = codec.next().await.unwrap().unwrap();
    assert_eq!(assert_ping!(frame).payload(), &[1, 2, 3, 4, 5, 6, 7, 8]);

    // Write side: a frame buffered, the buffers released, then flushed.
    codec.buffer(frames::ping([9; 8]).into()).unwrap();
    codec.release_buffers();
    poll_fn(|cx| codec.flush(cx)).await.unwrap();
    peer.recv_frame(frames::ping([9; 8])).await;

    // Idle, released: both directions work again.
    codec.release_buffers();
    codec.buffer(frames::ping([7; 8]).pong().into()).unwrap();
    poll_fn(|cx| codec.flush(cx)).await.unwrap();
    peer.recv_frame(frames::ping([7; 8]).pong()).await;
    peer.send_bytes(&ping).await;
    codec.release_buffers();
    let frame = codec.next().await.unwrap().unwrap();
    assert_eq!(assert_ping!(frame).payload(), &[1, 2, 3, 4, 5, 6, 7, 8]);
}
