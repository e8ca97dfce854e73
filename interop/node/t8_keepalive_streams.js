// Check 8: grpc-js client keepalive pings through the proxy for ~10 s; backend with
// grpc.max_concurrent_streams = 2 and 10 concurrent calls; listener max_concurrent_streams.
// Ports: backend 22180, backend (max streams 2) 22181, proxy 22183, admin 22182, proxy listener with
// max_concurrent_streams = 3 22184.
// Run as `node t8_keepalive_streams.js`; it re-runs itself with GRPC_TRACE=keepalive to count pings.
'use strict';
const { spawn } = require('child_process');
const L = require('./lib');
const { grpc } = L;

const BE = 22180, BE2 = 22181, AD = 22182, PX = 22183, PXS = 22184;

async function main() {
  await L.requirePortsFree([BE, BE2, AD, PX, PXS]);
  const be = await L.startBackend(BE, 'b1');
  const be2 = await L.startBackend(BE2, 'limited', { serverOptions: { 'grpc.max_concurrent_streams': 2 } });
  const px = await L.startProxy('t8', {
    admin: AD,
    listeners: [{ port: PX, routes: [{ service: 'echo.Echo', method: 'Unary', cluster: 'echo' }, { cluster: 'limited' }] },
      { name: 'small', port: PXS, extra: 'max_concurrent_streams = 3', routes: [{ cluster: 'echo' }] }],
    clusters: [{ name: 'echo', endpoints: [BE] }, { name: 'limited', endpoints: [BE2] }],
  });
  try {
    // 8.1 keepalive: the client part runs in a child process with keepalive tracing on
    // async spawn: the backends live in this process and must keep running meanwhile
    const child = await new Promise((resolve) => {
      const ch = spawn(process.execPath, [__filename, '--keepalive-client', String(PX), String(AD)], {
        env: { ...process.env, GRPC_TRACE: 'keepalive,transport', GRPC_VERBOSITY: 'DEBUG' },
      });
      let stdout = '', stderr = '';
      ch.stdout.on('data', (d) => { stdout += d; });
      ch.stderr.on('data', (d) => { stderr += d; });
      const t = setTimeout(() => ch.kill('SIGKILL'), 40000);
      ch.on('exit', (status) => { clearTimeout(t); resolve({ stdout, stderr, status }); });
    });
    const out = child.stdout || '';
    const err = child.stderr || '';
    const res = JSON.parse((out.match(/^RESULT (.*)$/m) || [null, '{}'])[1]);
    const pingsSent = (err.match(/Sending ping/gi) || []).length;
    const pingsAcked = (err.match(/Received ping response/gi) || []).length;
    const goaway = /GOAWAY|goaway/i.test(err) ? (err.match(/.*goaway.*/i) || [''])[0].slice(0, 160) : '';
    const closed = (err.match(/connection closed|session closed|ended with/gi) || []).length;
    L.check('8.1', 'keepalive 1s (permit without calls) for ~10 s: pings acked, calls OK, channel stayed READY, one connection',
      res.ok && pingsSent >= 6 && pingsAcked >= 6 && res.states.every((s) => s === 'READY') && !goaway && res.connsMax === 1 && res.connsAfter === 1,
      `pings sent=${pingsSent} acked=${pingsAcked} calls ok=${res.okCalls}/${res.calls} stream msgs=${res.streamMsgs} status=${res.streamStatus} states=${[...new Set(res.states || [])]} conns(max/after)=${res.connsMax}/${res.connsAfter} goaway='${goaway}' rc=${child.status} errors=${JSON.stringify(res.errors)}`);
    if (!res.ok) console.log(err.split('\n').slice(-20).join('\n'));

    // 8.2 backend with max_concurrent_streams 2, 10 concurrent calls through the proxy
    const c = L.client(PX);
    const t0 = Date.now();
    const rs = await Promise.all(Array.from({ length: 10 }, (_, i) => {
      const gc = new grpc.Client(`127.0.0.1:${PX}`, grpc.credentials.createInsecure());
      return L.withTimeout(new Promise((resolve) => {
        // ServerStream on the "limited" cluster (catch-all), each ~400 ms
        const call = c.ServerStream({ payload: Buffer.from(`c${i}`), count: 4, delayMs: 100 });
        let n = 0;
        call.on('data', (m) => { if (m.backend === 'limited') n++; });
        call.on('error', () => {});
        call.on('status', (s) => { gc.close(); resolve({ code: s.code, details: s.details, n }); });
      }), 15000, 'limited call');
    }));
    const el = Date.now() - t0;
    const bad = rs.filter((r) => r.code !== 0 || r.n !== 4);
    L.check('8.2', 'backend grpc.max_concurrent_streams=2: 10 concurrent 400 ms streams through the proxy all succeed', bad.length === 0,
      `${10 - bad.length}/10 OK in ${el}ms${bad.length ? '; failures: ' + bad.map((b) => `${L.codeName(b.code)} '${b.details}'`).slice(0, 3).join('; ') : ''}`);
    // unary variant, 20 calls
    const c2 = L.client(PX);
    const u = await Promise.all(Array.from({ length: 20 }, async () => (await L.bytesUnary(c2, '/echo.Echo/ClientStream', { timeoutMs: 15000 })).err));
    // (ClientStream via makeUnaryRequest = one request message; goes to "limited" via catch-all)
    const ubad = u.filter((e) => e);
    L.check('8.2b', 'backend max_concurrent_streams=2: 20 concurrent client-stream calls all succeed', ubad.length === 0,
      ubad.map((e) => `${L.codeName(e.code)} '${e.details}'`).slice(0, 3).join('; '));

    // 8.3 proxy listener max_concurrent_streams = 3, 15 concurrent 300 ms calls from one grpc-js channel
    const cs = L.client(PXS);
    const t1 = Date.now();
    const r3 = await Promise.all(Array.from({ length: 15 }, () => L.unary(cs, { payload: Buffer.from('x'), delayMs: 300 }, { timeoutMs: 15000 })));
    const el3 = Date.now() - t1;
    const bad3 = r3.filter((r) => r.err);
    L.check('8.3', 'listener max_concurrent_streams=3: 15 concurrent 300 ms calls on one channel all succeed (queued by the client)', bad3.length === 0,
      `${15 - bad3.length}/15 OK in ${el3}ms (>= 1500 ms expected if the limit is honoured)${bad3.length ? '; ' + bad3.map((r) => `${L.codeName(r.err.code)} '${r.err.details}'`).slice(0, 3).join('; ') : ''}`);
    L.check('8.3b', 'listener max_concurrent_streams=3 is honoured (15 x 300 ms take >= 1.4 s)', el3 >= 1400, `${el3}ms`);
    c.close(); c2.close(); cs.close();
    L.check('8.4', 'proxy alive', px.exited === null);
  } finally {
    await L.stopProxy(px);
    await be.stop(); await be2.stop();
  }
  L.finish('t8_keepalive_streams');
}

