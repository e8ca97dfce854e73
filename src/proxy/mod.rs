//! One call through the proxy: route, pick an endpoint, forward, stream both ways, account.
//!
//! Everything for one call runs in one task ([`serve_stream`]): the request body pump
//! (client → upstream), waiting for the upstream response, and the response body pump (upstream →
//! client), selected together with the deadline and the client's RST_STREAM. Bodies move frame by frame;
//! a frame's flow-control credit goes back to its sender only once the other side accepted it, so
//! HTTP/2 flow control holds end to end and a stream never buffers more than one window.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::header::{Entry, HeaderName};
use http::header::{CONTENT_TYPE, HOST};
use http::uri::{Parts, Scheme};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use tokio::time::{Instant, Sleep};

use crate::access_log::{self, Record};
use crate::balancer::{Cluster, Endpoint, InFlight};
use crate::grpc::{self, refused, Code, Status, GRPC_STATUS, GRPC_TIMEOUT};
use crate::router::{Route, Router};
use crate::upstream::Lease;

mod local_health;
mod pump;
mod replay;

use pump::{Pump, PumpError};
use replay::Replay;

/// Serves one downstream HTTP/2 stream to completion and records its metrics.
///
/// Written as a function returning an `async move` block rather than an `async fn`: an `async fn`
/// keeps its arguments twice in its state (as captured and as rebound locals), and this state is
/// allocated, copied and freed once per call.
///
/// `forwarded_for`: the client's address, appended to the request's `x-forwarded-for` here, before
/// the call's future is built, so that the future holds nothing for it (see [`append_forwarded_for`]).
/// `client`: the same address with its port, for the access log.
pub fn serve_stream(
    router: Arc<Router>,
    mut req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    forwarded_for: Option<&HeaderValue>,
    client: SocketAddr,
) -> impl Future<Output = ()> + Send + 'static {
    // The call's clock starts when h2 hands the stream over, not when its task first runs.
    let start = Instant::now();
    // Started here, so the call's future holds one pointer for it (and nothing when it is off).
    let record = router
        .access_log
        .as_ref()
        .map(|_| start_record(&req, client, start));
    if let Some(client) = forwarded_for {
        append_forwarded_for(req.headers_mut(), client);
    }
    async move {
        let path = req.uri().path();
        if router.answers_health && path == grpc::CHECK_PATH {
            let shared = &router.shared;
            // Boxed: a rare path whose state would otherwise enlarge every call's task.
            let code = Box::pin(local_health::answer_check(
                req,
                respond,
                shared.is_draining(),
                |name| shared.cluster(name).map(|c| c.has_available()),
            ))
            .await;
            router.local.inc(code);
            log_call(
                &router,
                record,
                start.elapsed(),
                None,
                &Ended::at_proxy(None, code),
            );
            return;
        }
        let Some((route_idx, route)) = router.route(path) else {
            let status = Status::new(
                Code::Unimplemented,
                format!(
                    "grpcgate: no route for {} on listener \"{}\"",
                    path, router.listener
                ),
            );
            reply(&mut respond, &status);
            router.local.inc(status.code);
            let ended = Ended::at_proxy(None, status.code);
            log_call(&router, record, start.elapsed(), None, &ended);
            return;
        };
        let cluster = &route.cluster;
        let ended = forward(route, req, &mut respond, start).await;
        let code = ended.code;
        let counters = match ended.endpoint {
            Some(i) => {
                cluster.report(i, code == Code::Unavailable);
                &route.counters[i]
            }
            None => route.unrouted_counters(),
        };
        counters.inc(code);
        let elapsed = start.elapsed();
        cluster.duration.observe(elapsed.as_secs_f64());
        log_call(&router, record, elapsed, Some(route_idx), &ended);
    }
}

/// How a call ended: where it went, its status, and what went through.
struct Ended {
    /// The endpoint's index in the cluster; None: no endpoint was picked.
    endpoint: Option<usize>,
    code: Code,
    /// DATA payload bytes forwarded to the upstream and to the client.
    request_bytes: u64,
    response_bytes: u64,
    /// Times the call was sent again after a refusal.
    retries: u8,
}

