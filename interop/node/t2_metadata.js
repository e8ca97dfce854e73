// Check 2: metadata (ascii and -bin) both ways, every grpc-status / grpc-message, trailers-only.
// Ports: grpc-js backend 22110, proxy 22111, admin 22112, raw http2 backend 22113.
'use strict';
const http2 = require('http2');
const L = require('./lib');
const { grpc } = L;

const BE = 22110, PX = 22111, AD = 22112, RAW = 22113;

// A raw http2 "backend" whose response is fully scripted by the request header x-script (JSON).
function startRawBackend(port) {
  const seen = [];
  const server = http2.createServer();
  server.on('stream', (stream, headers, flags, rawHeaders) => {
    seen.push({ headers, rawHeaders });
    stream.on('error', () => {});
    const script = JSON.parse(headers['x-script'] || '{}');
    stream.resume();
    const go = () => {
      if (script.trailersOnly) {
        stream.respond({ ':status': 200, 'content-type': 'application/grpc', ...script.trailersOnly }, { endStream: true });
        return;
      }
      stream.respond({ ':status': script.status || 200, 'content-type': 'application/grpc', ...(script.headers || {}) }, { waitForTrailers: !!script.trailers });
      if (script.trailers) stream.on('wantTrailers', () => stream.sendTrailers(script.trailers));
      const msg = Buffer.from([0, 0, 0, 0, 0]); // one empty gRPC message
      stream.end(msg);
    };
    if (headers['x-wait-end']) stream.on('end', go); else go();
  });
  return new Promise((res) => server.listen(port, '127.0.0.1', () => res({ server, seen })));
}

