// Check 4: deadlines (client grpc-timeout, route timeout) and client cancellation.
// Ports: backend 22130, proxy (no route timeout) 22131, admin 22132, proxy listener with route timeout
// 300ms 22133, raw http2 backend 22134.
'use strict';
const http2 = require('http2');
const L = require('./lib');
const { grpc } = L;

const BE = 22130, PX = 22131, AD = 22132, PXT = 22133, RAW = 22134;

function startRaw(port) {
  const seen = [];
  const server = http2.createServer();
  server.on('stream', (stream, headers) => {
    const rec = { headers, at: Date.now(), closedAt: null, rst: null };
    seen.push(rec);
    stream.on('error', () => {});
    stream.on('close', () => { rec.closedAt = Date.now(); rec.rst = stream.rstCode; });
    stream.resume();
    const delay = Number(headers['x-delay'] || 0);
    setTimeout(() => {
      if (stream.destroyed || stream.closed) return;
      stream.respond({ ':status': 200, 'content-type': 'application/grpc' }, { waitForTrailers: true });
      stream.on('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '0' }));
      stream.end(Buffer.from([0, 0, 0, 0, 0]));
    }, delay);
  });
  return new Promise((res) => server.listen(port, '127.0.0.1', () => res({ server, seen })));
}

function parseTimeoutMs(v) {
  const m = /^(\d{1,8})([HMSmun])$/.exec(v || '');
  if (!m) return null;
  return Number(m[1]) * { H: 3600000, M: 60000, S: 1000, m: 1, u: 1e-3, n: 1e-6 }[m[2]];
}

const rawUnary = (port, path, headers) => L.rawCall(port, { ':path': path, ...headers });
const statusOf = (r) => (r.trailers && r.trailers['grpc-status']) || (r.headers && r.headers['grpc-status']);

async function main() {
  await L.requirePortsFree([BE, PX, AD, PXT, RAW]);
  const be = await L.startBackend(BE, 'b1');
  const raw = await startRaw(RAW);
  const routes = (timeout) => [{ service: 'raw.Raw', cluster: 'raw', ...timeout }, { service: 'echo.Echo', cluster: 'echo', ...timeout }];
  const px = await L.startProxy('t4', {
    admin: AD,
    listeners: [{ name: 'plain', port: PX, routes: routes({}) }, { name: 'timed', port: PXT, routes: routes({ timeout: '300ms' }) }],
    clusters: [{ name: 'echo', endpoints: [BE] }, { name: 'raw', endpoints: [RAW] }],
  });
  const c = L.client(PX);
  const ct = L.client(PXT);
  try {
    // 4.1 client deadline -> DEADLINE_EXCEEDED, and the backend got grpc-timeout
    be.calls.length = 0;
    let t0 = Date.now();
    let r = await L.unary(c, { payload: Buffer.from('x'), delayMs: 2000 }, { deadlineMs: 500 });
    let el = Date.now() - t0;
    const bc = be.calls.pop();
    const beDeadline = bc && bc.deadline !== Infinity ? new Date(bc.deadline).getTime() - t0 : null;
    L.check('4.1', 'client deadline 500ms, backend 2s -> DEADLINE_EXCEEDED at ~500ms; backend deadline ~500ms',
      r.err && r.err.code === 4 && el < 1200 && beDeadline !== null && beDeadline > 300 && beDeadline <= 560,
      `${r.err ? L.codeName(r.err.code) + " '" + r.err.details + "'" : 'OK'} after ${el}ms; backend deadline in ${beDeadline}ms`);
    await L.sleep(200);
    L.check('4.1b', 'backend call ended (cancelled) after the deadline', bc && bc.cancelled, `cancelled=${bc && bc.cancelled}`);
    // raw: the exact grpc-timeout header forwarded
    raw.seen.length = 0;
    let rr = await rawUnary(PX, '/raw.Raw/M', { 'grpc-timeout': '2S' });
    let gt = raw.seen[0] && raw.seen[0].headers['grpc-timeout'];
    L.check('4.1c', 'raw: client grpc-timeout 2S -> backend gets a valid grpc-timeout <= 2s', parseTimeoutMs(gt) !== null && parseTimeoutMs(gt) <= 2000 && parseTimeoutMs(gt) > 1800 && statusOf(rr) === '0',
      `backend grpc-timeout='${gt}' status=${statusOf(rr)}`);

    // 4.2 route timeout 300ms shorter than client deadline 5s
    be.calls.length = 0;
    t0 = Date.now();
    r = await L.unary(ct, { payload: Buffer.from('x'), delayMs: 2000 }, { deadlineMs: 5000 });
    el = Date.now() - t0;
    let bc2 = be.calls.pop();
    let bd2 = bc2 && bc2.deadline !== Infinity ? new Date(bc2.deadline).getTime() - t0 : null;
    L.check('4.2', 'route timeout 300ms < client deadline 5s -> DEADLINE_EXCEEDED at ~300ms; backend deadline ~300ms',
      r.err && r.err.code === 4 && el >= 280 && el < 1000 && bd2 !== null && bd2 <= 360,
      `${r.err ? L.codeName(r.err.code) + " '" + r.err.details + "'" : 'OK'} after ${el}ms; backend deadline in ${bd2}ms`);
    // 4.2b route timeout, no client deadline
    t0 = Date.now();
    r = await L.unary(ct, { payload: Buffer.from('x'), delayMs: 2000 });
    el = Date.now() - t0;
    L.check('4.2b', 'route timeout 300ms, no client deadline -> DEADLINE_EXCEEDED at ~300ms', r.err && r.err.code === 4 && el < 1000,
      `${r.err ? L.codeName(r.err.code) + " '" + r.err.details + "'" : 'OK'} after ${el}ms`);
    // 4.2c client deadline shorter than route timeout wins
    t0 = Date.now();
    r = await L.unary(ct, { payload: Buffer.from('x'), delayMs: 2000 }, { deadlineMs: 120 });
    el = Date.now() - t0;
    L.check('4.2c', 'client deadline 120ms < route timeout 300ms -> DEADLINE_EXCEEDED at ~120ms', r.err && r.err.code === 4 && el < 280,
      `${r.err ? L.codeName(r.err.code) : 'OK'} after ${el}ms`);
    // 4.2d a streaming call whose route timeout expires mid-stream
    t0 = Date.now();
    let s = await L.collect(ct.ServerStream({ payload: Buffer.from('x'), count: 20, delayMs: 100 }));
    el = Date.now() - t0;
    L.check('4.2d', 'server stream outliving the 300ms route timeout -> some messages then DEADLINE_EXCEEDED', s.status.code === 4 && s.msgs.length >= 1 && s.msgs.length <= 4 && el < 1000,
      `${L.codeName(s.status.code)} '${s.status.details}' msgs=${s.msgs.length} after ${el}ms`);
    // 4.2e raw: route timeout replaces a longer client grpc-timeout upstream
    raw.seen.length = 0;
    rr = await rawUnary(PXT, '/raw.Raw/M', { 'grpc-timeout': '10S' });
    gt = raw.seen[0] && raw.seen[0].headers['grpc-timeout'];
    L.check('4.2e', 'raw: client grpc-timeout 10S on a 300ms route -> backend grpc-timeout <= 300ms', parseTimeoutMs(gt) !== null && parseTimeoutMs(gt) <= 300,
      `backend grpc-timeout='${gt}'`);
    // 4.2f fast call well within the route timeout succeeds
    r = await L.unary(ct, { payload: Buffer.from('x'), delayMs: 50 });
    L.check('4.2f', 'call within the route timeout succeeds', !r.err, r.err ? r.err.details : '');

    // 4.3 client cancel mid-stream -> backend sees cancelled
    {
      be.calls.length = 0;
      const call = c.ServerStream({ payload: Buffer.from('x'), count: 100, delayMs: 50 });
      const got = [];
      const st = new Promise((res) => call.on('status', res));
      call.on('error', () => {});
      await new Promise((res) => call.on('data', (m) => { got.push(m); if (got.length === 3) res(); }));
      call.cancel();
      const status = await L.withTimeout(st, 3000, 'status after cancel');
      const rec = be.calls.find((x) => x.method === 'ServerStream');
      const seen = await L.waitFor(() => rec && rec.cancelled, 2000, 20);
      L.check('4.3', 'client cancels server stream after 3 msgs -> client CANCELLED, backend call sees cancelled', status.code === 1 && seen,
        `client=${L.codeName(status.code)} backend cancelled=${rec && rec.cancelled}`);
    }
    {
      be.calls.length = 0;
      const call = c.Bidi();
      const st = new Promise((res) => call.on('status', res));
      call.on('error', () => {});
      const got = new Promise((res) => call.once('data', res));
      call.write({ payload: Buffer.from('1') });
      await L.withTimeout(got, 3000, 'bidi reply');
      call.cancel();
      await L.withTimeout(st, 3000, 'bidi status');
      const rec = be.calls.find((x) => x.method === 'Bidi');
      const seen = await L.waitFor(() => rec && rec.cancelled, 2000, 20);
      L.check('4.3b', 'client cancels bidi mid-stream -> backend sees cancelled', seen, `backend cancelled=${rec && rec.cancelled}`);
    }
    {
      be.calls.length = 0;
      const call = c.ClientStream((err) => {});
      call.on('error', () => {});
      call.write({ payload: Buffer.from('1') });
      await L.waitFor(() => be.calls.some((x) => x.method === 'ClientStream'), 2000, 20);
      await L.sleep(100);
      call.cancel();
      const rec = be.calls.find((x) => x.method === 'ClientStream');
      const seen = await L.waitFor(() => rec && rec.cancelled, 2000, 20);
      L.check('4.3c', 'client cancels client stream mid-way -> backend sees cancelled', seen, `backend cancelled=${rec && rec.cancelled}`);
    }
    {
      be.calls.length = 0;
      const call = c.Unary({ payload: Buffer.from('x'), delayMs: 3000 }, (err) => {});
      await L.waitFor(() => be.calls.some((x) => x.method === 'Unary'), 2000, 20);
      call.cancel();
      const rec = be.calls.find((x) => x.method === 'Unary');
      const seen = await L.waitFor(() => rec && rec.cancelled, 2000, 20);
      L.check('4.3d', 'client cancels a pending unary -> backend sees cancelled', seen, `backend cancelled=${rec && rec.cancelled}`);
    }
    {
      // client connection closed (channel closed) mid stream
      const c2 = L.client(PX);
      be.calls.length = 0;
      const call = c2.ServerStream({ payload: Buffer.from('x'), count: 100, delayMs: 50 });
      call.on('error', () => {});
      await new Promise((res) => call.once('data', res));
      c2.close();
      call.cancel();
      const rec = be.calls.find((x) => x.method === 'ServerStream');
      const seen = await L.waitFor(() => rec && rec.cancelled, 2000, 20);
      L.check('4.3e', 'client closes its channel mid-stream -> backend sees cancelled', seen);
    }
    // 4.3f raw: RST_STREAM(CANCEL) from the client -> upstream stream reset
    {
      raw.seen.length = 0;
      const s = http2.connect(`http://127.0.0.1:${PX}`);
      s.on('error', () => {});
      const req = s.request({ ':method': 'POST', ':path': '/raw.Raw/M', 'content-type': 'application/grpc', te: 'trailers', 'x-delay': '3000' });
      req.on('error', () => {});
      req.write(Buffer.from([0, 0, 0, 0, 0]));
      await L.waitFor(() => raw.seen.length > 0, 2000, 10);
      req.close(http2.constants.NGHTTP2_CANCEL);
      const ok = await L.waitFor(() => raw.seen[0] && raw.seen[0].closedAt, 2000, 10);
      L.check('4.3f', 'raw RST_STREAM(CANCEL) from client -> upstream stream closed with a reset', ok && raw.seen[0].rst === http2.constants.NGHTTP2_CANCEL,
        `closed=${!!ok} rst=${raw.seen[0] && raw.seen[0].rst}`);
      s.close();
    }

    // 4.4 metrics counted
    await L.sleep(300);
    const m = await L.scrape(AD);
    const de = L.metricValue(m, 'grpcgate_requests_total', { listener: 'timed', grpc_status: 'DEADLINE_EXCEEDED' });
    const dep = L.metricValue(m, 'grpcgate_requests_total', { listener: 'plain', grpc_status: 'DEADLINE_EXCEEDED' });
    const cat = L.metricValue(m, 'grpcgate_requests_total', { listener: 'timed', grpc_status: 'CANCELLED' });
    const ca = L.metricValue(m, 'grpcgate_requests_total', { listener: 'plain', grpc_status: 'CANCELLED' });
    // timed listener: 4.2, 4.2b, 4.2d are route-timeout expiries (4.2c is the client's own 120ms deadline)
    L.check('4.4', 'metrics: route-timeout expiries counted DEADLINE_EXCEEDED; client cancels counted CANCELLED', de >= 3 && ca >= 6,
      `timed: DEADLINE_EXCEEDED=${de} CANCELLED=${cat}; plain: DEADLINE_EXCEEDED=${dep} CANCELLED=${ca}`);
    L.info('4.4b', 'calls that hit the *client* deadline (grpc-js cancels with RST_STREAM at the same moment)',
      `4.1 and 4.2c are counted as ${dep ? 'DEADLINE_EXCEEDED (some)' : ''}${(ca > 6 || cat) ? ' CANCELLED (some)' : ''}: client and proxy timers race`);

    // 4.5 grpc-timeout edge values from a raw client
    for (const [v, expect] of [['0m', 'deadline'], ['1n', 'deadline'], ['99999999H', 'ok'], ['abc', '?'], ['123456789S', '?'], ['1.5S', '?'], ['-1S', '?'], ['', '?'], ['10 S', '?']]) {
      raw.seen.length = 0;
      rr = await rawUnary(PX, '/raw.Raw/M', { 'grpc-timeout': v });
      const fwd = raw.seen[0] ? raw.seen[0].headers['grpc-timeout'] : '(not forwarded)';
      L.info('4.5', `client grpc-timeout '${v}'`, `status=${statusOf(rr)} msg='${(rr.trailers || rr.headers || {})['grpc-message'] || ''}' rst=${rr.rstCode} backend got grpc-timeout=${JSON.stringify(fwd)}`);
    }
    // grpc-js backend given an invalid grpc-timeout through the proxy
    rr = await rawUnary(PX, '/echo.Echo/Unary', { 'grpc-timeout': 'abc' });
    L.info('4.5b', "invalid grpc-timeout 'abc' to grpc-js backend via proxy", `status=${statusOf(rr)} msg='${decodeURIComponent(((rr.trailers || rr.headers || {})['grpc-message']) || '')}'`);
    r = await L.unary(c, { payload: Buffer.from('again') });
    L.check('4.6', 'proxy still serves', !r.err && px.exited === null);
  } finally {
    c.close(); ct.close();
    await L.stopProxy(px);
    await be.stop();
    raw.server.close();
  }
  L.finish('t4_deadlines');
}

L.run(main);
