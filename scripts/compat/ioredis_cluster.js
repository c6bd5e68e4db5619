#!/usr/bin/env node
// A scripted session with ioredis's Cluster against a Redis Cluster endpoint: every command
// of the KN string/keyspace/transaction/introspection surface at least once, each reply
// asserted; SCAN of the whole cluster through every master's scanStream, MULTI/EXEC with a
// WATCH conflict provoked from a second client, INCR from 8 concurrent clients (exact total),
// a SET EX 1 key observed gone. Stops at the first failure (exit 1); with --keep-going runs
// every step and lists all failures (still exit 1).
//
// Usage: node ioredis_cluster.js HOST PORT PASSWORD_FILE [--keep-going] [--incr-n N]
// The session starts with FLUSHALL: run it against a test cluster only.
'use strict';

const fs = require('fs');
const Redis = require('ioredis');
const ioredisVersion = require('ioredis/package.json').version;

const P = 'compat:js:';

class Failure extends Error {}

function check(cond, what) {
  if (!cond) throw new Failure(what);
}
function same(a, b) {
  return JSON.stringify(a) === JSON.stringify(b);
}
function eq(got, want, what) {
  if (!same(got, want)) {
    throw new Failure(`${what}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
  }
}
function inRange(got, lo, hi, what) {
  if (typeof got !== 'number' || got < lo || got > hi) {
    throw new Failure(`${what}: got ${JSON.stringify(got)}, want a value in [${lo}, ${hi}]`);
  }
}
async function rejects(promise, text, what) {
  let r;
  try {
    r = await promise;
  } catch (e) {
    if (!String(e.message).toLowerCase().includes(text.toLowerCase())) {
      throw new Failure(`${what}: error ${JSON.stringify(e.message)} does not say ${JSON.stringify(text)}`);
    }
    return;
  }
  throw new Failure(`${what}: answered ${JSON.stringify(r)}, want an error saying ${JSON.stringify(text)}`);
}
const sleep = (ms) => new Promise((res) => setTimeout(res, ms));
const nowS = () => Math.floor(Date.now() / 1000);

function parseArgs(argv) {
  const pos = [];
  const opts = { keepGoing: false, incrN: 500 };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--keep-going') opts.keepGoing = true;
    else if (argv[i] === '--incr-n') opts.incrN = parseInt(argv[++i], 10);
    else pos.push(argv[i]);
  }
  if (pos.length !== 3 || !(opts.incrN > 0)) {
    console.error('usage: node ioredis_cluster.js HOST PORT PASSWORD_FILE [--keep-going] [--incr-n N]');
    process.exit(2);
  }
  return { host: pos[0], port: parseInt(pos[1], 10), passwordFile: pos[2], ...opts };
}

// INFO text -> {field: value}
function infoFields(text) {
  const out = {};
  for (const line of String(text).split(/\r?\n/)) {
    const i = line.indexOf(':');
    if (i > 0 && !line.startsWith('#')) out[line.slice(0, i)] = line.slice(i + 1);
  }
  return out;
}

class Session {
  constructor(args) {
    this.args = args;
    this.password = fs.readFileSync(args.passwordFile, 'utf8').trim();
    this.exercised = [];
    this.failures = [];
    this.skipped = [];
    this.steps = 0;
    this.extra = [];
  }

  client() {
    const c = new Redis.Cluster([{ host: this.args.host, port: this.args.port }], {
      redisOptions: { password: this.password, connectTimeout: 10000, commandTimeout: 10000 },
      slotsRefreshTimeout: 5000,
      clusterRetryStrategy: (times) => (times > 5 ? null : 200),
    });
    c.on('error', () => {}); // failures surface as rejected commands
    return c;
  }

  masters() {
    return this.rc.nodes('master');
  }

  // The node (one connection) that owns a key's slot, from CLUSTER SLOTS.
  async ownerOf(key) {
    const slot = await this.rc.cluster('KEYSLOT', key);
    const slots = await this.rc.cluster('SLOTS');
    const r = slots.find(([b, e]) => b <= slot && slot <= e);
    check(r, `CLUSTER SLOTS covers slot ${slot}`);
    const [host, port] = r[2];
    const node = this.masters().find((n) => n.options.port === port);
    check(node, `a master connection for ${host}:${port}`);
    return { node, host, port, slot };
  }

  async sumMasters(fn) {
    const rs = await Promise.all(this.masters().map(fn));
    return rs.reduce((a, b) => a + b, 0);
  }

  async step(name, commands, fn, minVersion) {
    // A step that needs a newer Redis than the server reports is skipped, except on a
    // DINOMO KN (INFO server has dinomo_version), which serves it whatever it reports.
    if (minVersion && this.version < minVersion && !this.isDinomo) {
      this.skipped.push(`${name} (the server reports redis_version ${this.versionText})`);
      console.log(`skip ${name}: the server reports redis_version ${this.versionText}`);
      return;
    }
    this.steps++;
    try {
      await fn.call(this);
    } catch (e) {
      const detail = e instanceof Failure ? e.message : `${e.name}: ${e.message}`;
      const msg = `[${name}] (${commands.join(' ')}) ${detail}`;
      this.failures.push(msg);
      console.error(`FAIL ${msg}`);
      if (!(e instanceof Failure)) console.error(e.stack.split('\n').slice(0, 4).join('\n'));
      if (!this.args.keepGoing) {
        await this.finish();
        process.exit(1);
      }
      return;
    }
    for (const c of commands) if (!this.exercised.includes(c)) this.exercised.push(c);
    console.log(`ok   ${name}`);
  }

  summary() {
    console.log(
      `ioredis ${ioredisVersion} Cluster: ${this.exercised.length} commands exercised in ` +
        `${this.steps - this.failures.length}/${this.steps} passing steps: ${this.exercised.join(' ')}`,
    );
    for (const s of this.skipped) console.log(`skipped: ${s}`);
    if (this.failures.length) {
      console.error(`${this.failures.length} step(s) failed:`);
      for (const f of this.failures) console.error(`  ${f}`);
    }
  }

  async finish() {
    this.summary();
    for (const c of [this.rc, ...this.extra]) c.disconnect();
  }

  // ---- steps -------------------------------------------------------------------------

  async start() {
    const rc = this.rc;
    eq(await rc.ping(), 'PONG', 'PING');
    check(this.masters().length >= 3, `three masters known: ${this.masters().length}`);
    for (const n of this.masters()) eq(await n.flushall(), 'OK', `FLUSHALL on ${n.options.port}`);
    eq(await this.sumMasters((n) => n.dbsize()), 0, 'DBSIZE summed over the masters after FLUSHALL');
  }

  async setGet() {
    const rc = this.rc;
    const k = P + 's';
    eq(await rc.set(k, 'v1'), 'OK', 'SET');
    eq(await rc.get(k), 'v1', 'GET');
    eq(await rc.get(P + 'missing'), null, 'GET of a missing key');
    eq(await rc.set(k, 'v2', 'NX'), null, 'SET NX on an existing key');
    eq(await rc.set(P + 's-xx', 'x', 'XX'), null, 'SET XX on a missing key');
    eq(await rc.exists(P + 's-xx'), 0, 'EXISTS after a refused SET XX');
    eq(await rc.set(k, 'v3', 'XX'), 'OK', 'SET XX on an existing key');
    eq(await rc.set(k, 'v4', 'GET'), 'v3', 'SET GET returns the old value');
    eq(await rc.ttl(k), -1, 'TTL of a key without expiry');
    eq(await rc.set(k, 'v5', 'EX', 100), 'OK', 'SET EX');
    inRange(await rc.ttl(k), 95, 100, 'TTL after SET EX 100');
    eq(await rc.set(k, 'v6', 'PX', 100000), 'OK', 'SET PX');
    inRange(await rc.pttl(k), 95000, 100000, 'PTTL after SET PX 100000');
    eq(await rc.set(k, 'v7', 'EXAT', nowS() + 100), 'OK', 'SET EXAT');
    inRange(await rc.ttl(k), 95, 100, 'TTL after SET EXAT now+100');
    eq(await rc.set(k, 'v8', 'PXAT', Date.now() + 100000), 'OK', 'SET PXAT');
    inRange(await rc.pttl(k), 95000, 100000, 'PTTL after SET PXAT now+100000ms');
    eq(await rc.set(k, 'v9', 'KEEPTTL'), 'OK', 'SET KEEPTTL');
    inRange(await rc.pttl(k), 90000, 100000, 'PTTL kept by SET KEEPTTL');
    eq(await rc.set(k, 'v10'), 'OK', 'SET without KEEPTTL');
    eq(await rc.ttl(k), -1, 'TTL after a plain SET');
    eq(await rc.set(k, 'v11', 'EX', 50, 'XX', 'GET'), 'v10', 'SET EX XX GET');
    inRange(await rc.ttl(k), 45, 50, 'TTL after SET EX 50 XX GET');
    await rejects(rc.set(k, 'x', 'EX', 0), 'invalid expire', 'SET EX 0');
    await rejects(rc.set(k, 'x', 'NX', 'XX'), 'syntax error', 'SET NX XX');
  }

  async setnxSetex() {
    const rc = this.rc;
    eq(await rc.setnx(P + 'nx', 'a'), 1, 'SETNX on a missing key');
    eq(await rc.setnx(P + 'nx', 'b'), 0, 'SETNX on an existing key');
    eq(await rc.get(P + 'nx'), 'a', 'GET after SETNX');
    eq(await rc.setex(P + 'ex', 100, 'e'), 'OK', 'SETEX');
    inRange(await rc.ttl(P + 'ex'), 95, 100, 'TTL after SETEX 100');
    eq(await rc.psetex(P + 'pex', 100000, 'p'), 'OK', 'PSETEX');
    eq(await rc.get(P + 'pex'), 'p', 'GET after PSETEX');
    inRange(await rc.pttl(P + 'pex'), 95000, 100000, 'PTTL after PSETEX 100000');
  }

  async getexGetdelGetset() {
    const rc = this.rc;
    const k = P + 'gx';
    await rc.set(k, 'g');
    eq(await rc.getex(k), 'g', 'GETEX without options');
    eq(await rc.getex(k, 'EX', 100), 'g', 'GETEX EX');
    inRange(await rc.ttl(k), 95, 100, 'TTL after GETEX EX 100');
    eq(await rc.getex(k, 'PX', 200000), 'g', 'GETEX PX');
    inRange(await rc.pttl(k), 195000, 200000, 'PTTL after GETEX PX');
    eq(await rc.getex(k, 'EXAT', nowS() + 300), 'g', 'GETEX EXAT');
    inRange(await rc.ttl(k), 295, 300, 'TTL after GETEX EXAT');
    eq(await rc.getex(k, 'PXAT', Date.now() + 400000), 'g', 'GETEX PXAT');
    inRange(await rc.ttl(k), 395, 400, 'TTL after GETEX PXAT');
    eq(await rc.getex(k, 'PERSIST'), 'g', 'GETEX PERSIST');
    eq(await rc.ttl(k), -1, 'TTL after GETEX PERSIST');
    eq(await rc.getset(k, 'h'), 'g', 'GETSET returns the old value');
    eq(await rc.getdel(k), 'h', 'GETDEL returns the value');
    eq(await rc.exists(k), 0, 'EXISTS after GETDEL');
    eq(await rc.getdel(k), null, 'GETDEL of a missing key');
  }

  async msetMget() {
    const rc = this.rc;
    const [a, b, c, d] = ['{js-m}:a', '{js-m}:b', '{js-m}:c', '{js-m}:d'];
    eq(await rc.mset(a, '1', b, '2'), 'OK', 'MSET in one slot');
    eq(await rc.mget(a, b, c), ['1', '2', null], 'MGET in one slot');
    eq(await rc.msetnx(b, 'x', c, '3'), 0, 'MSETNX with one key existing');
    eq(await rc.mget(b, c), ['2', null], 'MGET after a refused MSETNX');
    eq(await rc.msetnx({ [c]: '3', [d]: '4' }), 1, 'MSETNX (object form) with all keys new');
    eq(await rc.mget([a, b, c, d]), ['1', '2', '3', '4'], 'MGET after MSETNX');
    await rejects(rc.mget(P + 'x1', P + 'x2', P + 'x3', P + 'x4'), 'CROSSSLOT', 'MGET across slots');
  }

  async strings() {
    const rc = this.rc;
    const k = P + 'str';
    eq(await rc.append(k, 'Hello'), 5, 'APPEND to a missing key');
    eq(await rc.append(k, ' World'), 11, 'APPEND');
    eq(await rc.strlen(k), 11, 'STRLEN');
    eq(await rc.getrange(k, 0, 4), 'Hello', 'GETRANGE 0 4');
    eq(await rc.getrange(k, -5, -1), 'World', 'GETRANGE -5 -1');
    eq(await rc.setrange(k, 6, 'Redis'), 11, 'SETRANGE');
    eq(await rc.get(k), 'Hello Redis', 'GET after SETRANGE');
    eq(await rc.setrange(P + 'sr', 3, 'ab'), 5, 'SETRANGE past the end of a missing key');
    eq(await rc.get(P + 'sr'), '\x00\x00\x00ab', 'SETRANGE pads with zero bytes');
  }

  async counters() {
    const rc = this.rc;
    const k = P + 'n';
    eq(await rc.incr(k), 1, 'INCR of a missing key');
    eq(await rc.incrby(k, 10), 11, 'INCRBY 10');
    eq(await rc.decr(k), 10, 'DECR');
    eq(await rc.decrby(k, 15), -5, 'DECRBY 15');
    eq(await rc.incrbyfloat(k, '1.5'), '-3.5', 'INCRBYFLOAT 1.5');
    await rc.set(P + 'nan', 'abc');
    await rejects(rc.incr(P + 'nan'), 'not an integer', "INCR of 'abc'");
    await rejects(rc.decrby(P + 'nan', 2), 'not an integer', "DECRBY of 'abc'");
    await rejects(rc.incrbyfloat(P + 'nan', 1), 'not a valid float', "INCRBYFLOAT of 'abc'");
    eq(await rc.get(P + 'nan'), 'abc', 'a refused INCR leaves the value');
  }

  async expiry() {
    const rc = this.rc;
    const k = P + 'e';
    await rc.set(k, 'v');
    eq(await rc.expire(k, 100, 'XX'), 0, 'EXPIRE XX on a key without expiry');
    eq(await rc.expire(k, 100, 'NX'), 1, 'EXPIRE NX on a key without expiry');
    eq(await rc.expire(k, 200, 'NX'), 0, 'EXPIRE NX on a key with an expiry');
    eq(await rc.expire(k, 50, 'GT'), 0, 'EXPIRE GT with a smaller TTL');
    eq(await rc.expire(k, 300, 'GT'), 1, 'EXPIRE GT with a larger TTL');
    eq(await rc.expire(k, 150, 'LT'), 1, 'EXPIRE LT with a smaller TTL');
    inRange(await rc.ttl(k), 145, 150, 'TTL after EXPIRE LT 150');
    eq(await rc.pexpire(k, 200000), 1, 'PEXPIRE');
    inRange(await rc.pttl(k), 195000, 200000, 'PTTL after PEXPIRE');
    const at = nowS() + 500;
    eq(await rc.expireat(k, at), 1, 'EXPIREAT');
    eq(await rc.expiretime(k), at, 'EXPIRETIME after EXPIREAT');
    const atMs = Date.now() + 600000;
    eq(await rc.pexpireat(k, atMs), 1, 'PEXPIREAT');
    eq(await rc.pexpiretime(k), atMs, 'PEXPIRETIME after PEXPIREAT');
    eq(await rc.persist(k), 1, 'PERSIST');
    eq(await rc.ttl(k), -1, 'TTL after PERSIST');
    eq(await rc.pttl(k), -1, 'PTTL after PERSIST');
    eq(await rc.expiretime(k), -1, 'EXPIRETIME without expiry');
    eq(await rc.persist(k), 0, 'PERSIST without expiry');
    eq(await rc.ttl(P + 'missing'), -2, 'TTL of a missing key');
    eq(await rc.pexpiretime(P + 'missing'), -2, 'PEXPIRETIME of a missing key');
  }

  async expireObserved() {
    const rc = this.rc;
    const k = P + 'gone';
    const before = Date.now();
    eq(await rc.set(k, 'v', 'EX', 1), 'OK', 'SET EX 1');
    const t0 = Date.now();
    const got = await rc.get(k);
    const pttl = await rc.pttl(k);
    // Only a client stalled for most of the second could see the key gone already.
    if (Date.now() - before < 800) {
      eq(got, 'v', 'GET right after SET EX 1');
      inRange(pttl, 1, 1000, 'PTTL right after SET EX 1');
    }
    while (Date.now() - t0 < 5000) {
      if ((await rc.get(k)) === null) break;
      await sleep(50);
    }
    const waited = (Date.now() - t0) / 1000;
    eq(await rc.get(k), null, `GET of an EX 1 key after polling ${waited.toFixed(1)} s`);
    eq(await rc.exists(k), 0, 'EXISTS of an expired key');
    eq(await rc.pttl(k), -2, 'PTTL of an expired key');
    check(waited >= 0.5, `the EX 1 key was gone after ${waited.toFixed(2)} s, before its second`);
  }

  async keyspace() {
    const rc = this.rc;
    const [a, b, c] = ['{js-k}:a', '{js-k}:b', '{js-k}:c'];
    await rc.mset(a, '1', b, '2');
    eq(await rc.exists(a, b, c), 2, 'EXISTS of three keys in one slot');
    eq(await rc.touch(a, b, c), 2, 'TOUCH of three keys in one slot');
    eq(await rc.type(a), 'string', 'TYPE of a string');
    eq(await rc.type(c), 'none', 'TYPE of a missing key');
    eq(await rc.del(a, c), 1, 'DEL of an existing and a missing key');
    eq(await rc.unlink(b), 1, 'UNLINK');
    eq(await rc.exists(a, b), 0, 'EXISTS after DEL and UNLINK');
  }

  async renameCopy() {
    const rc = this.rc;
    const [src, dst, oth, cp] = ['{js-r}:src', '{js-r}:dst', '{js-r}:other', '{js-r}:copy'];
    await rc.set(src, 'v', 'EX', 100);
    eq(await rc.rename(src, dst), 'OK', 'RENAME');
    eq(await rc.get(dst), 'v', 'GET of the renamed key');
    inRange(await rc.ttl(dst), 95, 100, 'RENAME keeps the TTL');
    await rejects(rc.rename(src, dst), 'no such key', 'RENAME of a missing key');
    await rc.set(oth, 'o');
    eq(await rc.renamenx(dst, oth), 0, 'RENAMENX onto an existing key');
    eq(await rc.renamenx(dst, src), 1, 'RENAMENX onto a free name');
    eq(await rc.copy(src, cp), 1, 'COPY');
    eq(await rc.get(cp), 'v', 'GET of the copy');
    eq(await rc.copy(src, oth), 0, 'COPY onto an existing key');
    eq(await rc.copy(src, oth, 'REPLACE'), 1, 'COPY REPLACE');
    eq(await rc.get(oth), 'v', 'GET after COPY REPLACE');
  }

  async wrongtype() {
    const rc = this.rc;
    await rc.set(P + 'wt', 's');
    await rejects(rc.lpush(P + 'wt', 'x'), 'WRONGTYPE', 'LPUSH to a string key');
    eq(await rc.get(P + 'wt'), 's', 'the string after a refused LPUSH');
  }

  async scanWhole() {
    const rc = this.rc;
    const n = 300;
    const written = [];
    for (let i = 0; i < n; i++) written.push(`${P}scan:${i}`);
    await Promise.all(written.map((k) => rc.set(k, 'v')));
    const collect = (node, opts) =>
      new Promise((resolve, reject) => {
        const keys = [];
        node
          .scanStream(opts)
          .on('data', (batch) => keys.push(...batch))
          .on('error', reject)
          .on('end', () => resolve(keys));
      });
    const everything = new Set();
    for (const node of this.masters()) for (const k of await collect(node, { count: 100 })) everything.add(k);
    const missing = written.filter((k) => !everything.has(k));
    check(missing.length === 0, `SCAN of every master missed ${missing.length} of ${n} keys, e.g. ${missing.slice(0, 3)}`);
    const total = await this.sumMasters((node) => node.dbsize());
    eq(everything.size, total, 'distinct keys from SCAN vs DBSIZE summed over the masters');
    const matched = [];
    for (const node of this.masters()) matched.push(...(await collect(node, { match: P + 'scan:*', count: 50 })));
    eq(new Set(matched).size, n, 'SCAN MATCH COUNT 50 over the masters');
    const typed = [];
    for (const node of this.masters()) typed.push(...(await collect(node, { match: P + 'scan:*', type: 'string' })));
    eq(new Set(typed).size, n, 'SCAN MATCH TYPE string');
    const lists = [];
    for (const node of this.masters()) lists.push(...(await collect(node, { match: P + 'scan:*', type: 'list' })));
    eq(lists, [], 'SCAN TYPE list');
    let keys = [];
    for (const node of this.masters()) keys = keys.concat(await node.keys(P + 'scan:*'));
    eq(keys.length, n, 'KEYS pattern over the masters');
    eq(new Set(keys).size, n, 'KEYS returns each key once');
    const node = this.masters()[0];
    const rk = await node.randomkey();
    check(everything.has(rk), `RANDOMKEY answered ${JSON.stringify(rk)}, not a key that exists`);
  }

  async clusterCmds() {
    const rc = this.rc;
    const info = infoFields(await rc.cluster('INFO'));
    eq(info.cluster_state, 'ok', 'CLUSTER INFO cluster_state');
    eq(info.cluster_slots_assigned, '16384', 'CLUSTER INFO cluster_slots_assigned');
    const slots = await rc.cluster('SLOTS');
    eq(slots.reduce((a, [b, e]) => a + e - b + 1, 0), 16384, 'CLUSTER SLOTS covers every slot');
    const shards = await rc.cluster('SHARDS');
    let covered = 0;
    for (const s of shards) {
      const f = {};
      for (let i = 0; i < s.length; i += 2) f[s[i]] = s[i + 1];
      for (let i = 0; i < f.slots.length; i += 2) covered += Number(f.slots[i + 1]) - Number(f.slots[i]) + 1;
      check(Array.isArray(f.nodes) && f.nodes.length > 0, 'CLUSTER SHARDS entry with nodes');
    }
    eq(covered, 16384, 'CLUSTER SHARDS covers every slot');
    const lines = String(await rc.cluster('NODES')).trim().split('\n');
    const masterIds = lines.filter((l) => l.split(' ')[2].includes('master')).map((l) => l.split(' ')[0]);
    check(masterIds.length >= 3, `CLUSTER NODES lists 3 masters: ${lines.length} lines`);
    const ids = [];
    for (const node of this.masters()) ids.push(await node.cluster('MYID'));
    eq(ids.slice().sort(), masterIds.slice().sort(), 'CLUSTER MYID of each master vs CLUSTER NODES');
    eq(await rc.cluster('KEYSLOT', 'foo'), 12182, 'CLUSTER KEYSLOT foo');
    eq(await rc.cluster('KEYSLOT', '{user1}:a'), await rc.cluster('KEYSLOT', '{user1}:b'), 'hash tags share a slot');
    const tagged = [];
    for (let i = 0; i < 7; i++) tagged.push(`{js-slot}:${i}`);
    await rc.mset(...tagged.flatMap((k) => [k, 'v']));
    const { node, slot } = await this.ownerOf(tagged[0]);
    eq(await node.cluster('COUNTKEYSINSLOT', slot), 7, 'CLUSTER COUNTKEYSINSLOT');
    eq((await node.cluster('GETKEYSINSLOT', slot, 100)).sort(), tagged.slice().sort(), 'CLUSTER GETKEYSINSLOT');
  }

  async transactions() {
    const rc = this.rc;
    const k = '{js-tx}:a';
    const res = await rc.multi().set(k, '1').incr(k).incrby(k, 5).get(k).exec();
    eq(res, [[null, 'OK'], [null, 2], [null, 7], [null, '7']], 'MULTI/EXEC of SET INCR INCRBY GET');
    const res2 = await rc.multi().set('{js-tx}:s', 'abc').incr('{js-tx}:s').set('{js-tx}:t', 'after').exec();
    check(res2[1][0] && /not an integer/.test(res2[1][0].message), `EXEC carries the INCR error: ${JSON.stringify(res2[1])}`);
    eq(res2[2], [null, 'OK'], 'the command after a failed one ran');
  }

  async watchConflict() {
    const rc = this.rc;
    const other = this.client();
    this.extra.push(other);
    const w = '{js-tx}:w';
    await rc.set(w, '10');
    eq(await rc.watch(w), 'OK', 'WATCH');
    const v = Number(await rc.get(w));
    eq(await other.set(w, 'changed'), 'OK', 'SET from a second client');
    const res = await rc.multi().set(w, String(v + 1)).exec();
    eq(res, null, 'EXEC after a conflicting write (null = aborted)');
    eq(await rc.get(w), 'changed', 'the value after an aborted transaction');
    eq(await rc.watch(w), 'OK', 'WATCH again');
    eq(await rc.multi().set(w, 'committed').exec(), [[null, 'OK']], 'EXEC with an untouched WATCH');
    eq(await rc.get(w), 'committed', 'the value after a committed transaction');
    eq(await rc.watch(w), 'OK', 'WATCH before UNWATCH');
    // UNWATCH goes to the same node connection as the WATCH (same slot).
    const { node } = await this.ownerOf(w);
    eq(await node.unwatch(), 'OK', 'UNWATCH');
    await other.set(w, 'again');
    eq(await rc.multi().set(w, 'final').exec(), [[null, 'OK']], 'EXEC after UNWATCH');
    eq(await rc.get(w), 'final', 'the value after UNWATCH and EXEC');
    other.disconnect();
  }

  async discard() {
    const rc = this.rc;
    const k = '{js-tx}:d';
    await rc.set(k, 'kept');
    const { host, port } = await this.ownerOf(k);
    const r = new Redis({ host, port, password: this.password, lazyConnect: true });
    this.extra.push(r);
    await r.connect();
    eq(await r.multi({ pipeline: false }), 'OK', 'MULTI');
    eq(await r.set(k, 'dropped'), 'QUEUED', 'SET inside MULTI');
    eq(await r.discard(), 'OK', 'DISCARD');
    eq(await r.get(k), 'kept', 'the value after DISCARD');
    await rejects(r.exec(), 'without MULTI', 'EXEC without MULTI');
    r.disconnect();
  }

  async concurrentIncr() {
    const k = P + 'counter';
    const n = this.args.incrN;
    await this.rc.del(k);
    const clients = Array.from({ length: 8 }, () => this.client());
    this.extra.push(...clients);
    await Promise.all(
      clients.map(async (c) => {
        for (let i = 0; i < n; i++) await c.incr(k);
      }),
    );
    for (const c of clients) c.disconnect();
    eq(Number(await this.rc.get(k)), 8 * n, `INCR from 8 clients x ${n}`);
  }

  async serverCmds() {
    const rc = this.rc;
    const node = this.masters()[0];
    const acked = await node.wait(0, 100);
    check(Number.isInteger(acked) && acked >= 0, `WAIT 0 100: ${acked}, want a replica count`);
    const count = await node.command('COUNT');
    check(Number.isInteger(count) && count > 20, `COMMAND COUNT: ${count}`);
    const all = await node.command();
    check(all.some((e) => e[0] === 'get' && e[1] === 2), 'COMMAND lists get with arity 2');
    const info = await node.command('INFO', 'get', 'set', 'no-such-command');
    eq(info.map((e) => (e ? [e[0], e[1]] : null)), [['get', 2], ['set', -3], null], 'COMMAND INFO');
    const list = await node.command('LIST');
    check(list.includes('get') && list.includes('scan'), 'COMMAND LIST names get and scan');
    eq(await node.command('GETKEYS', 'MSET', '{a}1', 'v', '{a}2', 'v'), ['{a}1', '{a}2'], 'COMMAND GETKEYS MSET');
    const docs = await node.command('DOCS', 'get');
    check(Array.isArray(docs) && docs[0] === 'get', `COMMAND DOCS get: ${JSON.stringify(docs).slice(0, 200)}`);
    const srv = infoFields(await rc.info('server'));
    check('redis_version' in srv, 'INFO server has redis_version');
    for (const section of ['clients', 'stats', 'replication', 'cluster', 'keyspace', 'memory']) {
      const text = await node.info(section);
      check(typeof text === 'string' && text.length > 0, `INFO ${section}`);
    }
    eq(infoFields(await node.info('cluster')).cluster_enabled, '1', 'INFO cluster cluster_enabled');
    eq(infoFields(await node.info('replication')).role, 'master', 'INFO replication role');
    check('used_memory' in infoFields(await node.info('memory')), 'INFO memory used_memory');
  }

  async clientCmds() {
    const node = this.masters()[0]; // one connection: the name sticks to it
    const id = await node.client('ID');
    check(Number.isInteger(id) && id > 0, `CLIENT ID: ${id}`);
    eq(await node.client('SETNAME', 'compat-js'), 'OK', 'CLIENT SETNAME');
    eq(await node.client('GETNAME'), 'compat-js', 'CLIENT GETNAME');
    const me = await node.client('INFO');
    check(me.includes(`id=${id} `) && me.includes('name=compat-js'), `CLIENT INFO: ${me}`);
    const list = await node.client('LIST');
    check(list.split('\n').some((l) => l.startsWith(`id=${id} `) && l.includes('name=compat-js')),
      'CLIENT LIST shows this connection and its name');
    eq(await node.client('NO-EVICT', 'on'), 'OK', 'CLIENT NO-EVICT on');
    eq(await node.client('NO-EVICT', 'off'), 'OK', 'CLIENT NO-EVICT off');
  }

  async clientSetinfo() {
    const node = this.masters()[0];
    eq(await node.client('SETINFO', 'LIB-NAME', 'compat'), 'OK', 'CLIENT SETINFO LIB-NAME');
    eq(await node.client('SETINFO', 'LIB-VER', '1.0'), 'OK', 'CLIENT SETINFO LIB-VER');
    const me = await node.client('INFO');
    check(me.includes('lib-name=compat') && me.includes('lib-ver=1.0'), `CLIENT INFO after SETINFO: ${me}`);
  }

  async configCmds() {
    const node = this.masters()[0];
    const got = await node.config('GET', 'maxclients');
    check(got[0] === 'maxclients' && Number(got[1]) > 0, `CONFIG GET maxclients: ${JSON.stringify(got)}`);
    const [, cur] = await node.config('GET', 'timeout');
    eq(await node.config('SET', 'timeout', cur), 'OK', 'CONFIG SET timeout to its current value');
    eq(await node.config('GET', 'timeout'), ['timeout', cur], 'CONFIG GET timeout after CONFIG SET');
  }

  async readonlyReadwrite() {
    const node = this.masters()[0];
    eq(await node.readonly(), 'OK', 'READONLY');
    eq(await node.readwrite(), 'OK', 'READWRITE');
  }

  async flush() {
    check((await this.sumMasters((n) => n.dbsize())) > 0, 'keys before FLUSHDB');
    for (const n of this.masters()) eq(await n.flushdb(), 'OK', `FLUSHDB on ${n.options.port}`);
    eq(await this.sumMasters((n) => n.dbsize()), 0, 'DBSIZE after FLUSHDB');
    await this.rc.set(P + 'after', '1');
    for (const n of this.masters()) eq(await n.flushall(), 'OK', `FLUSHALL on ${n.options.port}`);
    eq(await this.sumMasters((n) => n.dbsize()), 0, 'DBSIZE after FLUSHALL');
  }

  async run() {
    this.rc = this.client();
    this.extra = [];
    await new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('no cluster connection within 15 s')), 15000);
      this.rc.once('ready', () => { clearTimeout(t); resolve(); });
      this.rc.once('end', () => { clearTimeout(t); reject(new Error('the cluster connection ended')); });
    });
    try {
      const srv = infoFields(await this.rc.info('server'));
      this.versionText = srv.redis_version || '?';
      this.isDinomo = 'dinomo_version' in srv;
      const [maj, min] = this.versionText.split('.').map(Number);
      this.version = (maj || 0) * 100 + (min || 0);
    } catch (e) {
      this.versionText = '?';
      this.version = 9900;
    }
    const steps = [
      ['start', ['PING', 'FLUSHALL', 'DBSIZE'], this.start],
      ['set/get', ['SET', 'GET', 'TTL', 'PTTL', 'EXISTS'], this.setGet],
      ['setnx/setex', ['SETNX', 'SETEX', 'PSETEX'], this.setnxSetex],
      ['getex/getdel/getset', ['GETEX', 'GETDEL', 'GETSET'], this.getexGetdelGetset],
      ['mset/mget', ['MSET', 'MGET', 'MSETNX'], this.msetMget],
      ['strings', ['APPEND', 'STRLEN', 'GETRANGE', 'SETRANGE'], this.strings],
      ['counters', ['INCR', 'DECR', 'INCRBY', 'DECRBY', 'INCRBYFLOAT'], this.counters],
      ['expiry', ['EXPIRE', 'PEXPIRE', 'EXPIREAT', 'PEXPIREAT', 'EXPIRETIME', 'PEXPIRETIME', 'PERSIST'], this.expiry],
      ['expiry observed', ['SET EX 1'], this.expireObserved],
      ['keyspace', ['DEL', 'UNLINK', 'TOUCH', 'TYPE'], this.keyspace],
      ['rename/copy', ['RENAME', 'RENAMENX', 'COPY'], this.renameCopy],
      ['wrongtype', ['LPUSH (WRONGTYPE)'], this.wrongtype],
      ['scan', ['SCAN (scanStream per master)', 'KEYS', 'RANDOMKEY'], this.scanWhole],
      ['cluster', ['CLUSTER INFO', 'CLUSTER SLOTS', 'CLUSTER SHARDS', 'CLUSTER NODES', 'CLUSTER MYID',
        'CLUSTER KEYSLOT', 'CLUSTER COUNTKEYSINSLOT', 'CLUSTER GETKEYSINSLOT'], this.clusterCmds],
      ['multi/exec', ['MULTI', 'EXEC'], this.transactions],
      ['watch conflict', ['WATCH', 'UNWATCH'], this.watchConflict],
      ['discard', ['DISCARD'], this.discard],
      ['concurrent incr', [`INCR x8 clients x${this.args.incrN}`], this.concurrentIncr],
      ['server', ['WAIT', 'COMMAND', 'COMMAND COUNT', 'COMMAND INFO', 'COMMAND LIST', 'COMMAND GETKEYS',
        'COMMAND DOCS', 'INFO'], this.serverCmds],
      ['client', ['CLIENT ID', 'CLIENT SETNAME', 'CLIENT GETNAME', 'CLIENT INFO', 'CLIENT LIST',
        'CLIENT NO-EVICT'], this.clientCmds],
      // CLIENT SETINFO came with Redis 7.2.
      ['client setinfo', ['CLIENT SETINFO'], this.clientSetinfo, 702],
      ['config', ['CONFIG GET', 'CONFIG SET'], this.configCmds],
      ['readonly/readwrite', ['READONLY', 'READWRITE'], this.readonlyReadwrite],
      ['flush', ['FLUSHDB', 'FLUSHALL'], this.flush],
    ];
    for (const [name, commands, fn, minVersion] of steps) await this.step(name, commands, fn, minVersion);
    await this.finish();
    return this.failures.length ? 1 : 0;
  }
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  let s;
  try {
    s = new Session(args);
  } catch (e) {
    console.error(`ioredis_cluster: cannot read the password file: ${e.message}`);
    return 1;
  }
  try {
    return await s.run();
  } catch (e) {
    console.error(`ioredis_cluster: ${e.message}`);
    if (s.rc) s.rc.disconnect();
    return 1;
  }
}

main().then((code) => process.exit(code));
