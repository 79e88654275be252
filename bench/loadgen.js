#!/usr/bin/env node
// The load generator of roomserver's benchmark: one Node process driving many `ws` client connections.
//
// It speaks the room protocol of docs/protocol.md (welcome, join, chat with seq) against any server given by
// --url, and measures that server from the outside: its CPU time (utime + stime from /proc/<pid>/stat, read
// just before the measured phase starts and just after its last delivery) and its resident memory
// (VmRSS from /proc/<pid>/status). Its own CPU time is reported too, so a reader can see whether the load
// generator, which shares the machine's cores with the server, was the limit.
//
// A server of several processes (`--workers N`): `pids` lists them all; the CPU figures are summed over them
// and each one's CPU time is reported too (`server_cpu_s_by_pid`). `watch_pids` ({name: pid}) names other
// processes whose CPU time is reported over the same window (`watch_cpu_s`, `watch_cpu_pct`), e.g. Redis.
//
// Usage: node loadgen.js '<json config>'  ->  prints one JSON object (the figures) on stdout.
//   config: {url, pid, scenario: "fanout" | "rate" | "connect" | "rooms" | "storm", ...scenario parameters}
//
// Every chat text is exactly `size` bytes: a 16-digit send timestamp (microseconds since this process
// started), a 7-digit sender index, then padding. Receivers slice the timestamp out of the raw frame without
// JSON-parsing it (so the generator stays cheap) and record now - timestamp as the delivery's latency. Each
// delivery's seq is checked to be the previous one of that room plus one, so a lost, duplicated or reordered
// message is an error in the output, never a silently better number.
'use strict';

const fs = require('fs');
const WebSocket = require('ws');

const config = JSON.parse(process.argv[2] || '{}');
const CLK_TCK = config.clk_tck || 100;
const TEXT_MARK = Buffer.from('"text":"');
const SEQ_MARK = Buffer.from('"seq":');
const T0 = process.hrtime.bigint();

function nowUs() {
  return Number((process.hrtime.bigint() - T0) / 1000n);
}

function statFields(pid) {
  // Fields after the command name (which may hold spaces and parentheses): utime and stime are 14th and 15th.
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
}

function serverCpuSeconds(pid) {
  const fields = statFields(pid);
  return (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
}

// The kernel's part of a process's CPU time (stime): system calls and, on loopback, the receiving side's TCP
// work the kernel does in the sender's context. What no user-space optimization can remove.
function serverSysSeconds(pid) {
  return Number(statFields(pid)[12]) / CLK_TCK;
}

// Time the process's main thread spent waiting for a core on the run queue (/proc/<pid>/schedstat, second
// field, ns): with the CPU time it tells "busy but starved by other processes" from "idle".
function runQueueWaitSeconds(pid) {
  try {
    return Number(fs.readFileSync(`/proc/${pid}/schedstat`, 'latin1').split(' ')[1]) / 1e9;
  } catch (err) {
    return NaN;
  }
}

// VmRSS (resident now) or VmHWM (the peak over the process's life).
function serverRssKiB(pid, field = 'VmRSS') {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'latin1');
  const match = new RegExp(`${field}:\\s+(\\d+) kB`).exec(status);
  return match ? Number(match[1]) : NaN;
}

function ownCpuSeconds() {
  const usage = process.cpuUsage();
  return (usage.user + usage.system) / 1e6;
}