impl Ended {
    /// A call that ended before anything went through.
    fn at_proxy(endpoint: Option<usize>, code: Code) -> Ended {
        Ended {
            endpoint,
            code,
            request_bytes: 0,
            response_bytes: 0,
            retries: 0,
        }
    }
}

/// The access log record of a call that just arrived: its client, `:authority` (or `host`) and path.
fn start_record(req: &Request<RecvStream>, client: SocketAddr, start: Instant) -> Box<Record> {
    let uri = req.uri();
    let authority = match uri.authority() {
        Some(a) => Some(a.as_str().as_bytes()),
        None => req.headers().get(HOST).map(HeaderValue::as_bytes),
    };
    let path = uri.path_and_query().map_or("", |p| p.as_str());
    Record::start(start.into_std(), client, authority, path.as_bytes())
}

/// Completes a call's access log record and queues it for the writer (without waiting).
fn log_call(
    router: &Arc<Router>,
    record: Option<Box<Record>>,
    duration: Duration,
    route: Option<usize>,
    ended: &Ended,
) {
    let (Some(mut record), Some(log)) = (record, &router.access_log) else {
        return;
    };
    let names: Arc<dyn access_log::Names> = router.clone();
    record.finish(
        names,
        duration,
        &access_log::Outcome {
            route,
            endpoint: ended.endpoint,
            grpc_status: ended.code as u8,
            request_bytes: ended.request_bytes,
            response_bytes: ended.response_bytes,
            retries: ended.retries,
        },
    );
    log.send(record);
}

/// `x-forwarded-for`, as Envoy and HAProxy write it.
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Appends `client` to the request's `x-forwarded-for`: the connection's value itself (a reference
/// count, no copy) when the client sent none, else one field joining what it sent with ", ".
///
/// Done per call on the connection's task, before the call's task is spawned: one hash lookup and
/// an atomic increment in the common case. Calls the proxy answers itself (no route, local health)
/// carry it too; they are few.
fn append_forwarded_for(headers: &mut HeaderMap, client: &HeaderValue) {
    match headers.entry(&X_FORWARDED_FOR) {
        Entry::Vacant(e) => {
            e.insert(client.clone());
        }
        Entry::Occupied(mut e) => {
            let mut joined = Vec::with_capacity(64);
            for v in e.iter() {
                joined.extend_from_slice(v.as_bytes());
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(client.as_bytes());
            // Valid: made of valid values and ", ".
            if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(joined)) {
                e.insert(v);
            }
        }
    }
}

/// Sends a trailers-only response with a status the proxy produced.
fn reply(respond: &mut SendResponse<Bytes>, status: &Status) {
    tracing::debug!(code = status.code.name(), message = %status.message, "replying with proxy status");
    let _ = respond.send_response(status.to_trailers_only(), true);
}

/// Forwards one call; returns the endpoint it went to (if any), the status it ended with and what went
/// through. (An `async move` block, like [`serve_stream`], so the request is held once, not twice.)
///
/// The call goes through three steps, each its own function: [`send_call`] picks an endpoint, sends
/// the call and waits for the response head (sending the call again if the upstream refuses it),
/// [`forward_response_head`] answers the client with that head, and [`stream_response`] moves the
/// response body and trailers. The request body flows through all three, in [`Call::req_pump`].
fn forward<'a>(
    route: &'a Route,
    req: Request<RecvStream>,
    respond: &'a mut SendResponse<Bytes>,
    start: Instant,
) -> impl Future<Output = Ended> + Send + 'a {
    let mut req = req;
    // Answered here, before the call's future is built: it then carries one byte for it.
    let (client_timeout, rejected) = match grpc::check_request_headers(req.headers_mut()) {
        Ok(t) => (t, None),
        Err(status) => {
            reply(respond, &status);
            (None, Some(status.code))
        }
    };
    let budget = match (route.timeout, client_timeout) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    async move {
        if let Some(code) = rejected {
            return Ended::at_proxy(None, code);
        }
        let cluster = &route.cluster;
        let Some(_admitted) = cluster.admit() else {
            let status = Status::new(
                Code::ResourceExhausted,
                format!(
                    "grpcgate: cluster \"{}\" has max_requests ({}) calls in flight",
                    cluster.name,
                    cluster.max_requests().unwrap_or_default()
                ),
            );
            reply(respond, &status);
            return Ended::at_proxy(None, status.code);
        };
        let deadline = budget.map(|b| start + b);
        let deadline_sleep = pin!(tokio::time::sleep_until(
            deadline.unwrap_or_else(|| start + Duration::from_secs(86_400 * 365))
        ));
        let (head, down_body) = req.into_parts();
        let mut call = Call {
            cluster,
            respond,
            deadline,
            budget,
            deadline_sleep,
            // Read with the request head, under h2's lock that took it: asking now would lock again.
            req_done: down_body.ended_with_head(),
            down_body,
            req_pump: Pump::new(None),
            refusals: 0,
            response_bytes: 0,
        };
        let (endpoint, code) = 'call: {
            // `_in_flight` and `_lease` are dropped when the call ends, after the stream handles.
            let Sent {
                idx,
                in_flight: _in_flight,
                lease: _lease,
                up_send,
                response,
            } = match send_call(&mut call, Request::from_parts(head, ())).await {
                Ok(sent) => sent,
                Err(end) => break 'call end,
            };
            let endpoint = &cluster.endpoints[idx];
            if cluster.tracks_latency && matches!(response, Some(Ok(_))) {
                // From the request's arrival to the response headers: a long stream does not read
                // as a slow backend.
                let now = Instant::now();
                endpoint.latency.observe(now - start, now);
            }
            let (down_send, up_body) = match forward_response_head(&mut call, endpoint, response) {
                Ok(streams) => streams,
                Err(code) => break 'call (Some(idx), code),
            };
            let code = stream_response(&mut call, endpoint, up_send, down_send, up_body).await;
            (Some(idx), code)
        };
        Ended {
            endpoint,
            code,
            request_bytes: call.req_pump.moved(),
            response_bytes: call.response_bytes,
            retries: call.refusals,
        }
    }
}

