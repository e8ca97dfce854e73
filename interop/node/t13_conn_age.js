// Check 13 (extra): grpc-js backend with grpc.max_connection_age_ms (periodic graceful GOAWAY, as
// deployments use to rebalance) under steady load through the proxy. Compares with grpc-js direct.
// Ports: backend 22230, proxy 22231, admin 22232.
'use strict';
const L = require('./lib');
const BE = 22230, PX = 22231, AD = 22232;

async function load(c, ms, workers) {
  const t0 = Date.now();
  let ok = 0; const errs = {};
  await Promise.all(Array.from({ length: workers }, async () => {
    while (Date.now() - t0 < ms) {
      const r = await L.unary(c, { payload: Buffer.from('x'), delayMs: 5 }, { timeoutMs: 5000 }).catch((e) => ({ err: { code: -1, details: e.message } }));
      if (r.err) { const k = `${L.codeName(r.err.code)}: ${r.err.details.replace(/\d+/g, 'N').slice(0, 100)}`; errs[k] = (errs[k] || 0) + 1; } else ok++;
    }
  }));
  return { ok, errs };
}

async function main() {
  await L.requirePortsFree([BE, PX, AD]);
  const be = await L.startBackend(BE, 'b1', { serverOptions: { 'grpc.max_connection_age_ms': 300, 'grpc.max_connection_age_grace_ms': 2000 } });
  const px = await L.startProxy('t13', {
    admin: AD, listeners: [{ port: PX, routes: [{ cluster: 'echo' }] }], clusters: [{ name: 'echo', endpoints: [BE] }],
  });
  const c = L.client(PX);
  const d = L.client(BE);
  try {
    const via = await load(c, 4000, 8);
    const dir = await load(d, 4000, 8);
    const nErr = Object.values(via.errs).reduce((a, b) => a + b, 0);
    const nDir = Object.values(dir.errs).reduce((a, b) => a + b, 0);
    L.check('13.1', 'backend max_connection_age 300 ms (graceful GOAWAY every ~0.3 s), 8 callers for 4 s: no failed calls through the proxy',
      nErr === 0, `via proxy ok=${via.ok} errors=${JSON.stringify(via.errs)}; direct grpc-js ok=${dir.ok} errors=${JSON.stringify(dir.errs)}`);
    L.check('13.2', 'proxy alive', px.exited === null);
  } finally {
    c.close(); d.close();
    await L.stopProxy(px);
    await be.stop();
  }
  L.finish('t13_conn_age');
}
L.run(main);