function percentile(values, count, p) {
  if (count === 0) return NaN;
  const sorted = values.subarray(0, count).sort();
  return sorted[Math.min(count - 1, Math.floor((p / 100) * count))];
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function chatText(senderIndex, size) {
  const head = String(nowUs()).padStart(16, '0') + String(senderIndex).padStart(7, '0');
  return head + 'x'.repeat(Math.max(0, size - head.length));
}

class Member {
  constructor(index, ws) {
    this.index = index;
    this.ws = ws;
    this.id = null;
    this.onchat = null; // set once joined: (member, timestampUs, senderIndex, seq) per delivery
    this.pending = null; // resolves the next non-chat reply
  }

  request(message) {
    return new Promise((resolve, reject) => {
      this.pending = { resolve, reject };
      this.ws.send(JSON.stringify(message));
    });
  }
}

function connect(url, index, timeoutMs) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { perMessageDeflate: false, handshakeTimeout: timeoutMs });
    const member = new Member(index, ws);
    const timer = setTimeout(() => reject(new Error(`member ${index}: no welcome within ${timeoutMs} ms`)), timeoutMs);
    ws.on('message', (data) => {
      // Fast path for chat deliveries: no JSON parsing, only the fields the benchmark needs.
      if (member.onchat !== null && data[9] === 0x63 /* c of {"type":"chat" */) {
        const at = data.indexOf(TEXT_MARK);
        const seqAt = data.lastIndexOf(SEQ_MARK);
        if (at >= 0 && seqAt >= 0) {
          const sent = Number(data.toString('latin1', at + 8, at + 24));
          const sender = Number(data.toString('latin1', at + 24, at + 31));
          const seq = parseInt(data.toString('latin1', seqAt + 6, seqAt + 22), 10);
          member.onchat(member, sent, sender, seq);
          return;
        }
      }
      const message = JSON.parse(data.toString('utf8'));
      if (message.type === 'chat' && member.onchat !== null) {
        // Slow path, for servers whose JSON is not compact: same fields, parsed properly.
        member.onchat(member, Number(message.text.slice(0, 16)), Number(message.text.slice(16, 23)), message.seq);
      } else if (message.type === 'welcome') {
        member.id = message.id;
        clearTimeout(timer);
        resolve(member);
      } else if (member.pending !== null) {
        const pending = member.pending;
        member.pending = null;
        if (message.type === 'error') pending.reject(new Error(`member ${index}: ${data}`));
        else pending.resolve(message);
      }
    });
    ws.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

async function connectAll(count, concurrency, setup) {
  const members = new Array(count);
  let next = 0;
  async function worker() {
    while (next < count) {
      const index = next++;
      const member = await connect(config.url, index, config.timeout_ms || 10000);
      if (setup) await setup(member);
      members[index] = member;
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, count) }, worker));
  return members;
}

async function closeAll(members) {
  for (const member of members) if (member) member.ws.terminate();
  await sleep(50);
}

// Deliveries of chat messages to members, with latency samples and per-room sequence checks.
class Tally {
  constructor(expected) {
    this.expected = expected;
    this.count = 0;
    this.latencies = new Float64Array(expected);
    this.errors = 0;
    this.firstError = null;
    this.lastSeq = new Map(); // member index -> last seq seen (one room per member)
    this.done = null;
    this.finished = new Promise((resolve) => { this.done = resolve; });
  }

  deliver(member, sent, seq) {
    const last = this.lastSeq.get(member.index);
    if (last !== undefined && seq !== last + 1 && this.errors++ === 0) {
      this.firstError = `member ${member.index}: seq ${seq} after ${last}`;
    }
    this.lastSeq.set(member.index, seq);
    if (this.count < this.expected) this.latencies[this.count] = (nowUs() - sent) / 1000;
    this.count += 1;
    if (this.count === this.expected) this.done();
  }
}

function serverPids() {
  return config.pids && config.pids.length ? config.pids : [config.pid];
}

function cpuOf(pids) {
  return pids.map((pid) => serverCpuSeconds(pid));
}

function waitOf(pids) {
  return pids.map((pid) => runQueueWaitSeconds(pid));
}

function measureStart() {
  const watch = config.watch_pids || {};
  return {
    wall: nowUs(), server: cpuOf(serverPids()), sys: serverPids().map(serverSysSeconds), own: ownCpuSeconds(),
    watch: Object.fromEntries(Object.entries(watch).map(([name, pid]) => [name, serverCpuSeconds(pid)])),
    wait: waitOf(serverPids()), ownWait: runQueueWaitSeconds(process.pid),
    watchWait: Object.fromEntries(Object.entries(watch).map(([name, pid]) => [name, runQueueWaitSeconds(pid)])),
  };
}

