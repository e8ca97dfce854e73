// Shared helpers for the grpcgate <-> @grpc/grpc-js interop checks.
// Backends are grpc-js servers in the test's own process; the proxy is $GRPCGATE, by default
// <repo>/target/release/grpcgate (build it with `cargo build --release`).
'use strict';
const fs = require('fs');
const path = require('path');
const net = require('net');
const http = require('http');
const http2 = require('http2');
const { spawn } = require('child_process');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const REPO = path.resolve(__dirname, '..', '..');   // this file is <repo>/interop/node/lib.js
const BIN = process.env.GRPCGATE || path.join(REPO, 'target', 'release', 'grpcgate');
const PROTO_DIR = path.join(REPO, 'proto');
const RUN_DIR = path.join(__dirname, 'run');   // generated configs, proxy logs, results, t10 certs (git-ignored)
fs.mkdirSync(RUN_DIR, { recursive: true });

const pkgDef = protoLoader.loadSync(
  [path.join(PROTO_DIR, 'echo.proto'), path.join(PROTO_DIR, 'health.proto')],
  { keepCase: false, longs: Number, enums: String, defaults: true, oneofs: true },
);
const proto = grpc.loadPackageDefinition(pkgDef);
const EchoClient = proto.echo.Echo;
const HealthClient = proto.grpc.health.v1.Health;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------- results
const results = [];
function record(id, status, name, detail = '') {
  results.push({ id, status, name, detail });
  const d = detail ? ` -- ${detail}` : '';
  console.log(`[${status}] ${id} ${name}${d}`);
}
function check(id, name, cond, detail = '') {
  record(id, cond ? 'PASS' : 'FAIL', name, detail);
  return cond;
}
function info(id, name, detail) {
  record(id, 'INFO', name, detail);
}
function summary(scriptName) {
  const n = (s) => results.filter((r) => r.status === s).length;
  console.log(`\n${scriptName}: ${n('PASS')} passed, ${n('FAIL')} failed, ${n('INFO')} info`);
  fs.writeFileSync(path.join(RUN_DIR, `${scriptName}.results.json`), JSON.stringify(results, null, 2));
  return n('FAIL');
}

// Run an async step with a time bound; a hang becomes a rejection.
function withTimeout(p, ms, what = 'operation') {
  let t;
  return Promise.race([
    p.finally(() => clearTimeout(t)),
    new Promise((_, rej) => {
      t = setTimeout(() => rej(new Error(`timeout after ${ms}ms: ${what}`)), ms);
    }),
  ]);
}

// Runs an async main(); an uncaught failure stops every proxy and exits 2.
function run(main) {
  main().catch(async (e) => { console.error(e); await stopAllProxies(); process.exit(2); });
}

// Prints the summary, sets the exit code (1 if anything failed) and makes sure the process exits even if
// a handle (a server, a socket) is still open.
function finish(scriptName, exitAfterMs = 500) {
  process.exitCode = summary(scriptName) ? 1 : 0;
  setTimeout(() => process.exit(), exitAfterMs).unref();
}

// ---------------------------------------------------------------- backend
function metaToObj(md) {
  const o = {};
  for (const [k, v] of Object.entries(md.getMap())) o[k] = v;
  return o;
}