/// What the steps of one call share: the client's stream, the deadline, and the request body, which
/// flows upstream from the first attempt to the end of the response.
struct Call<'a> {
    cluster: &'a Cluster,
    respond: &'a mut SendResponse<Bytes>,
    deadline: Option<Instant>,
    /// The budget the deadline was set from, named in its status.
    budget: Option<Duration>,
    /// Fires at `deadline`; polled only when there is one.
    deadline_sleep: Pin<&'a mut Sleep>,
    down_body: RecvStream,
    req_pump: Pump<'a>,
    /// Whether the request body pump has finished (or failed on the upstream's side).
    req_done: bool,
    /// Times the call was sent again after a refusal.
    refusals: u8,
    /// DATA payload bytes forwarded to the client.
    response_bytes: u64,
}

impl Call<'_> {
    fn deadline_status(&self) -> Status {
        Status::new(
            Code::DeadlineExceeded,
            format!(
                "grpcgate: deadline of {}ms exceeded",
                self.budget.unwrap_or_default().as_millis()
            ),
        )
    }
}

/// A call sent upstream, with its answer.
struct Sent {
    /// The endpoint's index in the cluster.
    idx: usize,
    /// The call's share of the endpoint's load, and its stream slot on a connection: held to the end
    /// of the call.
    in_flight: InFlight,
    lease: Lease,
    /// The upstream stream's request side, for the rest of the request body.
    up_send: SendStream<Bytes>,
    /// The response head or the stream's failure; None: the deadline passed first.
    response: Option<Result<Response<RecvStream>, h2::Error>>,
}