// With --ready_file (bench/profile.py), say "set-up done" and give a profiler time to attach before measuring.
async function phaseReady() {
  if (!config.ready_file) return;
  fs.writeFileSync(config.ready_file, 'ready\n');
  await sleep(config.ready_pause_ms || 1500);
}

function measureEnd(start, deliveries, tally) {
  const elapsed = (nowUs() - start.wall) / 1e6;
  const pids = serverPids();
  const perPid = cpuOf(pids).map((seconds, i) => seconds - start.server[i]);
  const serverCpu = perPid.reduce((sum, seconds) => sum + seconds, 0);
  const serverSys = pids.map(serverSysSeconds).reduce((sum, seconds, i) => sum + seconds - start.sys[i], 0);
  const ownCpu = ownCpuSeconds() - start.own;
  const watch = Object.fromEntries(Object.entries(config.watch_pids || {}).map(
    ([name, pid]) => [name, serverCpuSeconds(pid) - start.watch[name]]));
  const result = {
    deliveries,
    elapsed_s: elapsed,
    deliveries_per_s: deliveries / elapsed,
    server_cpu_s: serverCpu,
    cpu_us_per_delivery: deliveries ? (serverCpu * 1e6) / deliveries : NaN,
    sys_us_per_delivery: deliveries ? (serverSys * 1e6) / deliveries : NaN,
    server_cpu_pct: (100 * serverCpu) / elapsed,
    loadgen_cpu_pct: (100 * ownCpu) / elapsed,
  };
  if (config.pids) {
    result.server_cpu_s_by_pid = Object.fromEntries(pids.map((pid, i) => [pid, perPid[i]]));
    const waits = waitOf(pids);
    result.server_wait_s_by_pid = Object.fromEntries(pids.map((pid, i) => [pid, waits[i] - start.wait[i]]));
    result.loadgen_wait_s = runQueueWaitSeconds(process.pid) - start.ownWait;
  }
  if (config.watch_pids) {
    result.watch_cpu_s = watch;
    result.watch_cpu_pct = Object.fromEntries(Object.entries(watch).map(([name, s]) => [name, (100 * s) / elapsed]));
    result.watch_wait_s = Object.fromEntries(Object.entries(config.watch_pids).map(
      ([name, pid]) => [name, runQueueWaitSeconds(pid) - start.watchWait[name]]));
  }
  if (tally) {
    result.p50_ms = percentile(tally.latencies, Math.min(tally.count, tally.expected), 50);
    result.p99_ms = percentile(tally.latencies, Math.min(tally.count, tally.expected), 99);
    result.errors = tally.errors + (tally.count === tally.expected ? 0 : 1);
    if (tally.firstError) result.first_error = tally.firstError;
    if (tally.count !== tally.expected) result.missing = tally.expected - tally.count;
  }
  return result;
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((resolve) => { timer = setTimeout(() => resolve('timeout'), ms); });
  return Promise.race([promise.then(() => 'ok'), timeout]).then((outcome) => {
    clearTimeout(timer);
    if (outcome === 'timeout') process.stderr.write(`loadgen: ${what} timed out after ${ms} ms\n`);
    return outcome;
  });
}

