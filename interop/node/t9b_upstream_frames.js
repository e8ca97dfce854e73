// Check 9b (extra): frame-exact upstream misbehaviour via rawframes.js:
//  - RST_STREAM(code) after response HEADERS + one DATA frame (mid-response) -> README mapping in trailers
//  - GOAWAY(INTERNAL_ERROR, last_stream_id = the in-flight stream) with the socket left open
//  - GOAWAY(INTERNAL_ERROR, last_stream_id = the in-flight stream) then the socket closed
// Ports: frame server 22195, proxy 22196, admin 22197.
'use strict';
const L = require('./lib');
const { grpc } = L;
const { startRawFrames } = require('./rawframes');
const FS = 22195, PX = 22196, AD = 22197;
const MSG = Buffer.from([0, 0, 0, 0, 0]);

const call = (c, deadlineMs = 3000) => L.bytesUnary(c, '/raw.Raw/M', { deadlineMs });

async function main() {
  await L.requirePortsFree([FS, PX, AD]);
  const rst = [[7, 14], [8, 1], [11, 8], [12, 7], [2, 13], [1, 13]];
  const scripts = [
    (a, sid) => { a.headers(sid); a.data(sid, MSG); a.trailers(sid, 0); },               // sanity
    ...rst.map(([code]) => (a, sid) => { a.headers(sid); a.data(sid, MSG); setTimeout(() => a.rst(sid, code), 30); }),
    (a, sid) => { a.headers(sid); a.data(sid, MSG); a.trailers(sid, 0); },               // sanity after
    (a, sid) => { a.goaway(sid, 2); },                                                   // GOAWAY error, socket open, no response
    (a, sid) => { a.headers(sid); a.data(sid, MSG); a.trailers(sid, 0); },               // new connection: OK
    (a, sid) => { a.headers(sid); a.data(sid, MSG); a.goaway(sid, 2); },                 // GOAWAY error mid-response, socket open
    (a, sid) => { a.headers(sid); a.data(sid, MSG); a.trailers(sid, 0); },
    (a, sid) => { a.goaway(sid, 2); setTimeout(() => a.close(), 50); },                  // GOAWAY error then close
    (a, sid) => { a.headers(sid); a.data(sid, MSG); a.trailers(sid, 0); },
  ];
  const fs = await startRawFrames(FS, scripts);
  const px = await L.startProxy('t9b', {
    admin: AD, listeners: [{ port: PX, routes: [{ cluster: 'raw' }] }], clusters: [{ name: 'raw', endpoints: [FS] }],
  });
  const gc = new grpc.Client(`127.0.0.1:${PX}`, grpc.credentials.createInsecure());
  try {
    let r = await call(gc);
    L.check('9b.0', 'frame server sanity call OK', !r.err, r.err ? `${L.codeName(r.err.code)} '${r.err.details}'` : '');
    const bad = [];
    for (const [code, want] of rst) {
      r = await call(gc);
      if (!r.err || r.err.code !== want) bad.push(`RST ${code}: got ${r.err ? L.codeName(r.err.code) + " '" + r.err.details + "'" : 'OK'} want ${L.codeName(want)}`);
    }
    L.check('9b.1', 'upstream RST_STREAM after HEADERS+DATA: REFUSED->14, CANCEL->1, ENHANCE_YOUR_CALM->8, INADEQUATE_SECURITY->7, INTERNAL/PROTOCOL->13', bad.length === 0, bad.join('; '));
    r = await call(gc);
    L.check('9b.2', 'sanity after resets', !r.err, r.err ? r.err.details : '');
    r = await call(gc, 3000);
    L.check('9b.3', 'upstream GOAWAY(INTERNAL_ERROR, last_stream_id=this stream) before any response, socket left open -> prompt error (UNAVAILABLE per README), not a hang until the deadline',
      r.err && r.err.code === 14 && r.ms < 2000, r.err ? `${L.codeName(r.err.code)} '${r.err.details}' after ${r.ms}ms` : 'OK');
    r = await call(gc);
    L.check('9b.4', 'next call (new connection) OK', !r.err, r.err ? `${L.codeName(r.err.code)} '${r.err.details}'` : '');
    r = await call(gc, 3000);
    L.check('9b.5', 'upstream GOAWAY(INTERNAL_ERROR) mid-response, socket left open -> prompt UNAVAILABLE',
      r.err && r.err.code === 14 && r.ms < 2000, r.err ? `${L.codeName(r.err.code)} '${r.err.details}' after ${r.ms}ms` : 'OK');
    r = await call(gc);
    r = await call(gc, 3000);
    L.check('9b.6', 'upstream GOAWAY(INTERNAL_ERROR) then socket closed -> prompt UNAVAILABLE', r.err && r.err.code === 14 && r.ms < 2000,
      r.err ? `${L.codeName(r.err.code)} '${r.err.details}' after ${r.ms}ms` : 'OK');
    L.check('9b.7', 'proxy alive', px.exited === null);
  } finally {
    gc.close();
    await L.stopProxy(px);
    fs.stop();
  }
  L.finish('t9b_upstream_frames');
}
L.run(main);