// A grpc-js echo backend. Behaviour is steered by the request fields (see echo.proto) and metadata:
//   x-want-md: '1'   -> send initial metadata (x-init, x-init-bin) and trailers (x-trail, x-trail-bin)
//   x-fail-after: N  -> ServerStream/Bidi: after N messages, fail with fail_code/fail_message
//   x-after-end: N   -> Bidi: after the client half-closes, send N more messages (10 ms apart), then end
//   x-status-only    -> Unary: answer with status from fail_code even if 0 (OK without a message is
//                       not possible in grpc-js unary, so unused)
function startBackend(port, name, opts = {}) {
  const state = {
    name,
    port,
    calls: [], // { method, meta, peer, cancelled, deadline }
    health: { '': 'SERVING' },
    healthChecks: 0,
    watchers: new Set(),
  };
  // Sets a health status and pushes it to open Health/Watch streams.
  state.setHealth = (svc, st) => { state.health[svc] = st; for (const w of state.watchers) w(); };
  const server = new grpc.Server(opts.serverOptions || {});
  const rec = (method, call) => {
    const c = { method, meta: metaToObj(call.metadata), full: call.metadata.toJSON(), cancelled: false, deadline: call.getDeadline(), at: Date.now() };
    state.calls.push(c);
    call.on('cancelled', () => { c.cancelled = true; });
    return c;
  };
  const wantMd = (call) => call.metadata.get('x-want-md').length > 0;
  const initMd = () => {
    const m = new grpc.Metadata();
    m.set('x-init', 'init-value');
    m.set('x-init-bin', Buffer.from([0, 1, 2, 0xfe, 0xff]));
    return m;
  };
  const trailMd = () => {
    const m = new grpc.Metadata();
    m.set('x-trail', 'trail-value');
    m.set('x-trail-bin', Buffer.from([0xff, 0, 0x80, 0x7f]));
    return m;
  };
  const failErr = (req, call) => {
    const e = { code: req.failCode, details: req.failMessage };
    if (wantMd(call)) e.metadata = trailMd();
    return e;
  };

  server.addService(EchoClient.service, {
    Unary: (call, cb) => {
      rec('Unary', call);
      const req = call.request;
      if (opts.onUnary && opts.onUnary(call, cb)) return;
      if (wantMd(call) && !req.failCode) call.sendMetadata(initMd());
      const answer = () => {
        if (req.failCode) return cb(failErr(req, call));
        if (call.metadata.get('x-empty-resp').length) return cb(null, {});
        cb(null, { payload: req.payload, backend: name }, wantMd(call) ? trailMd() : undefined);
      };
      const delay = (req.delayMs || 0) + (opts.extraDelayMs || 0);
      if (delay) setTimeout(answer, delay);
      else answer();
    },
    ServerStream: (call) => {
      const rc = rec('ServerStream', call);
      rc.sent = 0;
      const req = call.request;
      const count = req.count || 1;
      const failAfter = call.metadata.get('x-fail-after').length ? Number(call.metadata.get('x-fail-after')[0]) : -1;
      if (wantMd(call)) call.sendMetadata(initMd());
      let i = 0;
      let stopped = false;
      call.on('cancelled', () => { stopped = true; });
      const step = () => {
        if (stopped) return;
        if (i === failAfter) return call.emit('error', failErr(req, call));
        if (i >= count) return call.end(wantMd(call) ? trailMd() : undefined);
        const ok = call.write(call.metadata.get('x-empty-resp').length ? {} : { payload: req.payload, backend: name, seq: i });
        i++;
        rc.sent = i;
        if (req.delayMs) setTimeout(step, req.delayMs);
        else if (!ok) call.once('drain', step);
        else setImmediate(step);
      };
      if (req.failCode && failAfter < 0 && count === 0) return call.emit('error', failErr(req, call));
      step();
    },
    ClientStream: (call, cb) => {
      const c = rec('ClientStream', call);
      let n = 0;
      let bytes = 0;
      let last = null;
      call.on('data', (m) => { n++; bytes += m.payload.length; last = m; });
      call.on('end', () => {
        c.received = n;
        if (last && last.failCode) return cb(failErr(last, call));
        cb(null, { backend: name, seq: n, totalBytes: bytes, payload: Buffer.alloc(0) });
      });
      call.on('error', () => {});
    },
    Bidi: (call) => {
      const c = rec('Bidi', call);
      const afterEnd = call.metadata.get('x-after-end').length ? Number(call.metadata.get('x-after-end')[0]) : 0;
      if (wantMd(call)) call.sendMetadata(initMd());
      let seq = 0;
      c.received = 0;
      call.on('data', (m) => {
        c.received++;
        if (m.failCode) return call.emit('error', failErr(m, call));
        call.write({ payload: m.payload, backend: name, seq: seq++ });
      });
      call.on('end', async () => {
        c.clientEndedAt = Date.now();
        for (let k = 0; k < afterEnd; k++) {
          await sleep(10);
          if (c.cancelled) return;
          call.write({ payload: Buffer.from(`after-end-${k}`), backend: name, seq: seq++ });
        }
        call.end(wantMd(call) ? trailMd() : undefined);
      });
      call.on('error', () => {});
    },
  });
  server.addService(HealthClient.service, {
    Check: (call, cb) => {
      state.healthChecks++;
      const svc = call.request.service;
      const st = state.health[svc];
      if (!st) return cb({ code: grpc.status.NOT_FOUND, details: 'unknown service' });
      cb(null, { status: st });
    },
    Watch: (call) => {
      if (!opts.watch) return call.emit('error', { code: grpc.status.UNIMPLEMENTED, details: 'no watch' });
      state.watchCalls = (state.watchCalls || 0) + 1;
      const svc = call.request.service;
      const send = () => call.write({ status: state.health[svc] || 'SERVICE_UNKNOWN' });
      state.watchers.add(send);
      call.on('cancelled', () => state.watchers.delete(send));
      send();
    },
  });
  return new Promise((resolve, reject) => {
    server.bindAsync(`127.0.0.1:${port}`, grpc.ServerCredentials.createInsecure(), (err) => {
      if (err) return reject(err);
      state.server = server;
      state.stop = () => new Promise((r) => { server.forceShutdown(); r(); });
      resolve(state);
    });
  });
}