// One room of `members`; member 0 publishes `messages` chats, keeping at most `window` of its own in flight
// (a message is in flight until its sender receives it back), so the server is kept busy but never flooded.
// With `window_scope: "all"` a message is in flight until EVERY member received it: what bench/workers.py
// uses, since with several server processes the sender's copy comes from its own process and says nothing
// about how far behind the other processes are (nothing else slows the publisher down to them).
async function fanout() {
  const { members: count, messages, window = 16, size = 100, concurrency = 64 } = config;
  const untilAll = config.window_scope === 'all';
  const received = new Map(); // seq -> members that received it (window_scope "all")
  const room = config.room || 'bench';
  const members = await connectAll(count, concurrency, (m) => m.request({ type: 'join', room }));
  const tally = new Tally(count * messages);
  const publisher = members[0];
  let sent = 0;
  const publish = () => {
    sent += 1;
    publisher.ws.send(`{"type":"chat","room":"${room}","text":"${chatText(0, size)}"}`);
  };
  for (const member of members) {
    member.onchat = untilAll
      ? (m, ts, sender, seq) => {
        tally.deliver(m, ts, seq);
        const got = (received.get(seq) || 0) + 1;
        if (got < count) {
          received.set(seq, got);
        } else {
          received.delete(seq);
          if (sent < messages) publish();
        }
      }
      : (m, ts, sender, seq) => {
        tally.deliver(m, ts, seq);
        if (m === publisher && sent < messages) publish();
      };
  }
  await sleep(200); // let the joins settle before measuring
  await phaseReady();
  const start = measureStart();
  for (let i = 0; i < Math.min(window, messages); i++) publish();
  await withTimeout(tally.finished, config.timeout_ms || 120000, 'fanout');
  const result = measureEnd(start, tally.count, tally);
  result.members = count;
  result.messages = messages;
  await closeAll(members);
  return result;
}

// One room of `members`; member 0 publishes at a fixed `rate` (messages/s) for `duration` seconds.
async function rate() {
  const { members: count, rate: perSecond, duration, size = 100, concurrency = 64 } = config;
  const room = config.room || 'bench';
  const messages = Math.round(perSecond * duration);
  const members = await connectAll(count, concurrency, (m) => m.request({ type: 'join', room }));
  const tally = new Tally(count * messages);
  for (const member of members) member.onchat = (m, ts, sender, seq) => tally.deliver(m, ts, seq);
  await sleep(200);
  await phaseReady();
  const start = measureStart();
  let sent = 0;
  const publisher = members[0];
  const ticker = setInterval(() => {
    const due = Math.min(messages, Math.floor(((nowUs() - start.wall) / 1e6) * perSecond) + 1);
    while (sent < due) {
      sent += 1;
      publisher.ws.send(`{"type":"chat","room":"${room}","text":"${chatText(0, size)}"}`);
    }
    if (sent >= messages) clearInterval(ticker);
  }, 2);
  await withTimeout(tally.finished, (duration * 1000) + (config.timeout_ms || 30000), 'rate');
  clearInterval(ticker);
  const result = measureEnd(start, tally.count, tally);
  result.members = count;
  result.rate = perSecond;
  await closeAll(members);
  return result;
}

// Opens `connections` connections, `concurrency` at a time; each counts once the server's welcome arrived.
async function connectRate() {
  const { connections, concurrency = 64 } = config;
  await phaseReady();
  const start = measureStart();
  const members = await connectAll(connections, concurrency, null);
  const result = measureEnd(start, 0, null);
  result.connections = connections;
  result.connections_per_s = connections / result.elapsed_s;
  result.cpu_us_per_connection = (result.server_cpu_s * 1e6) / connections;
  delete result.deliveries;
  delete result.deliveries_per_s;
  delete result.cpu_us_per_delivery;
  delete result.sys_us_per_delivery;
  await closeAll(members);
  return result;
}

