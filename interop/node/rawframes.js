// A minimal frame-level HTTP/2 server for upstream misbehaviour that Node's http2 module cannot produce
// (e.g. RST_STREAM in the middle of a response body, GOAWAY with an error code and the socket left open).
// Each new stream takes the next function from `scripts` (called as fn(api, streamId)).
'use strict';
const net = require('net');

const PREFACE = Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n');

function frame(type, flags, streamId, payload = Buffer.alloc(0)) {
  const h = Buffer.alloc(9);
  h.writeUIntBE(payload.length, 0, 3);
  h[3] = type; h[4] = flags; h.writeUInt32BE(streamId & 0x7fffffff, 5);
  return Buffer.concat([h, payload]);
}
function lit(name, value) { // literal header field without indexing, new name, no huffman (short strings only)
  return Buffer.concat([Buffer.from([0x00, name.length]), Buffer.from(name), Buffer.from([value.length]), Buffer.from(value)]);
}
const RESP_HEADERS = Buffer.concat([Buffer.from([0x88]), Buffer.from([0x0f, 0x10, 16]), Buffer.from('application/grpc')]);

function startRawFrames(port, scripts) {
  const state = { streams: [], sockets: new Set() };
  let next = 0;
  const server = net.createServer((sock) => {
    state.sockets.add(sock);
    sock.on('close', () => state.sockets.delete(sock));
    sock.on('error', () => {});
    let buf = Buffer.alloc(0);
    let gotPreface = false;
    sock.write(frame(4, 0, 0)); // SETTINGS
    const api = {
      headers: (sid, end = false) => sock.write(frame(1, 0x4 | (end ? 1 : 0), sid, RESP_HEADERS)),
      data: (sid, payload, end = false) => sock.write(frame(0, end ? 1 : 0, sid, payload)),
      trailers: (sid, status) => sock.write(frame(1, 0x5, sid, lit('grpc-status', String(status)))),
      rst: (sid, code) => { const p = Buffer.alloc(4); p.writeUInt32BE(code); sock.write(frame(3, 0, sid, p)); },
      goaway: (last, code) => { const p = Buffer.alloc(8); p.writeUInt32BE(last, 0); p.writeUInt32BE(code, 4); sock.write(frame(7, 0, 0, p)); },
      close: () => sock.end(),
      destroy: () => sock.destroy(),
    };
    sock.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      if (!gotPreface) {
        if (buf.length < PREFACE.length) return;
        buf = buf.subarray(PREFACE.length);
        gotPreface = true;
      }
      while (buf.length >= 9) {
        const len = buf.readUIntBE(0, 3);
        if (buf.length < 9 + len) break;
        const type = buf[3], flags = buf[4], sid = buf.readUInt32BE(5) & 0x7fffffff;
        const payload = buf.subarray(9, 9 + len);
        buf = buf.subarray(9 + len);
        if (type === 4 && !(flags & 1)) sock.write(frame(4, 1, 0));            // SETTINGS -> ACK
        else if (type === 6 && !(flags & 1)) sock.write(frame(6, 1, 0, payload)); // PING -> ACK
        else if (type === 1) {                                                 // HEADERS: new stream
          const fn = scripts[Math.min(next, scripts.length - 1)];
          next++;
          state.streams.push(sid);
          setImmediate(() => fn(api, sid));
        }
      }
    });
  });
  return new Promise((res) => server.listen(port, '127.0.0.1', () => res({ server, state, stop: () => { for (const s of state.sockets) s.destroy(); server.close(); } })));
}

module.exports = { startRawFrames };