// ---------------------------------------------------------------- proxy
let proxies = [];
// Never leave a proxy behind, even on an uncaught exception.
process.on('exit', () => { for (const p of proxies) if (!p.exited) { try { p.child.kill('SIGKILL'); } catch {} } });
process.on('uncaughtException', (e) => { console.error('uncaught', e); process.exit(3); });
function httpGet(port, p, timeoutMs = 2000) {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path: p, timeout: timeoutMs }, (res) => {
      let body = '';
      res.on('data', (d) => { body += d; });
      res.on('end', () => resolve({ status: res.statusCode, body, headers: res.headers }));
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', reject);
  });
}

function tcpProbe(port) {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    s.on('connect', () => { s.destroy(); resolve(true); });
    s.on('error', () => resolve(false));
  });
}

// grpcgate TOML from { admin, drain = '1s', listeners, clusters }:
//   listeners: [{ name = 'edge', port, extra = '' (TOML after `listen`), routes: [{ service, method, cluster, ... }] }]
//   clusters:  [{ name, endpoints: [port (on 127.0.0.1) | 'host:port' | { address, weight }], extra = '' }]
// (route values are written as strings).
function gateConfig({ admin, drain = '1s', listeners = [], clusters = [] }) {
  const ep = (e) => (typeof e === 'number' ? `"127.0.0.1:${e}"`
    : typeof e === 'string' ? `"${e}"`
      : `{ ${Object.entries(e).map(([k, v]) => `${k} = ${typeof v === 'number' ? v : `"${v}"`}`).join(', ')} }`);
  const out = [`drain_timeout = "${drain}"`, '[admin]', `listen = "127.0.0.1:${admin}"`];
  for (const l of listeners) {
    out.push('[[listeners]]', `name = "${l.name || 'edge'}"`, `listen = "127.0.0.1:${l.port}"`);
    if (l.extra) out.push(l.extra);
    for (const r of l.routes) out.push('[[listeners.routes]]', ...Object.entries(r).map(([k, v]) => `${k} = "${v}"`));
  }
  for (const c of clusters) {
    out.push('[[clusters]]', `name = "${c.name}"`, `endpoints = [${c.endpoints.map(ep).join(', ')}]`);
    if (c.extra) out.push(c.extra);
  }
  return `${out.join('\n')}\n`;
}