/// Picks an endpoint, sends the call and waits for the response head (phase 1) while the request body
/// flows. Err: the call ended before a response head, with this endpoint and status (the client has
/// been answered, or is gone).
///
/// Attempts: one, plus one more for each time the upstream refuses the stream without processing it
/// (a GOAWAY whose last_stream_id is below it, or RST_STREAM(REFUSED_STREAM)) or the connection fails
/// before the call's HEADERS were written to it, up to MAX_REFUSALS. Nothing of the call has reached
/// an application then, so sending it again (to whichever endpoint the balancer picks now) is safe,
/// as gRPC clients' transparent retries are.
// Not an `async fn`: that holds `head` twice, and the call's future measured 360 bytes larger.
#[allow(clippy::manual_async_fn)]
fn send_call<'c, 'a>(
    call: &'c mut Call<'a>,
    mut head: Request<()>,
) -> impl Future<Output = Result<Sent, (Option<usize>, Code)>> + Send + use<'c, 'a> {
    async move {
        // The request body read so far, for sending the call again if the upstream refuses it.
        let mut replay = Replay::default();
        // Sends that failed before anything was sent: the pooled connection had gone away.
        let mut unsent = 0;
        // `head` is the request head to send next: the client's, then, for each resend, the one h2
        // kept for us.
        loop {
            // Pick an endpoint and get a stream slot on a connection to it.
            let acquired = tokio::select! {
                r = acquire(call.cluster) => r,
                _ = &mut call.deadline_sleep, if call.deadline.is_some() => Err(call.deadline_status()),
                _ = poll_fn(|cx| call.respond.poll_reset(cx)) => return Err((None, Code::Cancelled)),
            };
            let (idx, in_flight, lease) = match acquired {
                Ok(x) => x,
                Err(status) => {
                    reply(call.respond, &status);
                    return Err((None, status.code));
                }
            };
            let endpoint = &call.cluster.endpoints[idx];
            let headers_end_stream = call.req_done && replay.is_empty();
            // Matched in place, not bound: a bound result would take room in the call's future
            // for the rest of the attempt.
            let (resp_fut, mut up_send) = match lease.send(
                upstream_request(head, endpoint, call.deadline),
                headers_end_stream,
            ) {
                Ok(x) => x,
                Err(failure) => {
                    let (e, returned) = *failure;
                    lease.discard();
                    // The request came back, so nothing of it was sent: the connection takes no
                    // new stream (it received GOAWAY, failed, or ran out of stream ids). Safe to
                    // send elsewhere. A pooled connection is discarded as it is found, so these
                    // retries end with the pool; only failures of fresh connections count.
                    if let Some(returned) =
                        returned.filter(|_| !lease.is_fresh() || unsent < MAX_UNSENT)
                    {
                        if lease.is_fresh() {
                            unsent += 1;
                        }
                        tracing::debug!(endpoint = %endpoint.address, error = %e, "upstream connection unusable; sending the call on another");
                        head = returned;
                        continue;
                    }
                    let status = upstream_error_status(&e, endpoint);
                    reply(call.respond, &status);
                    return Err((Some(idx), status.code));
                }
            };
            if !headers_end_stream && call.refusals > 0 {
                // A failure shows again as the response's error.
                let _ = replay.send(&mut up_send, call.req_done);
            }
            let mut resp_fut = pin!(resp_fut);

            // Phase 1: wait for the upstream response headers. `biased`, deadline first: the upstream got
            // the same deadline and may answer "timed out" at the same moment, but the client must see
            // ours. The response before the client's reset: when it is ready the reset need not be polled
            // (a mutex round trip in h2), and if both are, sending the response fails and ends as
            // CANCELLED.
            let response = loop {
                tokio::select! {
                    biased;
                    _ = &mut call.deadline_sleep, if call.deadline.is_some() => break None,
                    r = &mut resp_fut => break Some(r),
                    _ = poll_fn(|cx| call.respond.poll_reset(cx)) => return Err((Some(idx), Code::Cancelled)),
                    r = poll_fn(|cx| call.req_pump.poll(cx, &mut call.down_body, &mut up_send, Some(&mut replay))), if !call.req_done => {
                        call.req_done = true;
                        if let Err(PumpError::Src(_)) = r {
                            // The client reset its stream or broke its connection.
                            return Err((Some(idx), Code::Cancelled));
                        }
                        // Ok, or the upstream stopped reading: the response (or its error) comes next.
                    }
                }
            };
            if let Some(Err(e)) = &response {
                if refused(e) {
                    endpoint.refused.inc();
                }
            }
            // The head h2 kept of a refused call, if it may be sent again; or of a call whose
            // HEADERS were still queued when the connection failed (the upstream closed it, say,
            // killed, before this proxy had read the close): nothing of it left the process.
            let Some((returned, goaway)) = (match &response {
                Some(Err(e)) if call.refusals < MAX_REFUSALS && replay.is_complete() => {
                    if refused(e) {
                        resp_fut
                            .take_request_head()
                            .map(|head| (head, e.is_go_away()))
                    } else {
                        resp_fut
                            .take_unwritten_request_head()
                            .map(|head| (head, true))
                    }
                }
                _ => None,
            }) else {
                return Ok(Sent {
                    idx,
                    in_flight,
                    lease,
                    up_send,
                    response,
                });
            };
            if let Some(Err(e)) = &response {
                tracing::debug!(endpoint = %endpoint.address, error = %e, "upstream refused the stream, or it failed unwritten; sending the call again");
            }
            // Dropped before the await below, so the call's future need not hold a response.
            drop(response);
            head = returned;
            // A client that reset its stream meanwhile must not have its call sent again.
            if poll_fn(|cx| Poll::Ready(call.respond.poll_reset(cx).is_ready())).await {
                return Err((Some(idx), Code::Cancelled));
            }
            if goaway {
                lease.discard();
            }
            call.refusals += 1;
            // The frame in flight is in the replay and goes again whole: its credit is due now.
            if let Some(credit) = call.req_pump.take_pending() {
                let _ = call.down_body.flow_control().release_capacity(credit);
            }
            call.req_pump.restart();
            call.req_done = call.down_body.is_end_stream();
        }
    }
}

