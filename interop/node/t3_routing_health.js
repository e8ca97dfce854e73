// Check 3: no route -> UNIMPLEMENTED (trailers-only, HTTP 200); all endpoints refusing -> UNAVAILABLE;
// grpc.health.v1 checks steer traffic; none healthy -> UNAVAILABLE; recovery.
// Ports: proxy 22121, admin 22122, backends 22123 22124, dead endpoints 22127 22128.
'use strict';
const L = require('./lib');
const { grpc } = L;

const PX = 22121, AD = 22122, B1 = 22123, B2 = 22124, D1 = 22127, D2 = 22128;

async function spread(c, n) {
  const by = {};
  let errors = [];
  for (let i = 0; i < n; i++) {
    const r = await L.unary(c, { payload: Buffer.from('x') });
    if (r.err) errors.push(`${L.codeName(r.err.code)}: ${r.err.details}`);
    else by[r.resp.backend] = (by[r.resp.backend] || 0) + 1;
  }
  return { by, errors };
}

function healthCheck(port, service) {
  const hc = new L.HealthClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
  return L.withTimeout(new Promise((resolve) => {
    hc.Check({ service }, (err, resp) => { hc.close(); resolve({ err, resp }); });
  }), 5000, 'health check');
}

async function main() {
  await L.requirePortsFree([PX, AD, B1, B2, D1, D2]);
  const b1 = await L.startBackend(B1, 'b1');
  let b2 = await L.startBackend(B2, 'b2');
  const px = await L.startProxy('t3', {
    admin: AD,
    listeners: [{ port: PX, routes: [{ service: 'echo.Echo', cluster: 'hc' }, { service: 'dead.Dead', cluster: 'dead' }] }],
    clusters: [
      { name: 'hc', endpoints: [B1, B2], extra: 'balancer = "round_robin"\n[clusters.health_check]\ninterval = "300ms"\ntimeout = "250ms"\nunhealthy_threshold = 2\nhealthy_threshold = 1\nservice = ""' },
      { name: 'dead', endpoints: [D1, D2], extra: 'connect_timeout = "500ms"' },
    ],
  });
  const c = L.client(PX);
  try {
    // wait for both endpoints to pass their first check
    const up = await L.waitFor(() => L.healthyIs(AD, 'hc', [B1, B2], 1), 5000);
    L.check('3.0', 'both health-checked endpoints become healthy', up);

    // 3.1 no route
    let r = await L.bytesUnary(PX, '/other.Svc/Method');
    L.check('3.1', 'no route -> UNIMPLEMENTED (grpc-js client)', r.err && r.err.code === 12, r.err ? `${L.codeName(r.err.code)} '${r.err.details}'` : 'OK?!');
    let rr = await L.rawCall(PX, { ':path': '/other.Svc/Method' });
    const h = rr.headers || {};
    L.check('3.1b', 'no route, raw h2: HTTP 200, trailers-only (END_STREAM on HEADERS), content-type application/grpc, grpc-status 12',
      h[':status'] === 200 && rr.headersEndStream && h['grpc-status'] === '12' && /^application\/grpc/.test(h['content-type'] || '') && !rr.trailers,
      `headers=${JSON.stringify(h)} endStream=${rr.headersEndStream} trailers=${JSON.stringify(rr.trailers)}`);
    // method of a routed service that the backend does not implement -> backend's UNIMPLEMENTED
    r = await L.bytesUnary(PX, '/echo.Echo/NoSuchMethod');
    L.check('3.1c', 'routed service, unknown method -> backend UNIMPLEMENTED passes through', r.err && r.err.code === 12, r.err ? `'${r.err.details}'` : '');

    // 3.2 all endpoints refusing
    r = await L.bytesUnary(PX, '/dead.Dead/M');
    L.check('3.2', 'all endpoints refuse connections -> UNAVAILABLE, promptly', r.err && r.err.code === 14 && r.ms < 3000,
      r.err ? `${L.codeName(r.err.code)} '${r.err.details}' in ${r.ms}ms` : 'OK?!');
    r = await L.bytesUnary(PX, '/dead.Dead/M');
    L.check('3.2b', 'second call while backing off -> UNAVAILABLE, fast', r.err && r.err.code === 14 && r.ms < 1000,
      r.err ? `${L.codeName(r.err.code)} '${r.err.details}' in ${r.ms}ms` : 'OK?!');

    // 3.3 spread, then flip b1 to NOT_SERVING
    let s = await spread(c, 20);
    L.check('3.3a', 'healthy: calls reach both backends', s.by.b1 > 0 && s.by.b2 > 0 && s.errors.length === 0, JSON.stringify(s));
    b1.health[''] = 'NOT_SERVING';
    const t0 = Date.now();
    const left = await L.waitFor(() => L.healthyIs(AD, 'hc', [B1], 0), 5000, 50);
    const detectMs = Date.now() - t0;
    s = await spread(c, 20);
    L.check('3.3', 'b1 NOT_SERVING -> marked unhealthy and traffic leaves it', left && !s.by.b1 && s.by.b2 === 20 && s.errors.length === 0,
      `detected in ${detectMs}ms, spread=${JSON.stringify(s)}`);
    const ready1 = await L.httpGet(AD, '/ready');
    L.check('3.3b', '/ready still 200 with one healthy endpoint', ready1.status === 200, `${ready1.status} ${ready1.body.trim()}`);

    // 3.4 none healthy
    b2.health[''] = 'NOT_SERVING';
    await L.waitFor(() => L.healthyIs(AD, 'hc', [B2], 0), 5000, 50);
    r = await L.unary(c, { payload: Buffer.from('x') });
    L.check('3.4', 'no healthy endpoint -> UNAVAILABLE', r.err && r.err.code === 14, r.err ? `${L.codeName(r.err.code)} '${r.err.details}'` : `OK from ${r.resp && r.resp.backend}`);
    const ready2 = await L.httpGet(AD, '/ready');
    L.check('3.4b', '/ready 503 naming the cluster when it has no healthy endpoint', ready2.status === 503 && ready2.body.includes('hc'), `${ready2.status} ${ready2.body.trim()}`);
    let hr = await healthCheck(PX, 'hc');
    L.check('3.4c', "proxy's own Health/Check('hc') -> NOT_SERVING", !hr.err && hr.resp.status === 'NOT_SERVING', JSON.stringify(hr.err ? hr.err.details : hr.resp));

    // 3.5 recovery
    b1.health[''] = 'SERVING';
    b2.health[''] = 'SERVING';
    const rec = await L.waitFor(() => L.healthyIs(AD, 'hc', [B1, B2], 1), 5000, 50);
    s = await spread(c, 20);
    L.check('3.5', 'recovery: both SERVING again -> traffic on both', rec && s.by.b1 > 0 && s.by.b2 > 0 && s.errors.length === 0, JSON.stringify(s));
    const ready3 = await L.httpGet(AD, '/ready');
    L.check('3.5b', '/ready 200 again', ready3.status === 200, `${ready3.status} ${ready3.body.trim()}`);
    hr = await healthCheck(PX, '');
    const hr2 = await healthCheck(PX, 'nope');
    L.check('3.5c', "proxy's own Health/Check: '' SERVING, unknown service NOT_FOUND", !hr.err && hr.resp.status === 'SERVING' && hr2.err && hr2.err.code === 5,
      `''=${JSON.stringify(hr.resp)} nope=${hr2.err ? hr2.err.code : JSON.stringify(hr2.resp)}`);

    // 3.6 a backend that dies: connect failover, then health marks it down; restart -> back
    await b2.stop();
    await L.sleep(100);
    s = await spread(c, 20);
    L.check('3.6', 'b2 killed: calls keep succeeding on b1 (connect failover / health)', s.errors.length === 0 && s.by.b1 === 20, JSON.stringify(s));
    b2 = await L.startBackend(B2, 'b2');
    const back = await L.waitFor(() => L.healthyIs(AD, 'hc', [B2], 1), 8000, 100);
    await L.sleep(300);
    s = await spread(c, 20);
    L.check('3.6b', 'b2 restarted: healthy again and gets traffic', back && s.by.b2 > 0 && s.errors.length === 0, JSON.stringify(s));
    L.check('3.6c', 'backend health checks were received with service ""', b1.healthChecks > 3, `b1 checks=${b1.healthChecks}`);

    // 3.7 health check that times out (backend Check hangs) -> unhealthy
    b1.server.unregister('/grpc.health.v1.Health/Check');
    b1.server.register('/grpc.health.v1.Health/Check', (call, cb) => { /* never answer */ }, (x) => x, (b) => b, 'unary');
    const hung = await L.waitFor(() => L.healthyIs(AD, 'hc', [B1], 0), 5000, 100);
    L.check('3.7', 'health Check that never answers (timeout 250ms) -> endpoint unhealthy', hung);
    const mm = await L.scrape(AD);
    L.info('3.7b', 'health_checks_total after run', JSON.stringify(mm.filter((x) => x.name === 'grpcgate_health_checks_total').map((x) => [x.labels.endpoint, x.labels.result, x.value])));
    L.check('3.8', 'proxy alive', px.exited === null);
  } finally {
    c.close();
    await L.stopProxy(px);
    await b1.stop(); await b2.stop();
  }
  L.finish('t3_routing_health');
}

L.run(main);