// Starts grpcgate with the given config (TOML text, or a gateConfig spec, whose admin and listener ports
// are then waited for unless given); resolves once admin /healthz answers and the listeners accept.
async function startProxy(name, config, opts = {}) {
  if (typeof config !== 'string') {
    opts = { adminPort: config.admin, listenPorts: config.listeners.map((l) => l.port), ...opts };
    config = gateConfig(config);
  }
  const { adminPort, listenPorts = [], env = {} } = opts;
  const cfg = path.join(RUN_DIR, `${name}.toml`);
  fs.writeFileSync(cfg, config);
  const logPath = path.join(RUN_DIR, `${name}.log`);
  const log = fs.openSync(logPath, 'w');
  const child = spawn(BIN, ['--config', cfg], {
    stdio: ['ignore', log, log],
    env: { ...process.env, RUST_LOG: env.RUST_LOG || 'info', ...env },
  });
  const p = { child, name, cfg, logPath, adminPort, exited: null };
  child.on('exit', (code, signal) => { p.exited = { code, signal }; });
  proxies.push(p);
  const t0 = Date.now();
  while (Date.now() - t0 < 10000) {
    if (p.exited) throw new Error(`grpcgate exited early: ${JSON.stringify(p.exited)}\n${fs.readFileSync(logPath, 'utf8')}`);
    let ok = true;
    if (adminPort) {
      try { ok = (await httpGet(adminPort, '/healthz', 500)).status === 200; } catch { ok = false; }
    }
    for (const lp of listenPorts) ok = ok && (await tcpProbe(lp));
    if (ok) return p;
    await sleep(100);
  }
  throw new Error(`grpcgate ${name} did not come up; log:\n${fs.readFileSync(logPath, 'utf8')}`);
}

async function stopProxy(p) {
  if (p.exited) return p.exited;
  p.child.kill('SIGTERM');
  const t0 = Date.now();
  while (!p.exited && Date.now() - t0 < 8000) await sleep(50);
  if (!p.exited) { p.child.kill('SIGKILL'); await sleep(200); }
  return p.exited;
}

async function stopAllProxies() {
  for (const p of proxies) await stopProxy(p);
  proxies = [];
}

function proxyLog(p) {
  return fs.readFileSync(p.logPath, 'utf8');
}

async function metrics(adminPort) {
  const r = await httpGet(adminPort, '/metrics');
  return r.body;
}

// The admin endpoint's metrics, parsed (see parseMetrics).
async function scrape(adminPort) {
  return parseMetrics(await metrics(adminPort));
}

// True if grpcgate_endpoint_healthy{cluster, endpoint=127.0.0.1:port} is `value` for every port given.
async function healthyIs(adminPort, cluster, ports, value) {
  const m = await scrape(adminPort);
  return ports.every((p) => metricValue(m, 'grpcgate_endpoint_healthy', { cluster, endpoint: `127.0.0.1:${p}` }) === value);
}

// Parses Prometheus text into [{name, labels, value}].
function parseMetrics(text) {
  const out = [];
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$/);
    if (!m) continue;
    const labels = {};
    if (m[3]) {
      const re = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
      let x;
      while ((x = re.exec(m[3]))) labels[x[1]] = x[2];
    }
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}

function metricValue(parsed, name, labels) {
  let sum = 0;
  let found = false;
  for (const s of parsed) {
    if (s.name !== name) continue;
    if (Object.entries(labels).every(([k, v]) => s.labels[k] === v)) { sum += s.value; found = true; }
  }
  return found ? sum : null;
}

// ---------------------------------------------------------------- clients
function client(port, options = {}) {
  return new EchoClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure(), options);
}

function unary(c, req, { metadata, deadlineMs, timeoutMs = 10000 } = {}) {
  return withTimeout(new Promise((resolve) => {
    const out = { initial: null, trailers: null };
    const callOpts = deadlineMs ? { deadline: Date.now() + deadlineMs } : {};
    const call = c.Unary(req, metadata || new grpc.Metadata(), callOpts, (err, resp) => {
      out.err = err;
      out.resp = resp;
      // status arrives after the callback
      setImmediate(() => resolve(out));
    });
    call.on('metadata', (m) => { out.initial = m; });
    call.on('status', (s) => { out.status = s; out.trailers = s.metadata; });
  }), timeoutMs, 'unary call');
}