async function main() {
  await L.requirePortsFree([BE, PX, AD, RAW]);
  const be = await L.startBackend(BE, 'b1');
  const raw = await startRawBackend(RAW);
  const px = await L.startProxy('t2', {
    admin: AD,
    listeners: [{ port: PX, routes: [{ service: 'raw.Raw', cluster: 'raw' }, { service: 'echo.Echo', cluster: 'echo' }] }],
    clusters: [{ name: 'echo', endpoints: [BE] }, { name: 'raw', endpoints: [RAW] }],
  });
  const c = L.client(PX);
  const direct = L.client(BE);
  try {
    // 2.1 request metadata
    const binv = Buffer.from([0, 1, 2, 3, 0x7f, 0x80, 0xfe, 0xff]);
    const mkMd = () => {
      const md = new grpc.Metadata();
      md.set('x-ascii', 'Hello, World! ~`!@#$%^&*()_+-={}[]|:;"\'<>,.?/ end');
      md.add('x-multi', 'one');
      md.add('x-multi', 'two');
      md.set('x-spaces', '  inner  spaces ');
      md.set('x-data-bin', binv);
      md.set('x-empty-bin', Buffer.alloc(0));
      md.set('x-big-bin', Buffer.alloc(3000, 0xa5));
      md.set('authorization', 'Bearer abc.def');
      return md;
    };
    be.calls.length = 0;
    let r = await L.unary(c, { payload: Buffer.from('m') }, { metadata: mkMd() });
    const viaProxy = be.calls.pop();
    r = await L.unary(direct, { payload: Buffer.from('m') }, { metadata: mkMd() });
    const viaDirect = be.calls.pop();
    const m = viaProxy.meta;
    const okAscii = m['x-ascii'] === 'Hello, World! ~`!@#$%^&*()_+-={}[]|:;"\'<>,.?/ end';
    const mv = be.calls.length; // unused
    const okBin = Buffer.isBuffer(m['x-data-bin']) && m['x-data-bin'].equals(binv);
    const okBig = Buffer.isBuffer(m['x-big-bin']) && m['x-big-bin'].length === 3000;
    const okAuth = m.authorization === 'Bearer abc.def';
    L.check('2.1', 'request metadata (ascii, -bin, 3000-byte -bin, authorization) reaches backend unchanged',
      okAscii && okBin && okBig && okAuth, `ascii=${okAscii} bin=${okBin} big=${okBig} auth=${okAuth}`);
    // Multi-valued keys: grpc-js getMap() keeps the first only; compare raw via full metadata below.
    viaProxy.meta = viaProxy.full; viaDirect.meta = viaDirect.full;
    const keysP = Object.keys(viaProxy.meta).sort();
    const keysD = Object.keys(viaDirect.meta).sort();
    const extra = keysP.filter((k) => !keysD.includes(k));
    const missing = keysD.filter((k) => !keysP.includes(k));
    const diffVals = keysD.filter((k) => keysP.includes(k) && JSON.stringify(viaProxy.meta[k]) !== JSON.stringify(viaDirect.meta[k]));
    L.check('2.1b', 'backend sees the same metadata keys/values via proxy as direct (besides grpc-timeout)',
      extra.length === 0 && missing.length === 0 && diffVals.length === 0,
      `extra=[${extra}] missing=[${missing}] differing=[${diffVals.map((k) => `${k}: ${viaDirect.meta[k]} -> ${viaProxy.meta[k]}`)}]`);
    L.check('2.1c', 'empty -bin value passes', Buffer.isBuffer(m['x-empty-bin']) && m['x-empty-bin'].length === 0, `got ${JSON.stringify(m['x-empty-bin'])}`);

    // multi-valued header via raw backend (exact header fields)
    {
      raw.seen.length = 0;
      const rr = await L.rawCall(PX, { ':path': '/raw.Raw/M', 'x-multi': ['one', 'two'], 'x-script': JSON.stringify({ trailers: { 'grpc-status': '0' } }) });
      const h = raw.seen[0] && raw.seen[0].headers;
      const rh = raw.seen[0] ? raw.seen[0].rawHeaders : [];
      const got = [];
      for (let i = 0; i < rh.length; i += 2) if (rh[i] === 'x-multi') got.push(rh[i + 1]);
      L.check('2.1d', 'multi-valued request header (x-multi: one, two) arrives as two header fields in order', got.join('|') === 'one|two',
        `backend saw ${JSON.stringify(got)}; headers=${h ? Object.keys(h).join(',') : 'none'}`);
      if (h) L.info('2.1e', 'request headers the raw backend saw via proxy', JSON.stringify(h));
    }

    // 2.2 response metadata
    {
      const md = new grpc.Metadata(); md.set('x-want-md', '1');
      r = await L.unary(c, { payload: Buffer.from('m') }, { metadata: md });
      const ini = r.initial ? r.initial.getMap() : {};
      const tr = r.trailers ? r.trailers.getMap() : {};
      const okU = ini['x-init'] === 'init-value' && Buffer.from([0, 1, 2, 0xfe, 0xff]).equals(ini['x-init-bin'] || Buffer.alloc(0)) &&
        tr['x-trail'] === 'trail-value' && Buffer.from([0xff, 0, 0x80, 0x7f]).equals(tr['x-trail-bin'] || Buffer.alloc(0));
      const s = await L.collect(c.ServerStream({ payload: Buffer.from('x'), count: 3 }, md));
      const si = s.initial ? s.initial.getMap() : {};
      const st = s.status.metadata.getMap();
      const okS = si['x-init'] === 'init-value' && Buffer.isBuffer(si['x-init-bin']) && st['x-trail'] === 'trail-value' && Buffer.isBuffer(st['x-trail-bin']);
      const call = c.Bidi(md);
      const bp = L.collect(call);
      call.write({ payload: Buffer.from('a') }); call.end();
      const b = await bp;
      const bi = b.initial ? b.initial.getMap() : {};
      const bt = b.status.metadata.getMap();
      const okB = bi['x-init'] === 'init-value' && bt['x-trail-bin'] && bt['x-trail-bin'].equals(Buffer.from([0xff, 0, 0x80, 0x7f]));
      L.check('2.2', 'response initial metadata + trailers (ascii and -bin) reach client: unary / server stream / bidi', okU && okS && okB,
        `unary=${okU} ss=${okS} bidi=${okB} ini=${JSON.stringify(ini)} tr=${JSON.stringify(tr)}`);
    }

    // 2.3 every status code 1..16, trailers-only (unary error before any message)
    {
      const bad = [];
      for (let code = 1; code <= 16; code++) {
        const md = new grpc.Metadata(); md.set('x-want-md', '1');
        const msg = `status ${code} message`;
        r = await L.unary(c, { payload: Buffer.from('m'), failCode: code, failMessage: msg }, { metadata: md });
        const tr = r.trailers ? r.trailers.getMap() : {};
        if (!(r.err && r.err.code === code && r.err.details === msg && tr['x-trail'] === 'trail-value' && Buffer.isBuffer(tr['x-trail-bin'])))
          bad.push(`${code}: got ${r.err && r.err.code} '${r.err && r.err.details}' trailers=${JSON.stringify(tr)}`);
      }
      L.check('2.3', 'grpc-status 1..16 + message + trailer metadata pass through (unary, trailers-only)', bad.length === 0, bad.join('; '));
    }
    // 2.3b every status after messages (trailers after DATA)
    {
      const bad = [];
      for (let code = 1; code <= 16; code++) {
        const md = new grpc.Metadata(); md.set('x-fail-after', '2');
        const s = await L.collect(c.ServerStream({ payload: Buffer.from('x'), count: 5, failCode: code, failMessage: `late ${code}` }, md));
        if (!(s.status.code === code && s.status.details === `late ${code}` && s.msgs.length === 2)) bad.push(`${code}: got ${s.status.code} '${s.status.details}' n=${s.msgs.length}`);
      }
      L.check('2.3b', 'grpc-status 1..16 in trailers after 2 messages (server streaming)', bad.length === 0, bad.join('; '));
    }

    // 2.4 non-ASCII / percent-encoded messages
    {
      const msgs = ['héllo wörld 世界 😀', '100% done', 'tab\there', 'line1\nline2', '%41 literal percent-escape %zz', '  leading and trailing  ', 'a'.repeat(4000)];
      const bad = [];
      for (const msg of msgs) {
        r = await L.unary(c, { failCode: 3, failMessage: msg });
        const d = await L.unary(direct, { failCode: 3, failMessage: msg });
        if (!r.err || r.err.details !== d.err.details) bad.push(`${JSON.stringify(msg.slice(0, 40))}: proxy='${r.err && r.err.details.slice(0, 60)}' direct='${d.err.details.slice(0, 60)}'`);
      }
      L.check('2.4', 'grpc-message (non-ASCII, %, tab, newline, 4000 chars) identical via proxy and direct', bad.length === 0, bad.join('; '));
    }
    // 2.4b exact bytes of grpc-message / grpc-status / custom trailers through raw http2 on both ends
    {
      const trailers = { 'grpc-status': '7', 'grpc-message': 'caf%C3%A9 %25 raw%20msg', 'x-t': 'v', 'grpc-status-details-bin': Buffer.from('details').toString('base64') };
      const rr = await L.rawCall(PX, { ':path': '/raw.Raw/M', 'x-script': JSON.stringify({ headers: { 'x-h': 'hv' }, trailers }) });
      const t = rr.trailers || {};
      const ok = rr.headers && rr.headers[':status'] === 200 && rr.headers['x-h'] === 'hv' && t['grpc-status'] === '7' && t['grpc-message'] === trailers['grpc-message'] &&
        t['x-t'] === 'v' && t['grpc-status-details-bin'] === trailers['grpc-status-details-bin'];
      L.check('2.4b', 'raw: response headers + trailers (grpc-message bytes, grpc-status-details-bin) byte-identical', ok, `headers=${JSON.stringify(rr.headers)} trailers=${JSON.stringify(t)}`);
    }

    // 2.5 trailers-only from backend -> trailers-only to the client (raw view)
    {
      const rr = await L.rawCall(PX, { ':path': '/raw.Raw/M', 'x-script': JSON.stringify({ trailersOnly: { 'grpc-status': '5', 'grpc-message': 'not%20here', 'x-t': 'v' } }) });
      const h = rr.headers || {};
      L.check('2.5', 'raw: backend trailers-only (status 5) arrives as one HEADERS with END_STREAM, status/message/metadata intact',
        rr.headersEndStream && h['grpc-status'] === '5' && h['grpc-message'] === 'not%20here' && h['x-t'] === 'v' && !rr.trailers && rr.data.length === 0,
        `endStream=${rr.headersEndStream} headers=${JSON.stringify(h)} trailers=${JSON.stringify(rr.trailers)}`);
      // grpc-js backend trailers-only (unary error), raw view
      const rr2 = await L.rawCall(PX, { ':path': '/echo.Echo/Unary' }, Buffer.from([0, 0, 0, 0, 2, 0x20, 5]));
      const h2 = rr2.headers || {};
      L.check('2.5b', 'raw: grpc-js backend unary error (fail_code 5) -> trailers-only via proxy', rr2.headersEndStream && h2['grpc-status'] === '5',
        `endStream=${rr2.headersEndStream} headers=${JSON.stringify(h2)} trailers=${JSON.stringify(rr2.trailers)}`);
      // grpc-js client view of a trailers-only response incl. metadata
      const md = new grpc.Metadata(); md.set('x-want-md', '1');
      r = await L.unary(c, { failCode: 5, failMessage: 'nf' }, { metadata: md });
      L.check('2.5c', 'grpc-js client: trailers-only NOT_FOUND with trailer metadata', r.err && r.err.code === 5 && r.err.details === 'nf' && r.err.metadata.get('x-trail')[0] === 'trail-value',
        r.err ? `${r.err.code} ${r.err.details} ${JSON.stringify(r.err.metadata.getMap())}` : 'no error');
    }

    // 2.6 out-of-range grpc-status from the backend (raw), and missing grpc-status
    {
      let rr = await L.rawCall(PX, { ':path': '/raw.Raw/M', 'x-script': JSON.stringify({ trailers: { 'grpc-status': '42', 'grpc-message': 'odd' } }) });
      L.info('2.6a', 'backend grpc-status 42 (out of range)', `client trailers=${JSON.stringify(rr.trailers)}`);
      rr = await L.rawCall(PX, { ':path': '/raw.Raw/M', 'x-script': JSON.stringify({}) });
      L.check('2.6b', 'backend ends body without trailers -> INTERNAL added as trailers', rr.trailers && rr.trailers['grpc-status'] === '13',
        `trailers=${JSON.stringify(rr.trailers)}`);
      rr = await L.rawCall(PX, { ':path': '/raw.Raw/M', 'x-script': JSON.stringify({ status: 503 }) });
      L.check('2.6c', 'backend HTTP 503 -> UNAVAILABLE', (rr.headers && rr.headers['grpc-status'] === '14') || (rr.trailers && rr.trailers['grpc-status'] === '14'),
        `headers=${JSON.stringify(rr.headers)} trailers=${JSON.stringify(rr.trailers)}`);
    }
    r = await L.unary(c, { payload: Buffer.from('again') });
    L.check('2.7', 'proxy still serves', !r.err && px.exited === null);
  } finally {
    c.close(); direct.close();
    await L.stopProxy(px);
    await be.stop();
    raw.server.close();
  }
  L.finish('t2_metadata');
}

L.run(main);
