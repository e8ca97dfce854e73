// Check 1: all four call types, large / many / empty messages, bidi half-close ordering.
// Ports: backend 22100, proxy 22101, admin 22102.
'use strict';
const L = require('./lib');
const { grpc } = L;

const BE = 22100, PX = 22101, AD = 22102;
const MIB = 1024 * 1024;
const big = { 'grpc.max_receive_message_length': 32 * MIB, 'grpc.max_send_message_length': 32 * MIB };

const collectStream = (call, timeoutMs = 20000) => L.collect(call, timeoutMs);

function clientStream(c, msgs, md, opts = {}) {
  return L.withTimeout(new Promise((resolve) => {
    const out = {};
    const call = c.ClientStream(md || new grpc.Metadata(), opts, (err, resp) => { out.err = err; out.resp = resp; });
    call.on('status', (s) => { out.status = s; setImmediate(() => resolve(out)); });
    let i = 0;
    const pump = () => {
      while (i < msgs.length) {
        if (!call.write(msgs[i++])) return call.once('drain', pump);
      }
      call.end();
    };
    pump();
  }), 30000, 'client stream');
}

async function main() {
  await L.requirePortsFree([BE, PX, AD]);
  const be = await L.startBackend(BE, 'b1', { serverOptions: big });
  const px = await L.startProxy('t1', {
    admin: AD,
    listeners: [{ port: PX, routes: [{ service: 'echo.Echo', cluster: 'echo' }] }],
    clusters: [{ name: 'echo', endpoints: [BE] }],
  });
  const c = L.client(PX, big);
  try {
    // 1.1 unary
    let r = await L.unary(c, { payload: Buffer.from('hello') });
    L.check('1.1', 'unary passes through', !r.err && r.resp.payload.toString() === 'hello' && r.resp.backend === 'b1',
      r.err ? `${r.err.code} ${r.err.details}` : '');

    // 1.2 server streaming
    let s = await collectStream(c.ServerStream({ payload: Buffer.from('x'), count: 50 }));
    L.check('1.2', 'server streaming: 50 messages in order, OK', s.status.code === 0 && s.msgs.length === 50 && s.msgs.every((m, i) => m.seq === i),
      `status=${s.status.code} n=${s.msgs.length}`);

    // 1.3 client streaming
    let cs = await clientStream(c, Array.from({ length: 50 }, () => ({ payload: Buffer.from('abc') })));
    L.check('1.3', 'client streaming: 50 messages counted', !cs.err && cs.resp.seq === 50 && Number(cs.resp.totalBytes) === 150,
      cs.err ? `${cs.err.code} ${cs.err.details}` : `seq=${cs.resp.seq}`);

    // 1.4 bidi ping-pong: each reply must arrive before the next request is sent (no buffering)
    {
      const call = c.Bidi();
      const got = [];
      let waiter = null;
      call.on('data', (m) => { got.push(m); if (waiter) { const w = waiter; waiter = null; w(); } });
      const st = new Promise((res) => call.on('status', res));
      call.on('error', () => {});
      let ok = true;
      for (let i = 0; i < 200; i++) {
        const p = new Promise((res) => { waiter = res; });
        call.write({ payload: Buffer.from(`m${i}`) });
        try { await L.withTimeout(p, 3000, `pong ${i}`); } catch (e) { ok = false; break; }
      }
      call.end();
      const status = await L.withTimeout(st, 5000, 'bidi status');
      L.check('1.4', 'bidi ping-pong 200 round trips (each reply before next request)', ok && got.length === 200 && status.code === 0 &&
        got.every((m, i) => m.payload.toString() === `m${i}`), `got=${got.length} status=${status.code}`);
    }

    // 1.5 large messages 1 MiB each direction, all four types
    {
      const p1 = Buffer.alloc(1 * MIB, 0xab);
      r = await L.unary(c, { payload: p1 });
      const u = !r.err && r.resp.payload.equals(p1);
      s = await collectStream(c.ServerStream({ payload: p1, count: 3 }));
      const ss = s.status.code === 0 && s.msgs.length === 3 && s.msgs.every((m) => m.payload.equals(p1));
      cs = await clientStream(c, [{ payload: p1 }, { payload: p1 }, { payload: p1 }]);
      const cst = !cs.err && Number(cs.resp.totalBytes) === 3 * MIB;
      const call = c.Bidi();
      const bp = collectStream(call);
      for (let i = 0; i < 3; i++) call.write({ payload: p1 });
      call.end();
      const b = await bp;
      const bd = b.status.code === 0 && b.msgs.length === 3 && b.msgs.every((m) => m.payload.equals(p1));
      L.check('1.5', '1 MiB messages: unary / server / client / bidi', u && ss && cst && bd, `unary=${u} ss=${ss} cs=${cst} bidi=${bd}${r.err ? ' ' + r.err.details : ''}`);
    }

    // 1.6 8 MiB messages with raised limits
    {
      const p8 = Buffer.alloc(8 * MIB);
      for (let i = 0; i < p8.length; i += 4096) p8[i] = i & 0xff;
      const t0 = Date.now();
      r = await L.unary(c, { payload: p8 }, { timeoutMs: 30000 });
      const u = !r.err && r.resp.payload.equals(p8);
      s = await collectStream(c.ServerStream({ payload: p8, count: 2 }), 30000);
      const ss = s.status.code === 0 && s.msgs.length === 2 && s.msgs.every((m) => m.payload.equals(p8));
      const call = c.Bidi();
      const bp = collectStream(call, 30000);
      call.write({ payload: p8 }); call.write({ payload: p8 }); call.end();
      const b = await bp;
      const bd = b.status.code === 0 && b.msgs.length === 2 && b.msgs.every((m) => m.payload.equals(p8));
      L.check('1.6', '8 MiB messages (limits raised to 32 MiB): unary / server / bidi', u && ss && bd,
        `unary=${u}${r.err ? '(' + r.err.code + ' ' + r.err.details + ')' : ''} ss=${ss}(${s.status.code}) bidi=${bd}(${b.status.code}) ${Date.now() - t0}ms`);
    }

    // 1.6b 8 MiB to a client with the default 4 MiB receive limit: RESOURCE_EXHAUSTED at the client
    {
      const cd = L.client(PX);
      r = await L.unary(cd, { payload: Buffer.alloc(8 * MIB) }, { timeoutMs: 30000 });
      L.info('1.6b', '8 MiB request to default-limit (4 MiB) backend... via client with default limits',
        `status=${L.codeName(L.code(r.err))} ${r.err ? r.err.details : ''}`);
      cd.close();
    }

    // 1.7 many small messages: 10000 each way
    {
      const N = 10000;
      const t0 = Date.now();
      s = await collectStream(c.ServerStream({ payload: Buffer.from('s'), count: N }), 60000);
      const ss = s.status.code === 0 && s.msgs.length === N && s.msgs.every((m, i) => m.seq === i);
      cs = await clientStream(c, Array.from({ length: N }, (_, i) => ({ payload: Buffer.from(String(i % 10)) })));
      const cst = !cs.err && cs.resp.seq === N;
      const call = c.Bidi();
      const bp = collectStream(call, 60000);
      let i = 0;
      await new Promise((res) => {
        const pump = () => {
          while (i < N) { i++; if (!call.write({ payload: Buffer.from('b') })) return call.once('drain', pump); }
          call.end(); res();
        };
        pump();
      });
      const b = await bp;
      const bd = b.status.code === 0 && b.msgs.length === N;
      L.check('1.7', '10,000 small messages: server / client / bidi stream', ss && cst && bd,
        `ss=${s.msgs.length}(${s.status.code}) cs=${cst ? cs.resp.seq : (cs.err && cs.err.details)} bidi=${b.msgs.length}(${b.status.code}) ${Date.now() - t0}ms`);
    }

    // 1.8 empty messages (zero-length protobuf) in both directions
    {
      const md = new grpc.Metadata(); md.set('x-empty-resp', '1');
      r = await L.unary(c, {}, { metadata: md });
      const u = !r.err && r.resp.payload.length === 0 && r.resp.backend === '';
      s = await collectStream(c.ServerStream({ count: 5 }, md));
      const ss = s.status.code === 0 && s.msgs.length === 5 && s.msgs.every((m) => m.backend === '' && m.seq === 0);
      cs = await clientStream(c, Array.from({ length: 100 }, () => ({})));
      const cst = !cs.err && cs.resp.seq === 100 && Number(cs.resp.totalBytes) === 0;
      const call = c.Bidi();
      const bp = collectStream(call);
      for (let k = 0; k < 10; k++) call.write({});
      call.end();
      const b = await bp;
      const bd = b.status.code === 0 && b.msgs.length === 10;
      // client stream with zero messages
      const cz = await clientStream(c, []);
      const czok = !cz.err && cz.resp.seq === 0;
      L.check('1.8', 'empty messages: unary / server / client (100 empty) / bidi / client stream of 0 messages', u && ss && cst && bd && czok,
        `unary=${u} ss=${ss} cs=${cst} bidi=${bd} zero-msg-cs=${czok}`);
    }

    // 1.9 bidi half-close ordering: client sends 5 and ends; server then sends 5 more, then ends OK
    {
      const md = new grpc.Metadata(); md.set('x-after-end', '5');
      const call = c.Bidi(md);
      const bp = collectStream(call);
      for (let k = 0; k < 5; k++) call.write({ payload: Buffer.from(`c${k}`) });
      await L.sleep(100);
      call.end();
      const endAt = Date.now();
      const b = await bp;
      const after = b.msgs.filter((m) => m.payload.toString().startsWith('after-end-'));
      const rec = be.calls.filter((x) => x.method === 'Bidi').pop();
      L.check('1.9', 'bidi half-close: client ends, server keeps sending 5 more, then ends OK',
        b.status.code === 0 && b.msgs.length === 10 && after.length === 5 && b.msgs.slice(5).every((m, k) => m.payload.toString() === `after-end-${k}`) &&
        rec && rec.clientEndedAt >= endAt - 5,
        `status=${b.status.code} msgs=${b.msgs.length} after=${after.length}`);
    }

    // 1.10 bidi: server finishes (OK) while client has not half-closed
    {
      const call = c.Bidi();
      const bp = collectStream(call);
      call.write({ payload: Buffer.from('a') });
      call.write({ payload: Buffer.from('b'), failCode: 0 });
      // the server ends only after client end; instead use a server stream-like end: send failCode 9 to end early
      call.write({ payload: Buffer.from('c'), failCode: 9, failMessage: 'early end' });
      const b = await bp;
      L.check('1.10', 'bidi: server ends with status before client half-close; client gets 2 msgs + FAILED_PRECONDITION',
        b.status.code === 9 && b.status.details === 'early end' && b.msgs.length === 2, `status=${b.status.code} '${b.status.details}' msgs=${b.msgs.length}`);
      call.end();
    }

    // 1.11 the proxy still serves after all that
    r = await L.unary(c, { payload: Buffer.from('again') });
    L.check('1.11', 'proxy still serves', !r.err && px.exited === null);
  } finally {
    c.close();
    const ex = await L.stopProxy(px);
    L.info('1.x', 'proxy exit on SIGTERM', JSON.stringify(ex));
    await be.stop();
  }
  L.finish('t1_calltypes');
}

L.run(main);