// Collects a streaming call: messages (with arrival times in events), initial metadata, the error and the
// status; resolves at the status, rejects after timeoutMs.
function collect(call, timeoutMs = 10000) {
  return withTimeout(new Promise((resolve) => {
    const out = { msgs: [], status: null, err: null, initial: null, events: [] };
    call.on('metadata', (m) => { out.initial = m; });
    call.on('data', (m) => { out.msgs.push(m); out.events.push(['data', Date.now()]); });
    call.on('error', (e) => { out.err = e; });
    call.on('status', (s) => { out.status = s; resolve(out); });
  }), timeoutMs, 'stream');
}

// A unary call with an empty (raw bytes) request on `rpcPath`, over `target`: a grpc.Client, or a port to
// open a fresh connection to (closed afterwards). Resolves { err, resp, ms }; rejects after timeoutMs.
function bytesUnary(target, rpcPath, { metadata = new grpc.Metadata(), deadlineMs, timeoutMs = deadlineMs ? deadlineMs + 2000 : 5000 } = {}) {
  const own = typeof target === 'number';
  const gc = own ? new grpc.Client(`127.0.0.1:${target}`, grpc.credentials.createInsecure()) : target;
  const callOpts = deadlineMs ? { deadline: Date.now() + deadlineMs } : {};
  return withTimeout(new Promise((resolve) => {
    const t0 = Date.now();
    gc.makeUnaryRequest(rpcPath, (b) => b, (b) => b, Buffer.alloc(0), metadata, callOpts, (err, resp) => {
      if (own) gc.close();
      resolve({ err, resp, ms: Date.now() - t0 });
    });
  }), timeoutMs, `call ${rpcPath}`);
}

// One request from a raw http2 client on its own connection (POST, content-type application/grpc,
// te: trailers, then `headers`), with `body` (default: one empty gRPC message). Resolves with the response
// headers, whether they ended the stream (trailers-only), trailers, data, stream error and RST code, or
// { sessionError }; rejects after timeoutMs.
function rawCall(port, headers, body, timeoutMs = 5000) {
  return withTimeout(new Promise((resolve) => {
    const s = http2.connect(`http://127.0.0.1:${port}`);
    s.on('error', (e) => resolve({ sessionError: e.message }));
    const out = { data: Buffer.alloc(0) };
    const req = s.request({ ':method': 'POST', 'content-type': 'application/grpc', te: 'trailers', ...headers });
    req.on('response', (h, flags) => { out.headers = h; out.headersEndStream = !!(flags & 1); });
    req.on('trailers', (t) => { out.trailers = t; });
    req.on('data', (d) => { out.data = Buffer.concat([out.data, d]); });
    req.on('error', (e) => { out.error = e.message; });
    req.on('close', () => { out.rstCode = req.rstCode; s.close(); resolve(out); });
    req.end(body || Buffer.from([0, 0, 0, 0, 0]));
  }), timeoutMs, 'raw call');
}

function code(e) {
  return e ? e.code : 0;
}

function codeName(n) {
  return Object.keys(grpc.status).find((k) => grpc.status[k] === n) || String(n);
}

async function waitFor(fn, ms, step = 100) {
  const t0 = Date.now();
  while (Date.now() - t0 < ms) {
    if (await fn()) return true;
    await sleep(step);
  }
  return false;
}

// Port-in-use guard so we never clash with other work.
async function portFree(port) {
  return !(await tcpProbe(port));
}

// Throws unless every port is free.
async function requirePortsFree(ports) {
  for (const p of ports) if (!(await portFree(p))) throw new Error(`port ${p} busy`);
}

module.exports = {
  grpc, proto, EchoClient, HealthClient, sleep, record, check, info, summary, finish, run, withTimeout,
  startBackend, gateConfig, startProxy, stopProxy, stopAllProxies, proxyLog, metrics, scrape, parseMetrics,
  metricValue, healthyIs, client, unary, collect, bytesUnary, rawCall, code, codeName, waitFor, httpGet,
  portFree, requirePortsFree, tcpProbe, RUN_DIR, BIN,
};
