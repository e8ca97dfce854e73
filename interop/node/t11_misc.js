// Check 11 (extra): end-to-end flow control with a paused grpc-js reader, gzip compression pass-through,
// Health/Watch mode against a grpc-js Watch implementation, outlier ejection, SIGHUP reload, --check,
// SIGTERM drain with a call in flight.
// Ports: backends 22210 22211, raw 503 backend 22212, proxy 22213, admin 22214.
'use strict';
const fs = require('fs');
const http2 = require('http2');
const { spawnSync } = require('child_process');
const L = require('./lib');
const { grpc } = L;
const B1 = 22210, B2 = 22211, BAD = 22212, PX = 22213, AD = 22214;

const config = (echoPort) => L.gateConfig({
  admin: AD,
  drain: '5s',
  listeners: [{
    port: PX,
    routes: [{ service: 'echo.Echo', cluster: 'echo' }, { service: 'watch.W', cluster: 'watched' }, { service: 'outlier.O', cluster: 'outl' }],
  }],
  clusters: [
    { name: 'echo', endpoints: [echoPort] },
    { name: 'watched', endpoints: [B1], extra: '[clusters.health_check]\nmode = "watch"\ninterval = "5s"\ntimeout = "1s"' },
    { name: 'outl', endpoints: [BAD, B2], extra: '[clusters.outlier_detection]\nconsecutive_failures = 3\nbase_ejection_time = "30s"\nmax_ejection_percent = 50' },
  ],
});