// `rooms` rooms of `size_per_room` members each (every connection in one room): first the idle memory of all
// those joined connections (RSS delta over the server's RSS before the first connection), then `messages`
// chats from random publishers to their own room, at most `window` in flight.
async function rooms() {
  const { rooms: roomCount, room_size: roomSize, messages, window = 16, size = 100, concurrency = 64 } = config;
  const count = roomCount * roomSize;
  await sleep(200);
  const rssBefore = serverRssKiB(config.pid);
  const connectStart = measureStart();
  const members = await connectAll(count, concurrency, (m) => m.request({ type: 'join', room: `r${m.index % roomCount}` }));
  const connectEnd = measureEnd(connectStart, 0, null);
  await sleep(config.settle_ms || 1000);
  const rssAfter = serverRssKiB(config.pid);
  const tally = new Tally(messages * roomSize);
  let sent = 0;
  let seed = 12345;
  const random = (n) => {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    return seed % n;
  };
  const publish = () => {
    sent += 1;
    const sender = members[random(count)];
    sender.ws.send(`{"type":"chat","room":"r${sender.index % roomCount}","text":"${chatText(sender.index, size)}"}`);
  };
  for (const member of members) {
    member.onchat = (m, ts, sender, seq) => {
      tally.deliver(m, ts, seq);
      if (sender === m.index && sent < messages) publish();
    };
  }
  await phaseReady();
  const start = measureStart();
  for (let i = 0; i < Math.min(window, messages); i++) publish();
  await withTimeout(tally.finished, config.timeout_ms || 120000, 'rooms');
  const result = measureEnd(start, tally.count, tally);
  result.connections = count;
  result.rooms = roomCount;
  result.idle_rss_before_kib = rssBefore;
  result.idle_rss_after_kib = rssAfter;
  result.idle_kib_per_connection = (rssAfter - rssBefore) / count;
  result.connect_s = connectEnd.elapsed_s;
  result.connections_per_s = count / connectEnd.elapsed_s;
  await closeAll(members);
  return result;
}

// A reconnect storm: `connections` clients opened in the same tick, each counted once the server's welcome
// arrived, or failed (refused, reset, no welcome within `timeout_ms`). How long the storm took to be served
// (time to welcome: p50, p99, last), the failures, the server's CPU per connection, and its peak RSS (VmHWM: a
// fresh server process per run, so the storm's peak) against its RSS once the storm settled, connections open.
async function storm() {
  const { connections, timeout_ms: timeoutMs = 60000 } = config;
  await phaseReady();
  const start = measureStart();
  const waits = new Float64Array(connections);
  const members = [];
  let failed = 0;
  let firstError = null;
  await Promise.all(Array.from({ length: connections }, (_, index) => connect(config.url, index, timeoutMs).then(
    (member) => {
      waits[members.length] = (nowUs() - start.wall) / 1000;
      members.push(member);
    },
    (err) => {
      failed += 1;
      if (firstError === null) firstError = String(err && err.message);
    },
  )));
  const result = measureEnd(start, 0, null);
  result.connections = connections;
  result.served = members.length;
  result.failed = failed;
  result.first_error = firstError;
  result.welcome_p50_s = percentile(waits, members.length, 50) / 1000;
  result.welcome_p99_s = percentile(waits, members.length, 99) / 1000;
  result.welcome_last_s = percentile(waits, members.length, 100) / 1000;
  result.cpu_us_per_connection = (result.server_cpu_s * 1e6) / Math.max(1, members.length);
  delete result.deliveries;
  delete result.deliveries_per_s;
  delete result.cpu_us_per_delivery;
  delete result.sys_us_per_delivery;
  await sleep(config.settle_ms || 1000);
  result.rss_settled_kib = serverRssKiB(config.pid);
  result.rss_peak_kib = serverRssKiB(config.pid, 'VmHWM');
  result.rss_peak_over_settled = result.rss_peak_kib / result.rss_settled_kib;
  await closeAll(members);
  return result;
}

const SCENARIOS = { fanout, rate, connect: connectRate, rooms, storm };

async function main() {
  const scenario = SCENARIOS[config.scenario];
  if (!scenario) throw new Error(`unknown scenario ${config.scenario}`);
  const result = await scenario();
  result.scenario = config.scenario;
  process.stdout.write(`${JSON.stringify(result)}\n`);
  process.exit(0);
}

main().catch((err) => {
  process.stdout.write(`${JSON.stringify({ scenario: config.scenario, fatal: String(err && err.stack || err) })}\n`);
  process.exit(1);
});