/// Answers the client with the upstream's response head, or with the status the proxy makes of a
/// failed, late or non-gRPC answer. Ok: the client's response stream and the upstream's response
/// body, for phase 2. Err: the call is over, with this code (a trailers-only response included).
///
/// Synchronous, apart from the call's future: the response and its head (240 bytes) never take room
/// in it.
fn forward_response_head(
    call: &mut Call<'_>,
    endpoint: &Endpoint,
    response: Option<Result<Response<RecvStream>, h2::Error>>,
) -> Result<(SendStream<Bytes>, RecvStream), Code> {
    let fail = |call: &mut Call<'_>, status: Status| {
        reply(call.respond, &status);
        Err(status.code)
    };
    // An answer that arrives after our deadline passed (the timer not yet polled) still loses to it.
    let response = match response {
        Some(r) if call.deadline.is_none_or(|d| Instant::now() < d) => r,
        _ => return fail(call, call.deadline_status()),
    };
    let response = match response {
        Ok(r) => r,
        Err(e) => return fail(call, upstream_error_status(&e, endpoint)),
    };
    let (mut head, up_body) = response.into_parts();
    if head.status != StatusCode::OK {
        let status = Status::new(
            grpc::code_for_http_status(head.status),
            format!(
                "grpcgate: upstream {} answered HTTP {} instead of gRPC",
                endpoint.address, head.status
            ),
        );
        return fail(call, status);
    }
    // Read with the response head (see `Call::req_done`).
    let trailers_only = up_body.ended_with_head();
    // grpc-status in the headers counts only in a trailers-only response.
    let header_code = if trailers_only {
        head.headers.get(&GRPC_STATUS).map(Code::from_header)
    } else {
        None
    };
    // A 200 that is not gRPC (an HTML error page, a misrouted HTTP server). A trailers-only answer
    // with a grpc-status is gRPC even if the server left out the content-type.
    let is_grpc = grpc::is_grpc_content_type(head.headers.get(CONTENT_TYPE))
        || (trailers_only && header_code.is_some());
    if !is_grpc {
        let content_type = head
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none");
        let status = Status::new(
            Code::Unknown,
            format!(
                "grpcgate: upstream {} answered HTTP 200 with content-type \"{content_type}\" instead of gRPC",
                endpoint.address
            ),
        );
        return fail(call, status);
    }
    if trailers_only {
        endpoint.take_load_report(&mut head.headers);
    }
    if trailers_only && header_code.is_none() {
        missing_status(endpoint).write_to(&mut head.headers);
    }
    let down_send = match call
        .respond
        .send_response(Response::from_parts(head, ()), trailers_only)
    {
        Ok(s) => s,
        Err(_) => return Err(Code::Cancelled),
    };
    if trailers_only {
        return Err(header_code.unwrap_or(Code::Internal));
    }
    Ok((down_send, up_body))
}

