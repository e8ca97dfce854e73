// Check 5: edge-case requests from Node's raw http2 client (things a gRPC library would not send).
// Ports: grpc-js backend 22140, proxy "edge" (service routes only) 22141, admin 22142,
// proxy "any" (catch-all route) 22143.
'use strict';
const http2 = require('http2');
const net = require('net');
const L = require('./lib');
const { grpc } = L;

const BE = 22140, PX = 22141, AD = 22142, PXA = 22143;

// One request on its own connection. Returns what came back, never hangs (timeout -> timedOut).
function rawReq(port, headers, opts = {}) {
  const { body, endStream = false, rstAfterHeaders = false, timeoutMs = 4000, sessionOptions = {}, noDefaults = false } = opts;
  return new Promise((resolve) => {
    const t0 = Date.now();
    const out = { data: Buffer.alloc(0) };
    let done = false;
    const finish = () => {
      if (done) return;
      done = true;
      out.ms = Date.now() - t0;
      clearTimeout(timer);
      try { s.close(); } catch {}
      setTimeout(() => { try { s.destroy(); } catch {} }, 200);
      resolve(out);
    };
    const timer = setTimeout(() => { out.timedOut = true; finish(); }, timeoutMs);
    const s = http2.connect(`http://127.0.0.1:${port}`, sessionOptions);
    s.on('error', (e) => { out.sessionError = e.code || e.message; finish(); });
    s.on('goaway', (code) => { out.goaway = code; });
    const base = noDefaults ? {} : { ':method': 'POST', ':path': '/echo.Echo/Unary', 'content-type': 'application/grpc', te: 'trailers' };
    const h = { ...base, ...headers };
    for (const k of Object.keys(h)) if (h[k] === undefined) delete h[k];
    let req;
    try {
      req = s.request(h, { endStream });
    } catch (e) {
      out.clientRefused = e.code || e.message;
      return finish();
    }
    req.on('response', (hh, flags) => { out.headers = hh; out.headersEndStream = !!(flags & 1); });
    req.on('trailers', (t) => { out.trailers = t; });
    req.on('data', (d) => { out.data = Buffer.concat([out.data, d]); });
    req.on('error', (e) => { out.error = e.code || e.message; });
    req.on('close', () => { out.rstCode = req.rstCode; finish(); });
    if (rstAfterHeaders) {
      req.on('ready', () => req.close(http2.constants.NGHTTP2_CANCEL));
      return;
    }
    if (!endStream) req.end(body === undefined ? Buffer.from([0, 0, 0, 0, 5, 0x0a, 3, 0x61, 0x62, 0x63]) : body);
  });
}

function describe(r) {
  const parts = [];
  if (r.clientRefused) parts.push(`node refused to send: ${r.clientRefused}`);
  if (r.timedOut) parts.push('TIMED OUT');
  if (r.sessionError) parts.push(`session error ${r.sessionError}`);
  if (r.goaway !== undefined) parts.push(`GOAWAY ${r.goaway}`);
  if (r.headers) {
    const h = r.headers;
    parts.push(`HTTP ${h[':status']}${r.headersEndStream ? ' trailers-only' : ''} ct=${h['content-type']}`);
    if (h['grpc-status'] !== undefined) parts.push(`grpc-status ${h['grpc-status']} '${decodeURIComponent(h['grpc-message'] || '').slice(0, 120)}'`);
  }
  if (r.trailers) parts.push(`trailers grpc-status ${r.trailers['grpc-status']} '${decodeURIComponent(r.trailers['grpc-message'] || '').slice(0, 120)}'`);
  if (r.data && r.data.length) parts.push(`${r.data.length} body bytes`);
  if (r.rstCode) parts.push(`RST_STREAM ${r.rstCode}`);
  if (r.error && !r.rstCode) parts.push(`stream error ${r.error}`);
  parts.push(`${r.ms}ms`);
  return parts.join(', ');
}

function grpcStatus(r) {
  if (r.trailers && r.trailers['grpc-status'] !== undefined) return Number(r.trailers['grpc-status']);
  if (r.headers && r.headers['grpc-status'] !== undefined) return Number(r.headers['grpc-status']);
  return null;
}

// "Sensible": a gRPC status in an HTTP 200 response, or a stream reset (malformed request per RFC 9113),
// and never a hang or a bare HTTP error status.
function sensible(r) {
  if (r.timedOut) return false;
  if (r.headers && r.headers[':status'] !== 200) return false;
  if (r.headers && grpcStatus(r) === null) return false;
  if (!r.headers && !r.rstCode && !r.sessionError && !r.clientRefused) return false;
  return true;
}

