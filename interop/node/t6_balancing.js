// Check 6: per-request balancing over one grpc-js channel: round_robin, least_request,
// join_shortest_queue, weights; streaming calls balanced per call.
// Ports: backends 22160-22162, listeners rr 22163 / lr 22164 / jsq 22165 / weighted 22167, admin 22166.
'use strict';
const L = require('./lib');

const B = [22160, 22161, 22162], RR = 22163, LR = 22164, JSQ = 22165, AD = 22166, W = 22167;

async function sequential(c, n) {
  const by = {};
  let errs = 0;
  for (let i = 0; i < n; i++) {
    const r = await L.unary(c, { payload: Buffer.from('x') });
    if (r.err) errs++; else by[r.resp.backend] = (by[r.resp.backend] || 0) + 1;
  }
  return { by, errs };
}

// `workers` concurrent loops on one channel, `total` calls in all.
async function concurrent(c, total, workers, req = { payload: Buffer.from('x') }) {
  const by = {};
  let errs = 0;
  let left = total;
  const errMsgs = new Set();
  await Promise.all(Array.from({ length: workers }, async () => {
    while (left > 0) {
      left--;
      const r = await L.unary(c, req, { timeoutMs: 15000 });
      if (r.err) { errs++; errMsgs.add(r.err.details); } else by[r.resp.backend] = (by[r.resp.backend] || 0) + 1;
    }
  }));
  return { by, errs, errMsgs: [...errMsgs].slice(0, 2) };
}

function streamSpread(c, n) {
  return Promise.all(Array.from({ length: n }, () => new Promise((resolve) => {
    const call = c.ServerStream({ payload: Buffer.from('s'), count: 2 });
    let backend = null;
    call.on('data', (m) => { backend = m.backend; });
    call.on('error', () => {});
    call.on('status', () => resolve(backend));
  }))).then((bs) => bs.reduce((a, b) => { a[b] = (a[b] || 0) + 1; return a; }, {}));
}

async function main() {
  await L.requirePortsFree([...B, RR, LR, JSQ, AD, W]);
  const bes = [];
  bes.push(await L.startBackend(B[0], 'b1'));
  bes.push(await L.startBackend(B[1], 'b2'));
  bes.push(await L.startBackend(B[2], 'b3'));
  const listener = (name, port) => ({ name, port, routes: [{ cluster: name }] });
  const balanced = (name, balancer, endpoints = B) => ({ name, endpoints, extra: `balancer = "${balancer}"` });
  const px = await L.startProxy('t6', {
    admin: AD,
    listeners: [listener('rr', RR), listener('lr', LR), listener('jsq', JSQ), listener('w', W)],
    clusters: [balanced('rr', 'round_robin'), balanced('lr', 'least_request'), balanced('jsq', 'join_shortest_queue'),
      balanced('w', 'round_robin', [{ address: `127.0.0.1:${B[0]}`, weight: 1 }, { address: `127.0.0.1:${B[1]}`, weight: 3 }])],
  });
  const crr = L.client(RR), clr = L.client(LR), cjsq = L.client(JSQ), cw = L.client(W);
  try {
    let s = await sequential(crr, 300);
    L.check('6.1', 'round_robin, one channel, 300 sequential calls -> 100/100/100', s.errs === 0 && s.by.b1 === 100 && s.by.b2 === 100 && s.by.b3 === 100, JSON.stringify(s));
    s = await concurrent(crr, 300, 12);
    const even = (x) => Object.keys(x.by).length === 3 && Object.values(x.by).every((v) => v >= 90 && v <= 110);
    L.check('6.1b', 'round_robin, 12 concurrent callers on one channel, 300 calls -> ~even', s.errs === 0 && even(s), JSON.stringify(s));
    const ss = await streamSpread(crr, 30);
    L.check('6.1c', 'round_robin: 30 concurrent server-streaming calls on one channel spread over all 3', Object.keys(ss).length === 3 && Object.values(ss).every((v) => v >= 8), JSON.stringify(ss));

    s = await sequential(clr, 300);
    L.check('6.2', 'least_request, 300 sequential calls -> every backend used (>=50 each)', s.errs === 0 && Object.keys(s.by).length === 3 && Object.values(s.by).every((v) => v >= 50), JSON.stringify(s));
    s = await sequential(cjsq, 300);
    L.check('6.3', 'join_shortest_queue, 300 sequential calls -> every backend used (>=50 each)', s.errs === 0 && Object.keys(s.by).length === 3 && Object.values(s.by).every((v) => v >= 50), JSON.stringify(s));

    // slow b3: load-aware balancers should give it fewer calls under concurrency
    await bes[2].stop();
    bes[2] = await L.startBackend(B[2], 'b3', { extraDelayMs: 100 });
    await L.sleep(300);
    // warm (reconnect to b3)
    await concurrent(clr, 12, 6);
    await concurrent(cjsq, 12, 6);
    s = await concurrent(clr, 400, 12);
    L.check('6.2b', 'least_request, b3 100ms slower, 12 concurrent callers: b3 gets < 1/3', s.errs === 0 && (s.by.b3 || 0) < 400 / 3 * 0.7, JSON.stringify(s));
    s = await concurrent(cjsq, 400, 12);
    L.check('6.3b', 'join_shortest_queue, b3 100ms slower, 12 concurrent callers: b3 gets < 1/3', s.errs === 0 && (s.by.b3 || 0) < 400 / 3 * 0.7, JSON.stringify(s));
    s = await concurrent(crr, 150, 12);
    L.info('6.1d', 'round_robin with the slow b3 (for comparison)', JSON.stringify(s));

    s = await sequential(cw, 200);
    L.check('6.4', 'round_robin weights 1:3 -> 50/150', s.errs === 0 && s.by.b1 === 50 && s.by.b2 === 150, JSON.stringify(s));

    const m = await L.scrape(AD);
    const perEp = B.map((p) => L.metricValue(m, 'grpcgate_requests_total', { listener: 'rr', cluster: 'rr', endpoint: `127.0.0.1:${p}`, grpc_status: 'OK' }));
    L.check('6.5', 'requests_total{listener=rr,cluster=rr,endpoint=host:port,grpc_status=OK} per endpoint present', perEp.every((v) => v > 0), JSON.stringify(perEp));
    L.check('6.6', 'proxy alive', px.exited === null);
  } finally {
    for (const c of [crr, clr, cjsq, cw]) c.close();
    await L.stopProxy(px);
    for (const b of bes) await b.stop();
  }
  L.finish('t6_balancing');
}

L.run(main);