/// Phase 2: streams the response body and trailers to the client (while the request body may still
/// flow, for bidi) and returns the status the call ended with.
fn stream_response<'c, 'a>(
    call: &'c mut Call<'a>,
    endpoint: &'c Endpoint,
    mut up_send: SendStream<Bytes>,
    mut down_send: SendStream<Bytes>,
    mut up_body: RecvStream,
) -> impl Future<Output = Code> + Send + use<'c, 'a> {
    enum End {
        Done(Result<Option<Code>, PumpError>),
        ClientGone,
        Deadline,
    }
    async move {
        let end = {
            let mut resp_pump = Pump::new(Some(endpoint));
            let end = loop {
                tokio::select! {
                    biased;
                    _ = &mut call.deadline_sleep, if call.deadline.is_some() => break End::Deadline,
                    r = poll_fn(|cx| resp_pump.poll(cx, &mut up_body, &mut down_send, None)) => break End::Done(r),
                    r = poll_fn(|cx| call.req_pump.poll(cx, &mut call.down_body, &mut up_send, None)), if !call.req_done => {
                        call.req_done = true;
                        if let Err(PumpError::Src(_)) = r {
                            break End::ClientGone;
                        }
                    }
                }
            };
            call.response_bytes = resp_pump.moved();
            end
        };
        match end {
            // The pump filled in INTERNAL if the upstream sent no grpc-status.
            End::Done(Ok(code)) => code.unwrap_or(Code::Internal),
            End::Done(Err(PumpError::Src(e))) => {
                // The upstream broke mid-stream: end the client's call with a status saying so.
                let status = upstream_error_status(&e, endpoint);
                let _ = down_send.send_trailers(status.to_trailers());
                status.code
            }
            End::Done(Err(PumpError::Dst(e))) => {
                tracing::debug!(error = ?e, "client went away mid-response");
                Code::Cancelled
            }
            End::ClientGone => Code::Cancelled,
            End::Deadline => {
                let _ = down_send.send_trailers(call.deadline_status().to_trailers());
                Code::DeadlineExceeded
            }
        }
        // Returning drops the upstream stream handles (before the call's lease and in-flight count);
        // h2 resets an unfinished upstream stream with CANCEL.
    }
}

/// The status for a response that ended without `grpc-status`.
fn missing_status(endpoint: &Endpoint) -> Status {
    Status::new(
        Code::Internal,
        format!(
            "grpcgate: upstream {} ended the response without grpc-status",
            endpoint.address
        ),
    )
}

/// Picks an endpoint and a stream slot on a connection to it (whether the connection still takes
/// streams shows when the call is sent on it). A connect failure moves on to
/// another endpoint (the call has not been sent anywhere yet, so this is always safe): the balancer's
/// next pick, so that a failing endpoint's calls spread as the balancer spreads calls (round robin
/// would otherwise hand them all to the endpoint after it), or, when that one was tried already, the
/// next available endpoint not yet tried.
async fn acquire(cluster: &Cluster) -> Result<(usize, InFlight, Lease), Status> {
    let n = cluster.endpoints.len();
    let mut i = cluster.pick().ok_or_else(|| {
        Status::new(
            Code::Unavailable,
            format!(
                "grpcgate: no healthy endpoint in cluster \"{}\"",
                cluster.name
            ),
        )
    })?;
    // Allocated only once a connect failed.
    let mut tried: Vec<usize> = Vec::new();
    let mut last_error;
    loop {
        let endpoint = &cluster.endpoints[i];
        // Counted from the pick, so calls waiting for a new connection count as load on it.
        let in_flight = endpoint.start_call();
        // A pooled connection that has just received GOAWAY is found out when the call is sent on
        // it, which gives the request back to be sent again (see `MAX_UNSENT`).
        match endpoint.pool.acquire().await {
            Ok(lease) => return Ok((i, in_flight, lease)),
            Err(e) => {
                last_error = e.to_string();
                cluster.report(i, true);
                tracing::debug!(cluster = %cluster.name, endpoint = %endpoint.address, error = %e, "no connection");
            }
        }
        drop(in_flight);
        tried.push(i);
        if tried.len() >= n {
            break;
        }
        let next = cluster.pick().filter(|j| !tried.contains(j)).or_else(|| {
            (1..n).map(|k| (i + k) % n).find(|j| {
                !tried.contains(j)
                    && (cluster.is_panicking() || cluster.endpoints[*j].is_available())
            })
        });
        match next {
            Some(j) => i = j,
            None => break,
        }
    }
    Err(Status::new(
        Code::Unavailable,
        format!(
            "grpcgate: no endpoint of cluster \"{}\" is reachable: {last_error}",
            cluster.name
        ),
    ))
}