async function main() {
  await L.requirePortsFree([BE, PX, AD, PXA]);
  const be = await L.startBackend(BE, 'b1');
  const px = await L.startProxy('t5', {
    admin: AD,
    listeners: [{ port: PX, routes: [{ service: 'echo.Echo', cluster: 'echo' }] }, { name: 'any', port: PXA, routes: [{ cluster: 'echo' }] }],
    clusters: [{ name: 'echo', endpoints: [BE] }],
  });
  const c = L.client(PX);
  const alive = async () => {
    const r = await L.unary(c, { payload: Buffer.from('ping') }, { timeoutMs: 3000 }).catch((e) => ({ err: { code: -1, details: e.message } }));
    return !r.err && px.exited === null;
  };
  const results = [];
  // id, name, port, headers, opts, expectation: 'ok' (grpc-status 0), number (that grpc-status), 'sensible'
  const cases = [
    ['5.1a', 'GET instead of POST', PX, { ':method': 'GET' }, {}, 'sensible'],
    ['5.1b', 'PUT instead of POST', PX, { ':method': 'PUT' }, {}, 'sensible'],
    ['5.1c', 'HEAD', PX, { ':method': 'HEAD' }, { endStream: true }, 'sensible'],
    ['5.2a', 'no content-type', PX, { 'content-type': undefined }, {}, 'sensible'],
    ['5.2b', 'content-type application/json', PX, { 'content-type': 'application/json' }, {}, 'sensible'],
    ['5.2c', 'content-type application/grpc+proto (must be accepted)', PX, { 'content-type': 'application/grpc+proto' }, {}, 0],
    ['5.2d', 'content-type application/grpc; charset=utf-8', PX, { 'content-type': 'application/grpc;charset=utf-8' }, {}, 0],
    ['5.2e', 'content-type application/grpc-web', PX, { 'content-type': 'application/grpc-web' }, {}, 'sensible'],
    ['5.3', 'no te: trailers', PX, { te: undefined }, {}, 0],
    ['5.4a', ':path without leading slash ("echo.Echo/Unary")', PX, { ':path': 'echo.Echo/Unary' }, {}, 'sensible'],
    ['5.4b', ':path one segment ("/echo.Echo")', PX, { ':path': '/echo.Echo' }, {}, 12],
    ['5.4c', ':path "/"', PX, { ':path': '/' }, {}, 12],
    ['5.4d', ':path three segments ("/echo.Echo/Unary/x")', PX, { ':path': '/echo.Echo/Unary/x' }, {}, 12],
    ['5.4e', ':path "*"', PX, { ':path': '*' }, {}, 'sensible'],
    ['5.4f', ':path with query ("/echo.Echo/Unary?x=1")', PX, { ':path': '/echo.Echo/Unary?x=1' }, {}, 'sensible'],
    ['5.4g', ':path 8 KiB long', PX, { ':path': '/echo.Echo/' + 'U'.repeat(8192) }, {}, 'sensible'],
    ['5.4h', ':path 70 KiB long', PX, { ':path': '/echo.Echo/' + 'U'.repeat(70000) }, { sessionOptions: { maxSendHeaderBlockLength: 1 << 24 } }, 'sensible'],
    ['5.4i', ':path with space and non-ASCII', PX, { ':path': '/echo.Echo/Un ary' }, {}, 'sensible'],
    ['5.4j', 'catch-all listener, :path without slash', PXA, { ':path': 'Unary' }, {}, 'sensible'],
    ['5.4k', 'catch-all listener, :path one segment', PXA, { ':path': '/echo.Echo' }, {}, 'sensible'],
    ['5.4l', 'catch-all listener, :path 70 KiB', PXA, { ':path': '/echo.Echo/' + 'U'.repeat(70000) }, { sessionOptions: { maxSendHeaderBlockLength: 1 << 24 } }, 'sensible'],
    ['5.5a', 'grpc-timeout "abc"', PX, { 'grpc-timeout': 'abc' }, {}, 'sensible'],
    ['5.5b', 'grpc-timeout 9 digits "123456789m"', PX, { 'grpc-timeout': '123456789m' }, {}, 'sensible'],
    ['5.6a', 'body ends mid-message (prefix says 100 bytes, 10 sent)', PX, {}, { body: Buffer.concat([Buffer.from([0, 0, 0, 0, 100]), Buffer.alloc(10)]) }, 'sensible'],
    ['5.6b', 'body is a truncated length prefix (3 of 5 bytes)', PX, {}, { body: Buffer.from([0, 0, 0]) }, 'sensible'],
    ['5.6c', 'no body at all (END_STREAM on HEADERS)', PX, {}, { endStream: true }, 'sensible'],
    ['5.6d', 'compressed flag set, no grpc-encoding', PX, {}, { body: Buffer.from([1, 0, 0, 0, 2, 0x0a, 0]) }, 'sensible'],
    ['5.6e', 'garbage protobuf', PX, {}, { body: Buffer.from([0, 0, 0, 0, 3, 0xff, 0xff, 0xff]) }, 'sensible'],
    ['5.7', 'RST_STREAM(CANCEL) right after HEADERS', PX, {}, { rstAfterHeaders: true, timeoutMs: 1500 }, 'rst'],
    ['5.8a', '16 KiB of metadata', PX, { 'x-big': 'a'.repeat(16 * 1024) }, {}, 0],
    ['5.8b', '32 KiB of metadata (one header)', PX, { 'x-big': 'a'.repeat(32 * 1024) }, {}, 0],
    ['5.8c', '32 KiB of metadata (32 headers of 1 KiB)', PX, Object.fromEntries(Array.from({ length: 32 }, (_, i) => [`x-h${i}`, 'b'.repeat(1024)])), {}, 0],
    ['5.8d', '60 KiB of metadata', PX, { 'x-big': 'a'.repeat(60 * 1024) }, { sessionOptions: { maxSendHeaderBlockLength: 1 << 24 } }, 'sensible'],
    ['5.8e', '64 KiB of metadata', PX, { 'x-big': 'a'.repeat(64 * 1024) }, { sessionOptions: { maxSendHeaderBlockLength: 1 << 24 } }, 'sensible'],
    ['5.8f', '100 KiB of metadata', PX, { 'x-big': 'a'.repeat(100 * 1024) }, { sessionOptions: { maxSendHeaderBlockLength: 1 << 24 } }, 'sensible'],
    ['5.8g', '200 KiB of metadata (grpc-js backend answers GOAWAY COMPRESSION_ERROR)', PX, { 'x-big': 'a'.repeat(200 * 1024) }, { sessionOptions: { maxSendHeaderBlockLength: 1 << 24 } }, 'sensible'],
    ['5.8i', '1 MiB of metadata', PX, { 'x-big': 'a'.repeat(1024 * 1024) }, { sessionOptions: { maxSendHeaderBlockLength: 1 << 24 } }, 'sensible'],
    ['5.8j', '200 metadata entries (grpc-js backend answers RST_STREAM ENHANCE_YOUR_CALM)', PX, Object.fromEntries(Array.from({ length: 200 }, (_, i) => [`x-h${i}`, 'v'])), {}, 8],
    ['5.9', 'no :authority', PX, { ':authority': undefined }, {}, 0],
  ];
  for (const [id, name, port, headers, opts, expect] of cases) {
    const r = await rawReq(port, headers, opts);
    const st = grpcStatus(r);
    let ok;
    if (expect === 'sensible') ok = sensible(r);
    else if (expect === 'rst') ok = !r.timedOut; // we reset; just must not hang / crash
    else ok = sensible(r) && st === expect;
    const isAlive = await alive();
    const status = (ok && isAlive) ? (expect === 'sensible' || expect === 'rst' ? 'INFO' : 'PASS') : 'FAIL';
    L.record(id, status, name, `${describe(r)}${isAlive ? '' : '; PROXY NOT SERVING AFTERWARDS'}${expect !== 'sensible' && expect !== 'rst' ? ` (expected grpc-status ${expect})` : ''}`);
    results.push({ id, r });
  }

  // Direct comparison for the big-metadata cases: does the grpc-js backend itself accept them?
  for (const [id, size] of [['5.8x-direct', 60 * 1024], ['5.8y-direct', 64 * 1024], ['5.8z-direct', 100 * 1024]]) {
    const r = await rawReq(BE, { 'x-big': 'a'.repeat(size) }, { sessionOptions: { maxSendHeaderBlockLength: 1 << 24 } });
    L.info(id, `${size / 1024} KiB of metadata sent DIRECTLY to the grpc-js backend (no proxy)`, describe(r));
  }

  // 5.8h: a big-metadata call must not break other calls sharing the upstream connection
  {
    const slow = L.unary(c, { payload: Buffer.from('slow'), delayMs: 800 }, { timeoutMs: 5000 });
    await L.sleep(100);
    const r = await rawReq(PX, { 'x-big': 'a'.repeat(100 * 1024) }, { sessionOptions: { maxSendHeaderBlockLength: 1 << 24 } });
    const s = await slow;
    L.check('5.8h', 'an in-flight call on the same upstream connection survives a 100 KiB-metadata call', !s.err,
      `slow call: ${s.err ? L.codeName(s.err.code) + " '" + s.err.details + "'" : 'OK'}; big call: ${describe(r)}`);
  }

  // 5.10 HTTP/1.1 request to the h2c port
  {
    const resp = await L.withTimeout(new Promise((resolve) => {
      const sock = net.connect(PX, '127.0.0.1');
      let buf = '';
      sock.on('connect', () => sock.write('POST /echo.Echo/Unary HTTP/1.1\r\nHost: x\r\nContent-Type: application/grpc\r\nContent-Length: 5\r\n\r\n\0\0\0\0\0'));
      sock.on('data', (d) => { buf += d; });
      sock.on('close', () => resolve(buf));
      sock.on('error', (e) => resolve(buf + ` [error ${e.code}]`));
    }), 5000, 'http/1.1');
    L.check('5.10', 'HTTP/1.1 request to h2c port -> HTTP/1.1 505 and close', /^HTTP\/1\.1 505/.test(resp), JSON.stringify(resp.split('\r\n')[0]));
    const r2 = await L.withTimeout(new Promise((resolve) => {
      const sock = net.connect(PX, '127.0.0.1');
      let buf = '';
      sock.on('connect', () => sock.write('GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n'));
      sock.on('data', (d) => { buf += d; });
      sock.on('close', () => resolve(buf));
      sock.on('error', (e) => resolve(buf + ` [error ${e.code}]`));
    }), 5000, 'h2c upgrade');
    L.info('5.10b', 'HTTP/1.1 Upgrade: h2c request', JSON.stringify(r2.split('\r\n')[0]));
    const r3 = await L.withTimeout(new Promise((resolve) => {
      const sock = net.connect(PX, '127.0.0.1');
      let buf = '';
      sock.on('connect', () => sock.write('\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03' + 'x'.repeat(40)));
      sock.on('data', (d) => { buf += d; });
      sock.on('close', () => resolve(buf));
      sock.on('error', (e) => resolve(buf + ` [error ${e.code}]`));
    }), 15000, 'tls to h2c');
    L.info('5.10c', 'TLS ClientHello to the h2c port', JSON.stringify(r3.slice(0, 60)));
  }

  // 5.11 many edge cases on ONE connection: errors stay stream-level, the connection keeps working
  {
    const s = http2.connect(`http://127.0.0.1:${PX}`);
    let goaway = null;
    s.on('goaway', (cd) => { goaway = cd; });
    s.on('error', () => {});
    const one = (h, body) => L.withTimeout(new Promise((resolve) => {
      const out = {};
      const req = s.request({ ':method': 'POST', ':path': '/echo.Echo/Unary', 'content-type': 'application/grpc', te: 'trailers', ...h });
      req.on('response', (hh) => { out.headers = hh; });
      req.on('trailers', (t) => { out.trailers = t; });
      req.on('data', () => {});
      req.on('error', () => {});
      req.on('close', () => { out.rst = req.rstCode; resolve(out); });
      req.end(body || Buffer.from([0, 0, 0, 0, 0]));
    }), 4000, 'one');
    const seq = [];
    seq.push(await one({ ':path': '/nope.Nope/X' }));
    seq.push(await one({ 'content-type': 'application/json' }));
    seq.push(await one({}, Buffer.from([0, 0, 0, 0, 100, 1])));
    seq.push(await one({ ':method': 'GET' }));
    const last = await one({});
    const st = (o) => (o.trailers && o.trailers['grpc-status']) || (o.headers && o.headers['grpc-status']) || `rst${o.rst}`;
    L.check('5.11', 'several bad requests on one connection, then a good one on the same connection -> OK, no GOAWAY',
      st(last) === '0' && goaway === null, `statuses=${seq.map(st).join(',')} last=${st(last)} goaway=${goaway}`);
    s.close();
  }

  L.check('5.12', 'proxy alive and serving at the end', await alive());
  const log = L.proxyLog(px);
  const panics = log.split('\n').filter((l) => /panic|ERROR/.test(l));
  L.check('5.13', 'no panic / ERROR in the proxy log', panics.length === 0, panics.slice(0, 3).join(' | '));
  c.close();
  await L.stopProxy(px);
  await be.stop();
  L.finish('t5_raw_http2');
}

L.run(main);
