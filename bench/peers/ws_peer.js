// Peer: the room protocol on Node's `ws`, serializing each broadcast once and looping over the members.
// Usage: node ws_peer.js PORT
'use strict';
const crypto = require('crypto');
const WebSocket = require('ws');

const port = Number(process.argv[2]);
const rooms = new Map(); // name -> {members: Set, seq}
const send = (ws, event) => ws.send(JSON.stringify(event));

const server = new WebSocket.Server({ host: '127.0.0.1', port, perMessageDeflate: false, maxPayload: 1 << 20 });
server.on('connection', (ws) => {
  const id = crypto.randomBytes(16).toString('base64url');
  const joined = new Set();
  send(ws, { type: 'welcome', id });
  ws.on('message', (data, isBinary) => {
    let message;
    try { message = JSON.parse(data); } catch (e) { return send(ws, { type: 'error', code: 'invalid_json', message: 'the message is not valid JSON' }); }
    if (message === null || typeof message !== 'object') return send(ws, { type: 'error', code: 'invalid_message', message: 'a message must be a JSON object' });
    const name = message.room;
    if (typeof name !== 'string' || name.length < 1 || name.length > 64) return send(ws, { type: 'error', code: 'invalid_message', message: 'bad room' });
    if (message.type === 'join') {
      let room = rooms.get(name);
      if (!room) rooms.set(name, room = { members: new Set(), seq: 0 });
      room.members.add(ws);
      joined.add(name);
      return send(ws, { type: 'joined', room: name, size: room.members.size });
    }
    if (message.type === 'chat') {
      const room = rooms.get(name);
      if (typeof message.text !== 'string') return send(ws, { type: 'error', code: 'invalid_message', message: 'bad text' });
      if (!room || !room.members.has(ws)) return send(ws, { type: 'error', code: 'not_in_room', message: 'join first' });
      room.seq += 1;
      const payload = JSON.stringify({ type: 'chat', room: name, from: id, text: message.text, seq: room.seq });
      for (const member of room.members) member.send(payload);
      return undefined;
    }
    return send(ws, { type: 'error', code: 'unknown_type', message: 'unknown message type' });
  });
  ws.on('close', () => {
    for (const name of joined) {
      const room = rooms.get(name);
      if (room) { room.members.delete(ws); if (room.members.size === 0) rooms.delete(name); }
    }
  });
});
server.on('listening', () => console.log(`listening ${port}`));
