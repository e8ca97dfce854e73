// Check 9 (extra): upstream failure modes as seen by a grpc-js client: RST_STREAM codes, non-200 HTTP
// statuses, non-gRPC 200, graceful GOAWAY (grpc-js tryShutdown) with calls in flight, a backend that
// dies mid-stream.
// Ports: raw http2 backend 22190, grpc-js backends 22191 22192, proxy 22193, admin 22194.
'use strict';
const http2 = require('http2');
const L = require('./lib');
const { grpc } = L;
const RAW = 22190, G1 = 22191, G2 = 22192, PX = 22193, AD = 22194;

function startRaw(port) {
  const server = http2.createServer();
  const sessions = new Set();
  server.on('session', (s) => { sessions.add(s); s.on('close', () => sessions.delete(s)); });
  server.on('stream', (stream, headers) => {
    stream.on('error', () => {});
    stream.resume();
    const mode = headers['x-mode'] || '';
    const [kind, arg] = mode.split(':');
    if (kind === 'rst') return stream.close(Number(arg));
    if (kind === 'rstmid') {
      stream.respond({ ':status': 200, 'content-type': 'application/grpc' });
      stream.write(Buffer.from([0, 0, 0, 0, 0]));
      return setTimeout(() => stream.close(Number(arg)), 50);
    }
    if (kind === 'http') return stream.respond({ ':status': Number(arg), 'content-type': 'text/plain' }, { endStream: true });
    if (kind === 'html') { stream.respond({ ':status': 200, 'content-type': 'text/html' }); return stream.end('<html>oops</html>'); }
    if (kind === 'goaway-err') { // error GOAWAY naming this stream as processed, socket left open
      stream.session.goaway(http2.constants.NGHTTP2_INTERNAL_ERROR, stream.id);
      return;
    }
    if (kind === 'destroy-mid') {
      stream.respond({ ':status': 200, 'content-type': 'application/grpc' });
      stream.write(Buffer.from([0, 0, 0, 0, 0]));
      return setTimeout(() => stream.session.destroy(), 50);
    }
    stream.respond({ ':status': 200, 'content-type': 'application/grpc' }, { waitForTrailers: true });
    stream.on('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '0' }));
    stream.end(Buffer.from([0, 0, 0, 0, 0]));
  });
  return new Promise((res) => server.listen(port, '127.0.0.1', () => res({ server, sessions })));
}

function call(c, mode, deadlineMs = 4000) {
  const metadata = new grpc.Metadata(); metadata.set('x-mode', mode);
  return L.bytesUnary(c, '/raw.Raw/M', { metadata, deadlineMs });
}

async function main() {
  await L.requirePortsFree([RAW, G1, G2, PX, AD]);
  const raw = await startRaw(RAW);
  let g1 = await L.startBackend(G1, 'g1');
  const g2 = await L.startBackend(G2, 'g2');
  const px = await L.startProxy('t9', {
    admin: AD,
    listeners: [{ port: PX, routes: [{ service: 'raw.Raw', cluster: 'raw' }, { service: 'echo.Echo', cluster: 'echo' }] }],
    clusters: [{ name: 'raw', endpoints: [RAW] }, { name: 'echo', endpoints: [G1, G2] }],
  });
  const gc = new grpc.Client(`127.0.0.1:${PX}`, grpc.credentials.createInsecure());
  const c = L.client(PX);
  try {
    const C = http2.constants;
    const rstCases = [[C.NGHTTP2_REFUSED_STREAM, 14], [C.NGHTTP2_CANCEL, 1], [C.NGHTTP2_ENHANCE_YOUR_CALM, 8], [C.NGHTTP2_INADEQUATE_SECURITY, 7], [C.NGHTTP2_INTERNAL_ERROR, 13], [C.NGHTTP2_PROTOCOL_ERROR, 13]];
    let bad = [];
    for (const [rc, want] of rstCases) {
      const r = await call(gc, `rst:${rc}`);
      if (!r.err || r.err.code !== want) bad.push(`RST ${rc}: got ${r.err ? L.codeName(r.err.code) : 'OK'} want ${L.codeName(want)}`);
    }
    L.check('9.1', 'upstream RST_STREAM before response -> REFUSED 14, CANCEL 1, ENHANCE_YOUR_CALM 8, INADEQUATE_SECURITY 7, other 13', bad.length === 0, bad.join('; '));
    // (mid-response RST_STREAM is checked frame-exactly in t9b_upstream_frames.js: Node's stream.close()
    // ends the stream with END_STREAM before its RST_STREAM, so it cannot produce that case)
    bad = [];
    for (const [st, want] of [[400, 13], [401, 16], [403, 7], [404, 12], [429, 14], [502, 14], [503, 14], [504, 14], [500, 2], [415, 2]]) {
      const r = await call(gc, `http:${st}`);
      if (!r.err || r.err.code !== want) bad.push(`HTTP ${st}: got ${r.err ? L.codeName(r.err.code) : 'OK'} want ${L.codeName(want)}`);
    }
    L.check('9.2', 'upstream non-200 HTTP status mapped per README table', bad.length === 0, bad.join('; '));
    let r = await call(gc, 'html');
    L.check('9.3', 'upstream 200 text/html -> UNKNOWN', r.err && r.err.code === 2, r.err ? `'${r.err.details}'` : 'OK');
    r = await call(gc, 'destroy-mid');
    L.check('9.4', 'upstream connection dies mid-response -> UNAVAILABLE', r.err && r.err.code === 14, r.err ? `${L.codeName(r.err.code)} '${r.err.details}' ${r.ms}ms` : 'OK');
    r = await call(gc, 'goaway-err', 3000);
    L.check('9.5', 'upstream GOAWAY(INTERNAL_ERROR) naming the in-flight stream, socket left open -> client gets an error promptly (not at its deadline)',
      r.err && r.err.code !== 4 && r.ms < 2000, r.err ? `${L.codeName(r.err.code)} '${r.err.details.slice(0, 100)}' after ${r.ms}ms` : 'OK');
    r = await call(gc, '');
    L.check('9.5b', 'raw backend still usable afterwards', !r.err, r.err ? r.err.details : '');

    // 9.6 graceful GOAWAY: grpc-js backend tryShutdown() with a call in flight -> that call finishes OK;
    // following calls go to the other backend without errors
    const calls = [];
    for (let i = 0; i < 4; i++) calls.push(L.unary(c, { payload: Buffer.from('slow'), delayMs: 800 }, { timeoutMs: 5000 }));
    await L.sleep(200);
    const shut = new Promise((res) => g1.server.tryShutdown(res));
    await L.sleep(100);
    const after = [];
    for (let i = 0; i < 10; i++) after.push(await L.unary(c, { payload: Buffer.from('x') }));
    const inflight = await Promise.all(calls);
    await L.withTimeout(shut, 5000, 'tryShutdown');
    const ib = inflight.filter((x) => x.err);
    const ab = after.filter((x) => x.err);
    L.check('9.6', 'backend graceful shutdown (GOAWAY) with 2 calls in flight: in-flight calls complete OK, new calls succeed on the other backend',
      ib.length === 0 && ab.length === 0 && after.every((x) => x.resp.backend === 'g2'),
      `in-flight errors=${ib.map((x) => L.codeName(x.err.code) + " '" + x.err.details + "'")} after errors=${ab.map((x) => L.codeName(x.err.code) + " '" + x.err.details + "'")} after backends=${[...new Set(after.filter((x) => !x.err).map((x) => x.resp.backend))]}`);
    g1 = await L.startBackend(G1, 'g1');
    // 9.7 backend killed mid server-stream -> UNAVAILABLE
    {
      const rr = await L.withTimeout(new Promise((resolve) => {
        const callS = c.ServerStream({ payload: Buffer.from('s'), count: 100, delayMs: 30 });
        let backend = null; let n = 0;
        callS.on('data', (m) => {
          n++;
          if (n === 3) { backend = m.backend; (backend === 'g1' ? g1 : g2).server.forceShutdown(); }
        });
        callS.on('error', () => {});
        callS.on('status', (s) => resolve({ s, n, backend }));
      }), 5000, 'killed mid stream');
      L.check('9.7', 'backend force-shutdown mid server-stream -> client gets UNAVAILABLE after the messages so far', rr.s.code === 14 && rr.n >= 3,
        `${L.codeName(rr.s.code)} '${rr.s.details}' after ${rr.n} msgs`);
    }
    L.check('9.8', 'proxy alive', px.exited === null);
  } finally {
    gc.close(); c.close();
    await L.stopProxy(px);
    await g1.stop(); await g2.stop();
    for (const s of raw.sessions) s.destroy();
    raw.server.close();
  }
  L.finish('t9_upstream_failures');
}
L.run(main);
