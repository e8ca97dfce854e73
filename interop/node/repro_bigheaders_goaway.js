// Repro: a request whose metadata the grpc-js (Node/nghttp2) backend rejects with
// GOAWAY(COMPRESSION_ERROR) hangs at the proxy (no status ever, or only at the deadline), and so do
// the other calls in flight on the same upstream connection.
// Ports: backend 22150, proxy 22151, admin 22152.
'use strict';
const http2 = require('http2');
const { execSync } = require('child_process');
const L = require('./lib');
const { grpc } = L;
const BE = 22150, PX = 22151, AD = 22152;
const SIZE = Number(process.argv[2] || 200 * 1024);

function rawBig(port, size, timeoutMs) {
  return new Promise((resolve) => {
    const t0 = Date.now();
    const out = {};
    const s = http2.connect(`http://127.0.0.1:${port}`, { maxSendHeaderBlockLength: 1 << 24 });
    s.on('error', (e) => { out.sessionError = e.code; });
    s.on('goaway', (c) => { out.goaway = c; });
    const timer = setTimeout(() => { out.timedOut = true; out.ms = Date.now() - t0; s.destroy(); resolve(out); }, timeoutMs);
    const req = s.request({ ':method': 'POST', ':path': '/echo.Echo/Unary', 'content-type': 'application/grpc', te: 'trailers', 'x-big': 'a'.repeat(size) });
    req.on('response', (h) => { out.headers = h; });
    req.on('trailers', (t) => { out.trailers = t; });
    req.on('data', () => {});
    req.on('error', (e) => { out.error = e.code; });
    req.on('close', () => { clearTimeout(timer); out.rst = req.rstCode; out.ms = Date.now() - t0; s.close(); resolve(out); });
    req.end(Buffer.from([0, 0, 0, 0, 0]));
  });
}

async function main() {
  await L.requirePortsFree([BE, PX, AD]);
  const be = await L.startBackend(BE, 'b1');
  const px = await L.startProxy('repro_bigheaders', {
    admin: AD, listeners: [{ port: PX, routes: [{ service: 'echo.Echo', cluster: 'echo' }] }], clusters: [{ name: 'echo', endpoints: [BE] }],
  });
  try {
    const direct = await rawBig(BE, SIZE, 5000);
    console.log(`DIRECT to grpc-js backend, ${SIZE} B metadata:`, JSON.stringify(direct));

    const c = L.client(PX);
    await L.unary(c, { payload: Buffer.from('warm') });
    // a call in flight on the same upstream connection
    const slow = L.unary(c, { payload: Buffer.from('slow'), delayMs: 1000 }, { deadlineMs: 6000, timeoutMs: 8000 });
    await L.sleep(200);
    const via = await rawBig(PX, SIZE, 5000);
    console.log(`VIA PROXY, ${SIZE} B metadata:`, JSON.stringify(via));
    const s = await slow;
    console.log('in-flight call on the same upstream connection:', s.err ? `${L.codeName(s.err.code)} '${s.err.details}'` : 'OK');
    const md = new grpc.Metadata(); md.set('x-big', 'a'.repeat(SIZE));
    const t0 = Date.now();
    const g = await L.unary(c, { payload: Buffer.from('x') }, { metadata: md, deadlineMs: 3000, timeoutMs: 6000 });
    console.log(`grpc-js client with ${SIZE} B metadata, 3 s deadline, via proxy:`, g.err ? `${L.codeName(g.err.code)} '${g.err.details.slice(0, 80)}'` : 'OK', `after ${Date.now() - t0}ms`);
    const after = await L.unary(c, { payload: Buffer.from('after') });
    console.log('a normal call afterwards:', after.err ? L.codeName(after.err.code) : 'OK');
    try { console.log('sockets to backend:\n' + execSync(`ss -tn state established '( dport = :${BE} )'`).toString()); } catch {}
    L.check('R1', `request with ${SIZE} B metadata rejected by backend (GOAWAY COMPRESSION_ERROR) -> client gets a status promptly`,
      !via.timedOut && (via.trailers || via.headers || via.rst), JSON.stringify(via));
    L.check('R2', 'other call in flight on that upstream connection completes or fails promptly', !s.err || s.err.code !== 4,
      s.err ? `${L.codeName(s.err.code)} '${s.err.details}'` : 'OK');
    c.close();
  } finally {
    await L.stopProxy(px);
    await be.stop();
  }
  const log = L.proxyLog(px);
  L.finish('repro_bigheaders_goaway');
}
L.run(main);