async function main() {
  await L.requirePortsFree([B1, B2, BAD, PX, AD]);
  const b1 = await L.startBackend(B1, 'b1', { watch: true, serverOptions: { 'grpc.default_compression_algorithm': 2 } });
  const b2 = await L.startBackend(B2, 'b2');
  // raw backend answering every call with HTTP 503 (-> UNAVAILABLE at the proxy)
  const bad = http2.createServer();
  bad.on('stream', (s) => { s.on('error', () => {}); s.respond({ ':status': 503 }, { endStream: true }); });
  await new Promise((r) => bad.listen(BAD, '127.0.0.1', r));

  // --check
  const cfgFile = `${L.RUN_DIR}/t11.toml`;
  fs.writeFileSync(`${L.RUN_DIR}/t11-check-good.toml`, config(B1));
  fs.writeFileSync(`${L.RUN_DIR}/t11-check-bad.toml`, config(B1).replace('mode = "watch"', 'mode = "stream"'));
  const good = spawnSync(L.BIN, ['--config', `${L.RUN_DIR}/t11-check-good.toml`, '--check'], { encoding: 'utf8', timeout: 10000 });
  const badc = spawnSync(L.BIN, ['--config', `${L.RUN_DIR}/t11-check-bad.toml`, '--check'], { encoding: 'utf8', timeout: 10000 });
  L.check('11.0', '--check: good file exits 0, bad file exits non-zero naming file:line:col and key', good.status === 0 && badc.status !== 0 && /t11-check-bad\.toml:\d+:\d+/.test(badc.stderr + badc.stdout),
    `good=${good.status} '${(good.stdout + good.stderr).trim()}' bad=${badc.status} '${(badc.stdout + badc.stderr).trim().slice(0, 160)}'`);

  const px = await L.startProxy('t11', config(B1), { adminPort: AD, listenPorts: [PX] });
  const c = L.client(PX, { 'grpc.max_receive_message_length': 64 << 20, 'grpc.use_local_subchannel_pool': 1 });
  try {
    // 11.1 flow control: server stream of 400 x 64 KiB (25 MiB) to a paused grpc-js reader; how far does
    // the backend get? (bounded by the client's window + the proxy's 1 MiB stream window + Node buffers)
    const paused = async (client, label) => {
      const N = 400, SZ = 64 * 1024;
      b1.calls.length = 0;
      const call = client.ServerStream({ payload: Buffer.alloc(SZ, 7), count: N });
      let got = 0;
      call.on('error', () => {});
      await L.withTimeout(new Promise((r) => call.once('data', () => { got++; call.pause(); r(); })), 5000, 'first message');
      await L.sleep(1500);
      const rec = b1.calls.find((x) => x.method === 'ServerStream');
      const sentWhilePaused = rec ? rec.sent : -1;
      const st = new Promise((r) => call.on('status', r));
      call.on('data', () => { got++; });
      call.resume();
      const status = await L.withTimeout(st, 30000, 'stream after resume');
      return { sentWhilePaused, status: status.code, got, N, label };
    };
    {
      const via = await paused(c, 'proxy');
      const direct = L.client(B1, { 'grpc.max_receive_message_length': 64 << 20, 'grpc.use_local_subchannel_pool': 1 });
      const dir = await paused(direct, 'direct');
      direct.close();
      L.check('11.1', 'flow control: backend writes stay bounded while the grpc-js client is paused (<= 64 of 400 x 64 KiB), all 400 arrive after resume',
        via.sentWhilePaused >= 0 && via.sentWhilePaused <= 64 && via.status === 0 && via.got === 400,
        `via proxy: backend wrote ${via.sentWhilePaused} msgs while paused, then ${via.got}/400 status ${via.status}; direct: ${dir.sentWhilePaused} while paused`);
    }

    // 11.2 gzip compression both ways (grpc-js client and server with default_compression_algorithm gzip)
    {
      const cz = L.client(PX, { 'grpc.default_compression_algorithm': 2, 'grpc.use_local_subchannel_pool': 1 });
      const payload = Buffer.alloc(1 << 20, 'a');
      const r = await L.unary(cz, { payload });
      const cs = await L.withTimeout(new Promise((resolve) => {
        const call = cz.Bidi();
        const msgs = [];
        call.on('data', (m) => msgs.push(m));
        call.on('error', () => {});
        call.on('status', (s) => resolve({ s, msgs }));
        for (let i = 0; i < 20; i++) call.write({ payload: Buffer.alloc(10000, 'z') });
        call.end();
      }), 10000, 'gzip bidi');
      const rec = b1.calls.filter((x) => x.method === 'Unary').pop();
      L.check('11.2', 'gzip-compressed messages (grpc-encoding: gzip) pass through: 1 MiB unary + 20-message bidi', !r.err && r.resp.payload.equals(payload) && cs.s.code === 0 && cs.msgs.length === 20,
        r.err ? `${L.codeName(r.err.code)} '${r.err.details}'` : `bidi=${cs.s.code}/${cs.msgs.length}`);
      cz.close();
    }

    // 11.3 Health/Watch mode
    {
      const healthy = (value) => L.healthyIs(AD, 'watched', [B1], value);
      await L.waitFor(() => healthy(1), 5000);
      const watchCalls = b1.watchCalls || 0;
      b1.setHealth('', 'NOT_SERVING');
      const t0 = Date.now();
      const down = await L.waitFor(() => healthy(0), 4000, 20);
      const ms = Date.now() - t0;
      b1.setHealth('', 'SERVING');
      const t1 = Date.now();
      const up = await L.waitFor(() => healthy(1), 4000, 20);
      L.check('11.3', 'health mode=watch (interval 5s) with grpc-js Health/Watch: NOT_SERVING and back applied within 1 s', watchCalls >= 1 && down && ms < 1000 && up && Date.now() - t1 < 1000,
        `watch streams opened=${watchCalls} down=${down} in ${ms}ms up=${up}`);
    }

    // 11.4 outlier detection: endpoint answering HTTP 503 gets ejected after 3 consecutive UNAVAILABLE
    {
      const gc = new grpc.Client(`127.0.0.1:${PX}`, grpc.credentials.createInsecure());
      const one = async () => (await L.bytesUnary(gc, '/outlier.O/M')).err;
      const seq = [];
      for (let i = 0; i < 20; i++) seq.push(await one());
      const codes = seq.map((e) => (e ? e.code : 0));
      // b2 (grpc-js) does not implement /outlier.O/M -> UNIMPLEMENTED (12) counts as "reached"; BAD -> 14
      const firstFive = codes.slice(0, 8).filter((x) => x === 14).length;
      const tail = codes.slice(8);
      const m = await L.scrape(AD);
      const ej = L.metricValue(m, 'grpcgate_outlier_ejections_total', { cluster: 'outl', endpoint: `127.0.0.1:${BAD}` });
      L.check('11.4', 'outlier detection: endpoint answering HTTP 503 ejected after 3 consecutive UNAVAILABLE; later calls avoid it',
        firstFive === 3 && tail.every((x) => x === 12) && ej === 1, `codes=${codes.join(',')} ejections=${ej}`);
      gc.close();
    }

    // 11.5 SIGHUP reload: echo cluster b1 -> b2 without dropping the client's connection
    {
      const before = await L.unary(c, { payload: Buffer.from('x') });
      const conns = L.metricValue(await L.scrape(AD), 'grpcgate_downstream_connections_active', { listener: 'edge' });
      fs.writeFileSync(cfgFile, config(B2));
      px.child.kill('SIGHUP');
      const switched = await L.waitFor(async () => {
        const r = await L.unary(c, { payload: Buffer.from('x') });
        return !r.err && r.resp.backend === 'b2';
      }, 5000, 100);
      const m = await L.scrape(AD);
      const conns2 = L.metricValue(m, 'grpcgate_downstream_connections_active', { listener: 'edge' });
      const ok = L.metricValue(m, 'grpcgate_config_reloads_total', { result: 'success' });
      L.check('11.5', 'SIGHUP reload switches the cluster endpoint, same client connection, reloads_total{success}=1',
        before.resp && before.resp.backend === 'b1' && switched && conns2 === conns && ok === 1, `before=${before.resp && before.resp.backend} switched=${switched} conns ${conns}->${conns2} reloads ok=${ok}`);
      fs.writeFileSync(cfgFile, 'this is = not [valid toml');
      px.child.kill('SIGHUP');
      await L.sleep(500);
      const r = await L.unary(c, { payload: Buffer.from('x') });
      const fail = L.metricValue(await L.scrape(AD), 'grpcgate_config_reloads_total', { result: 'failure' });
      L.check('11.5b', 'bad reload keeps the running config and counts a failure', !r.err && r.resp.backend === 'b2' && fail === 1, `backend=${r.resp && r.resp.backend} failures=${fail}`);
      fs.writeFileSync(cfgFile, config(B1));
    }

    // 11.6 SIGTERM drain with a call in flight
    {
      const inflight = L.unary(c, { payload: Buffer.from('drain'), delayMs: 1500 }, { timeoutMs: 8000 });
      await L.sleep(300);
      const t0 = Date.now();
      px.child.kill('SIGTERM');
      await L.sleep(200);
      let ready = null;
      try { ready = await L.httpGet(AD, '/ready', 500); } catch (e) { ready = { status: `error ${e.message}` }; }
      const refused = !(await L.tcpProbe(PX));
      const r = await inflight;
      await L.waitFor(() => px.exited !== null, 8000, 50);
      L.check('11.6', 'SIGTERM: in-flight 1.5 s call completes OK, /ready 503 while draining, listener refuses new connections, exit 0',
        !r.err && px.exited && px.exited.code === 0 && ready.status === 503 && refused,
        `call=${r.err ? L.codeName(r.err.code) + " '" + r.err.details + "'" : 'OK'} ready=${ready.status} refused=${refused} exit=${JSON.stringify(px.exited)} after ${Date.now() - t0}ms`);
    }
  } finally {
    c.close();
    await L.stopProxy(px);
    await b1.stop(); await b2.stop();
    bad.close();
  }
  L.finish('t11_misc');
}
L.run(main);
