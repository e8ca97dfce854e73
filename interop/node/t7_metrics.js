// Check 7: admin endpoint metrics after real traffic: names and labels per the contract, /healthz, /ready.
// Ports: backends 22170 22171, proxy 22173, admin 22172, dead endpoint 22179.
'use strict';
const http = require('http');
const L = require('./lib');
const { grpc } = L;

const B1 = 22170, B2 = 22171, AD = 22172, PX = 22173, DEAD = 22179;

function req(port, method, p) {
  return new Promise((resolve, reject) => {
    const r = http.request({ host: '127.0.0.1', port, method, path: p, timeout: 2000 }, (res) => {
      let b = ''; res.on('data', (d) => { b += d; }); res.on('end', () => resolve({ status: res.statusCode, body: b, headers: res.headers }));
    });
    r.on('error', reject); r.end();
  });
}

async function main() {
  await L.requirePortsFree([B1, B2, AD, PX, DEAD]);
  const b1 = await L.startBackend(B1, 'b1');
  const b2 = await L.startBackend(B2, 'b2');
  const px = await L.startProxy('t7', {
    admin: AD,
    listeners: [{
      port: PX,
      routes: [{ service: 'echo.Echo', method: 'ClientStream', cluster: 'echo', timeout: '200ms' },
        { service: 'echo.Echo', cluster: 'echo' }, { service: 'dead.Dead', cluster: 'dead' }],
    }],
    clusters: [{ name: 'echo', endpoints: [B1, B2], extra: '[clusters.health_check]\ninterval = "300ms"\ntimeout = "250ms"' },
      { name: 'dead', endpoints: [DEAD] }],
  });
  const c = L.client(PX);
  try {
    await L.waitFor(() => L.healthyIs(AD, 'echo', [B2, B1], 1), 5000);
    // traffic
    for (let i = 0; i < 10; i++) await L.unary(c, { payload: Buffer.from('ok') });              // OK x10
    for (let i = 0; i < 4; i++) await L.unary(c, { failCode: 5, failMessage: 'nf' });           // NOT_FOUND x4 (backend)
    for (let i = 0; i < 3; i++) await L.bytesUnary(PX, '/nope.Nope/X');                         // UNIMPLEMENTED x3 (no route)
    for (let i = 0; i < 2; i++) await L.bytesUnary(PX, '/dead.Dead/X');                         // UNAVAILABLE x2 (unreachable)
    {
      // DEADLINE_EXCEEDED via the 200ms route timeout on ClientStream
      await L.withTimeout(new Promise((resolve) => {
        const call = c.ClientStream(() => {});
        call.on('status', resolve);
        call.write({ payload: Buffer.from('x') });
      }), 3000, 'clientstream timeout');
    }
    {
      // CANCELLED
      const call = c.ServerStream({ payload: Buffer.from('x'), count: 50, delayMs: 50 });
      call.on('error', () => {});
      await new Promise((r) => call.once('data', r));
      call.cancel();
    }
    // in flight: one slow call
    const slow = L.unary(c, { payload: Buffer.from('slow'), delayMs: 1000 });
    await L.sleep(300);
    const text = await L.metrics(AD);
    const m = L.parseMetrics(text);
    await slow;
    await L.sleep(200);
    const m2 = await L.scrape(AD);

    const names = ['grpcgate_requests_total', 'grpcgate_request_duration_seconds_bucket', 'grpcgate_request_duration_seconds_sum', 'grpcgate_request_duration_seconds_count',
      'grpcgate_endpoint_in_flight', 'grpcgate_endpoint_healthy', 'grpcgate_health_checks_total', 'grpcgate_downstream_connections_active'];
    const missing = names.filter((n) => !m.some((s) => s.name === n));
    L.check('7.1', 'all contract metric names present', missing.length === 0, `missing=[${missing}]`);
    const types = {
      grpcgate_requests_total: 'counter', grpcgate_request_duration_seconds: 'histogram', grpcgate_endpoint_in_flight: 'gauge',
      grpcgate_endpoint_healthy: 'gauge', grpcgate_health_checks_total: 'counter', grpcgate_downstream_connections_active: 'gauge',
    };
    const badTypes = Object.entries(types).filter(([n, t]) => !text.includes(`# TYPE ${n} ${t}`));
    L.check('7.1b', '# TYPE lines match the contract types', badTypes.length === 0, JSON.stringify(badTypes));
    const labelSets = {
      grpcgate_requests_total: ['cluster', 'endpoint', 'grpc_status', 'listener'],
      grpcgate_request_duration_seconds_count: ['cluster'],
      grpcgate_request_duration_seconds_bucket: ['cluster', 'le'],
      grpcgate_endpoint_in_flight: ['cluster', 'endpoint'],
      grpcgate_endpoint_healthy: ['cluster', 'endpoint'],
      grpcgate_health_checks_total: ['cluster', 'endpoint', 'result'],
      grpcgate_downstream_connections_active: ['listener'],
    };
    const badLabels = [];
    for (const [n, want] of Object.entries(labelSets)) {
      for (const s of m.filter((x) => x.name === n)) {
        const got = Object.keys(s.labels).sort().join(',');
        if (got !== want.join(',')) badLabels.push(`${n}{${got}}`);
      }
    }
    L.check('7.2', 'label names exactly as in the contract', badLabels.length === 0, [...new Set(badLabels)].join(' '));

    const rt = m.filter((s) => s.name === 'grpcgate_requests_total' && s.value > 0);
    const canon = Object.keys(grpc.status);
    const nonCanon = rt.filter((s) => !canon.includes(s.labels.grpc_status));
    L.check('7.3', 'grpc_status label values are canonical names', nonCanon.length === 0, nonCanon.map((s) => s.labels.grpc_status).join(','));
    const ep = (p) => `127.0.0.1:${p}`;
    const okSum = (L.metricValue(m, 'grpcgate_requests_total', { listener: 'edge', cluster: 'echo', endpoint: ep(B1), grpc_status: 'OK' }) || 0) +
      (L.metricValue(m, 'grpcgate_requests_total', { listener: 'edge', cluster: 'echo', endpoint: ep(B2), grpc_status: 'OK' }) || 0);
    L.check('7.4', 'OK calls counted per endpoint (10)', okSum === 10, `sum=${okSum}`);
    const nf = L.metricValue(m, 'grpcgate_requests_total', { cluster: 'echo', grpc_status: 'NOT_FOUND' });
    L.check('7.5', 'backend NOT_FOUND counted (4) with an endpoint label', nf === 4 && rt.filter((s) => s.labels.grpc_status === 'NOT_FOUND').every((s) => s.labels.endpoint.startsWith('127.0.0.1:')), `value=${nf}`);
    const unimpl = rt.filter((s) => s.labels.grpc_status === 'UNIMPLEMENTED');
    L.check('7.6', 'no-route UNIMPLEMENTED counted (3) with listener="edge", cluster="" and endpoint=""',
      unimpl.length === 1 && unimpl[0].value === 3 && unimpl[0].labels.listener === 'edge' && unimpl[0].labels.cluster === '' && unimpl[0].labels.endpoint === '',
      JSON.stringify(unimpl.map((s) => [s.labels, s.value])));
    const unav = rt.filter((s) => s.labels.grpc_status === 'UNAVAILABLE');
    L.info('7.7', 'UNAVAILABLE (endpoint refused) labels', JSON.stringify(unav.map((s) => [s.labels, s.value])));
    L.check('7.7b', 'UNAVAILABLE for an unreachable cluster counted (2) with cluster="dead"', unav.reduce((a, s) => a + (s.labels.cluster === 'dead' ? s.value : 0), 0) === 2);
    const de = L.metricValue(m, 'grpcgate_requests_total', { cluster: 'echo', grpc_status: 'DEADLINE_EXCEEDED' });
    const ca = L.metricValue(m, 'grpcgate_requests_total', { cluster: 'echo', grpc_status: 'CANCELLED' });
    L.check('7.8', 'DEADLINE_EXCEEDED (1) and CANCELLED (1) counted', de === 1 && ca === 1, `DE=${de} CANCELLED=${ca}`);
    const inflight = (mm) => (L.metricValue(mm, 'grpcgate_endpoint_in_flight', { cluster: 'echo', endpoint: ep(B1) }) || 0) + (L.metricValue(mm, 'grpcgate_endpoint_in_flight', { cluster: 'echo', endpoint: ep(B2) }) || 0);
    L.check('7.9', 'endpoint_in_flight is 1 during a slow call and 0 after', inflight(m) === 1 && inflight(m2) === 0, `during=${inflight(m)} after=${inflight(m2)}`);
    const hc = m.filter((s) => s.name === 'grpcgate_health_checks_total');
    L.check('7.10', 'health_checks_total{result=success} > 0 per endpoint; endpoint_healthy = 1', hc.filter((s) => s.labels.result === 'success' && s.value > 0).length === 2 &&
      L.metricValue(m, 'grpcgate_endpoint_healthy', { cluster: 'echo', endpoint: ep(B1) }) === 1, JSON.stringify(hc.map((s) => [s.labels, s.value])));
    const dur = L.metricValue(m, 'grpcgate_request_duration_seconds_count', { cluster: 'echo' });
    L.check('7.11', 'request_duration_seconds_count{cluster=echo} counts the routed calls to echo (10+4+1+1 = 16)', dur === 16, `count=${dur}`);
    const durDead = L.metricValue(m, 'grpcgate_request_duration_seconds_count', { cluster: 'dead' });
    L.info('7.11b', 'request_duration_seconds_count{cluster=dead}', String(durDead));
    const conns = L.metricValue(m, 'grpcgate_downstream_connections_active', { listener: 'edge' });
    const c2 = L.client(PX, { 'grpc.use_local_subchannel_pool': 1 });
    await L.unary(c2, { payload: Buffer.from('x') });
    const conns2 = L.metricValue(await L.scrape(AD), 'grpcgate_downstream_connections_active', { listener: 'edge' });
    c2.close();
    const closed = await L.waitFor(async () => L.metricValue(await L.scrape(AD), 'grpcgate_downstream_connections_active', { listener: 'edge' }) === conns, 3000);
    L.check('7.12', 'downstream_connections_active: +1 with a second channel, back after it closes', conns >= 1 && conns2 === conns + 1 && closed, `before=${conns} with2=${conns2} closedBack=${closed}`);

    // admin endpoints
    const hz = await req(AD, 'GET', '/healthz');
    const rd = await req(AD, 'GET', '/ready');
    const post = await req(AD, 'POST', '/metrics');
    const nope = await req(AD, 'GET', '/nope');
    const head = await req(AD, 'HEAD', '/metrics');
    L.check('7.13', '/healthz 200 ok, /ready 200 ready', hz.status === 200 && /ok/.test(hz.body) && rd.status === 200 && /ready/.test(rd.body), `healthz=${hz.status} '${hz.body.trim()}' ready=${rd.status} '${rd.body.trim()}'`);
    L.check('7.14', 'POST /metrics 405, unknown path 404, HEAD /metrics 200', post.status === 405 && nope.status === 404 && head.status === 200, `POST=${post.status} /nope=${nope.status} HEAD=${head.status}`);
    L.info('7.15', 'metrics content-type', String(head.headers['content-type']));
    L.check('7.16', 'proxy alive', px.exited === null);
  } finally {
    c.close();
    await L.stopProxy(px);
    await b1.stop(); await b2.stop();
  }
  L.finish('t7_metrics');
}

L.run(main);
