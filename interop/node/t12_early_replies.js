// Check 12 (extra): the proxy (or backend) answers while the client is still streaming its request body:
// grpc-js client-streaming / bidi calls to an unrouted service, to an unreachable cluster, past a route
// timeout, and a backend that answers before reading the body. The client must see the status, not a
// bare RST_STREAM. Also request trailers from a raw h2 client.
// Ports: backend 22220, proxy 22221, admin 22222, dead endpoint 22229.
'use strict';
const http2 = require('http2');
const L = require('./lib');
const { grpc } = L;
const BE = 22220, PX = 22221, AD = 22222, DEAD = 22229;

function streamingCall(port, path, { msgs = 200, size = 32 * 1024, bidi = false } = {}) {
  const gc = new grpc.Client(`127.0.0.1:${port}`, grpc.credentials.createInsecure(), { 'grpc.use_local_subchannel_pool': 1 });
  return L.withTimeout(new Promise((resolve) => {
    const t0 = Date.now();
    let written = 0;
    const done = (err) => { gc.close(); resolve({ err, ms: Date.now() - t0, written }); };
    const call = bidi
      ? gc.makeBidiStreamRequest(path, (b) => b, (b) => b)
      : gc.makeClientStreamRequest(path, (b) => b, (b) => b, (err) => done(err));
    if (bidi) { call.on('data', () => {}); call.on('status', (s) => done(s.code ? s : null)); }
    call.on('error', () => {});
    // a valid EchoRequest: field 1 (bytes) of `size` bytes
    const varint = []; let n = size; while (n > 127) { varint.push((n & 127) | 128); n >>= 7; } varint.push(n);
    const payload = Buffer.concat([Buffer.from([0x0a, ...varint]), Buffer.alloc(size, 1)]);
    const pump = () => {
      while (written < msgs) {
        written++;
        if (!call.write(payload)) return call.once('drain', pump);
      }
      call.end();
    };
    pump();
  }), 10000, path);
}
const desc = (r) => (r.err ? `${L.codeName(r.err.code)} '${(r.err.details || '').slice(0, 110)}' after ${r.ms}ms` : `OK after ${r.ms}ms`);

async function main() {
  await L.requirePortsFree([BE, PX, AD, DEAD]);
  const be = await L.startBackend(BE, 'b1', {
    onUnary: () => false,
  });
  // a handler that answers FAILED_PRECONDITION at once without reading the client stream
  be.server.register('/early.E/Reject', (call, cb) => { cb({ code: grpc.status.FAILED_PRECONDITION, details: 'rejected early' }); }, (x) => x, (b) => b, 'clientStream');
  const px = await L.startProxy('t12', {
    admin: AD,
    listeners: [{
      port: PX,
      routes: [{ service: 'echo.Echo', method: 'Bidi', cluster: 'echo', timeout: '300ms' }, { service: 'echo.Echo', cluster: 'echo' },
        { service: 'early.E', cluster: 'echo' }, { service: 'dead.D', cluster: 'dead' }],
    }],
    clusters: [{ name: 'echo', endpoints: [BE] }, { name: 'dead', endpoints: [DEAD] }],
  });
  try {
    let r = await streamingCall(PX, '/nope.N/Upload');
    L.check('12.1', 'client streaming 200 x 32 KiB to an unrouted service -> UNIMPLEMENTED (not a reset)', r.err && r.err.code === 12, desc(r));
    r = await streamingCall(PX, '/dead.D/Upload');
    L.check('12.2', 'client streaming 6 MiB to an unreachable cluster -> UNAVAILABLE', r.err && r.err.code === 14, desc(r));
    r = await streamingCall(PX, '/early.E/Reject');
    L.check('12.3', 'backend answers FAILED_PRECONDITION without reading a 6 MiB client stream -> client sees FAILED_PRECONDITION', r.err && r.err.code === 9, desc(r));
    r = await streamingCall(PX, '/echo.Echo/Bidi', { bidi: true, msgs: 100000, size: 1024 });
    L.check('12.4', 'bidi still sending when the 300 ms route timeout fires -> DEADLINE_EXCEEDED', r.err && r.err.code === 4, desc(r));
    r = await streamingCall(BE, '/early.E/Reject');
    L.info('12.3d', 'same early reject DIRECTLY against the grpc-js backend', desc(r));
    // request trailers (not used by gRPC) from a raw client
    const tr = await L.withTimeout(new Promise((resolve) => {
      const s = http2.connect(`http://127.0.0.1:${PX}`);
      s.on('error', () => {});
      const out = {};
      const req = s.request({ ':method': 'POST', ':path': '/echo.Echo/Unary', 'content-type': 'application/grpc', te: 'trailers' }, { waitForTrailers: true });
      req.on('wantTrailers', () => req.sendTrailers({ 'x-req-trailer': 'v' }));
      req.on('response', (h) => { out.headers = h; });
      req.on('trailers', (t) => { out.trailers = t; });
      req.on('data', () => {});
      req.on('error', (e) => { out.error = e.code; });
      req.on('close', () => { out.rst = req.rstCode; s.close(); resolve(out); });
      req.end(Buffer.from([0, 0, 0, 0, 0]));
    }), 5000, 'request trailers');
    L.info('12.5', 'raw request with HTTP/2 request trailers after the body', `trailers=${JSON.stringify(tr.trailers)} rst=${tr.rst} err=${tr.error}`);
    const ok = await L.unary(L.client(PX), { payload: Buffer.from('x') });
    L.check('12.6', 'proxy alive', !ok.err && px.exited === null);
  } finally {
    await L.stopProxy(px);
    await be.stop();
  }
  L.finish('t12_early_replies');
}
L.run(main);