// Child: a keepalive client that runs ~10 s of mixed activity and reports.
async function keepaliveClient(port, adminPort) {
  const c = new L.EchoClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure(), {
    'grpc.keepalive_time_ms': 1000,
    'grpc.keepalive_timeout_ms': 2000,
    'grpc.keepalive_permit_without_calls': 1,
    'grpc.use_local_subchannel_pool': 1,
  });
  const ch = c.getChannel();
  const states = [];
  let calls = 0, okCalls = 0, connsMax = 0;
  const errors = [];
  const first = await L.unary(c, { payload: Buffer.from('first') });
  calls++; if (!first.err) okCalls++; else errors.push(`${first.err.code} ${first.err.details}`);
  const t0 = Date.now();
  // a long server stream for 5 s (messages every 500 ms), then 5 s idle with an occasional call
  const stream = new Promise((resolve) => {
    const call = c.ServerStream({ payload: Buffer.from('s'), count: 10, delayMs: 500 });
    let n = 0;
    call.on('data', () => { n++; });
    call.on('error', () => {});
    call.on('status', (s) => resolve({ n, code: s.code, details: s.details }));
  });
  while (Date.now() - t0 < 10500) {
    states.push(grpc.connectivityState[ch.getConnectivityState(false)]);
    const m = await L.scrape(adminPort);
    connsMax = Math.max(connsMax, L.metricValue(m, 'grpcgate_downstream_connections_active', { listener: 'edge' }) || 0);
    if (Date.now() - t0 > 6000 && Date.now() - t0 < 6600) {
      const r = await L.unary(c, { payload: Buffer.from('mid') });
      calls++; if (!r.err) okCalls++; else errors.push(`${r.err.code} ${r.err.details}`);
    }
    await L.sleep(500);
  }
  const s = await stream;
  const last = await L.unary(c, { payload: Buffer.from('last') });
  calls++; if (!last.err) okCalls++; else errors.push(`${last.err.code} ${last.err.details}`);
  if (s.code) errors.push(`stream ${s.code} ${s.details}`);
  states.push(grpc.connectivityState[ch.getConnectivityState(false)]);
  const connsAfter = L.metricValue(await L.scrape(adminPort), 'grpcgate_downstream_connections_active', { listener: 'edge' });
  const ok = okCalls === calls && s.code === 0 && s.n === 10;
  console.log('RESULT ' + JSON.stringify({ ok, errors, calls, okCalls, streamMsgs: s.n, streamStatus: s.code, states, connsMax, connsAfter }));
  c.close();
  process.exit(0);
}

if (process.argv[2] === '--keepalive-client') {
  keepaliveClient(Number(process.argv[3]), Number(process.argv[4])).catch((e) => { console.log('RESULT ' + JSON.stringify({ ok: false, error: e.message, states: [] })); process.exit(1); });
} else {
  L.run(main);
}