/// The status a client sees when the upstream stream or connection fails.
fn upstream_error_status(e: &h2::Error, endpoint: &Endpoint) -> Status {
    let address = &endpoint.address;
    if e.is_go_away() {
        return Status::new(
            Code::Unavailable,
            format!("grpcgate: upstream {address} closed the connection (GOAWAY: {e})"),
        );
    }
    if let (Some(reason), true) = (e.reason(), e.is_reset()) {
        return Status::new(
            grpc::code_for_reason(reason),
            format!("grpcgate: upstream {address} reset the stream ({reason:?})"),
        );
    }
    Status::new(
        Code::Unavailable,
        format!("grpcgate: connection to upstream {address} failed: {e}"),
    )
}

/// The request URI as sent upstream: plaintext h2c, same path, same `:authority` as the client used
/// (or the endpoint address when the client sent none).
fn upstream_uri(uri: Uri, endpoint: &Endpoint) -> Uri {
    let mut parts = uri.into_parts();
    parts.scheme = Some(Scheme::HTTP);
    if parts.authority.is_none() {
        parts.authority = endpoint.address.parse().ok();
    }
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    Uri::from_parts(parts).unwrap_or_else(|_| {
        let mut p = Parts::default();
        p.scheme = Some(Scheme::HTTP);
        p.authority = endpoint.address.parse().ok();
        p.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        Uri::from_parts(p).expect("valid uri")
    })
}

/// Most times one call is sent again after its upstream refused it unprocessed.
const MAX_REFUSALS: u8 = 2;

/// How many connections opened for a call may turn out unusable (going away, failed) before
/// anything of the call was sent on them, before the call fails. Pooled connections found so do
/// not count: each is discarded as it is found, so retrying past them ends with the pool.
const MAX_UNSENT: u32 = 2;

/// The request to send upstream for `req` (the client's head, or the head h2 kept of a refused call):
/// an absolute URI, and the remaining budget as `grpc-timeout`.
fn upstream_request(
    mut req: Request<()>,
    endpoint: &Endpoint,
    deadline: Option<Instant>,
) -> Request<()> {
    *req.uri_mut() = upstream_uri(std::mem::take(req.uri_mut()), endpoint);
    let headers = req.headers_mut();
    // No hop-by-hop headers to strip: h2 treats a request carrying `connection`, `keep-alive`,
    // `transfer-encoding`, `upgrade`, `proxy-connection` or a `te` other than `trailers` as malformed
    // (RFC 9113 §8.2.2) and resets it before it gets here.
    if let Some(d) = deadline {
        let remaining = d.saturating_duration_since(Instant::now());
        // Never indexed: the value changes every call, and in the upstream connection's HPACK table
        // (shared by every client's calls) it would only push out the fields that do repeat.
        let mut timeout = grpc::encode_timeout(remaining);
        timeout.set_sensitive(true);
        headers.insert(GRPC_TIMEOUT.clone(), timeout);
    }
    req
}

#[cfg(test)]
mod tests {
    fn future_size<A, B, C, D, E, Fut>(_: impl FnOnce(A, B, C, D, E) -> Fut) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// Every call's task holds this future, allocated and moved once per call: keep it small (the
    /// connect path, which is large, is boxed).
    #[test]
    fn serve_stream_future_stays_small() {
        let size = future_size(|a, b, c, d: Option<&http::HeaderValue>, e| {
            super::serve_stream(a, b, c, d, e)
        });
        println!("serve_stream future: {size} bytes");
        // 1280 bytes before refused calls were sent again (from 2464 as async fns holding their
        // arguments twice); 1568 with the request head and body kept for that (debug build); in a
        // release build 1712, and 1784 with the head kept by h2 (a bound `Result` of
        // `send_retryable_request` alone added 280: match such results in place). 1520 (debug) once
        // `forward` was split into steps: the response head is handled in a plain function, so it
        // never takes room in the future.
        assert!(size <= 1792, "serve_stream future grew to {size} bytes");
    }
}
