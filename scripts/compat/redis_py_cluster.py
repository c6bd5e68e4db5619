#!/usr/bin/env python3
"""A scripted session with redis-py's RedisCluster against a Redis Cluster endpoint.

Every command of the KN string/keyspace/transaction/introspection surface is used through the
library's own API (execute_command only where redis-py has no method), and every result is
asserted. Stops at the first failure with a message naming the command (exit 1); with
--keep-going it runs every step and lists all failures at the end (still exit 1).

Usage: redis_py_cluster.py HOST PORT PASSWORD_FILE [--keep-going] [--incr-n N]

The session starts with FLUSHALL: run it against a test cluster only.
"""

import argparse
import sys
import threading
import time
import traceback

import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisError, ResponseError, WatchError

P = "compat:py:"


class Failure(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failure(what)


def eq(got, want, what):
    if got != want:
        raise Failure(f"{what}: got {got!r}, want {want!r}")


def in_range(got, lo, hi, what):
    if not isinstance(got, (int, float)) or not (lo <= got <= hi):
        raise Failure(f"{what}: got {got!r}, want a value in [{lo}, {hi}]")


def ok_true(res):
    """redis-py 6.4's cluster transactions hand back SET's raw "OK" where a plain call
    gives True; count both as success."""
    if isinstance(res, list):
        return [ok_true(r) for r in res]
    return True if res == "OK" else res


def all_ok(res, what):
    """A command sent to every primary answers per node; each must be OK."""
    if not (isinstance(res, dict) and len(res) >= 3 and all(v is True for v in res.values())):
        raise Failure(f"{what}: got {res!r}, want OK from every primary")


def raises(fn, exc, text, what):
    try:
        r = fn()
    except exc as e:
        if text.lower() not in str(e).lower():
            raise Failure(f"{what}: error {str(e)!r} does not say {text!r}")
        return
    raise Failure(f"{what}: answered {r!r}, want an error saying {text!r}")


class Session:
    def __init__(self, args):
        self.args = args
        with open(args.password_file, encoding="utf-8") as f:
            self.password = f.read().strip()
        self.rc = self.client()
        self.exercised = []
        self.failures = []
        self.skipped = []
        self.is_dinomo = False
        self.steps = 0

    def client(self):
        return RedisCluster(
            host=self.args.host,
            port=self.args.port,
            password=self.password,
            decode_responses=True,
            socket_timeout=10,
        )

    def step(self, name, commands, fn, min_version=None):
        # A step that needs a newer Redis than the server reports is skipped, except on a
        # DINOMO KN (INFO server has dinomo_version), which serves it whatever it reports.
        if min_version and self.server_version() < min_version and not self.is_dinomo:
            v = ".".join(map(str, self.server_version()))
            self.skipped.append(f"{name} (the server reports redis_version {v})")
            print(f"skip {name}: the server reports redis_version {v}", flush=True)
            return
        self.steps += 1
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported by step
            detail = f"{type(e).__name__}: {e}" if not isinstance(e, Failure) else str(e)
            msg = f"[{name}] ({' '.join(commands)}) {detail}"
            self.failures.append(msg)
            print(f"FAIL {msg}", file=sys.stderr, flush=True)
            if not isinstance(e, Failure):
                traceback.print_exc(limit=-3)
            if not self.args.keep_going:
                self.summary()
                sys.exit(1)
            return
        for c in commands:
            if c not in self.exercised:
                self.exercised.append(c)
        print(f"ok   {name}", flush=True)

    def server_version(self):
        if not hasattr(self, "_version"):
            try:
                srv = self.rc.info("server")
                v = str(srv.get("redis_version", "0"))
                self.is_dinomo = "dinomo_version" in srv
                self._version = tuple(int(x) for x in v.split(".")[:2])
            except (RedisError, ValueError):
                self._version = (99, 0)
        return self._version

    def summary(self):
        print(
            f"redis-py {redis.__version__} RedisCluster: {len(self.exercised)} commands "
            f"exercised in {self.steps - len(self.failures)}/{self.steps} passing steps: "
            + " ".join(self.exercised)
        )
        for sk in self.skipped:
            print(f"skipped: {sk}")
        if self.failures:
            print(f"{len(self.failures)} step(s) failed:", file=sys.stderr)
            for f in self.failures:
                print(f"  {f}", file=sys.stderr)

    def primaries_dbsize(self):
        return self.rc.dbsize(target_nodes=RedisCluster.PRIMARIES)

    # ---- steps -------------------------------------------------------------------------

    def start(self):
        rc = self.rc
        check(rc.ping() is True, "PING")
        all_ok(rc.flushall(), "FLUSHALL on every primary")
        eq(self.primaries_dbsize(), 0, "DBSIZE summed over the primaries after FLUSHALL")

    def set_get(self):
        rc, k = self.rc, P + "s"
        eq(rc.set(k, "v1"), True, "SET")
        eq(rc.get(k), "v1", "GET")
        eq(rc.get(P + "missing"), None, "GET of a missing key")
        eq(rc.set(k, "v2", nx=True), None, "SET NX on an existing key")
        eq(rc.get(k), "v1", "GET after a refused SET NX")
        eq(rc.set(P + "s-xx", "x", xx=True), None, "SET XX on a missing key")
        eq(rc.exists(P + "s-xx"), 0, "EXISTS after a refused SET XX")
        eq(rc.set(k, "v3", xx=True), True, "SET XX on an existing key")
        eq(rc.set(k, "v4", get=True), "v3", "SET GET returns the old value")
        eq(rc.set(P + "s-new", "n", get=True), None, "SET GET on a missing key")
        eq(rc.get(k), "v4", "GET after SET GET")
        eq(rc.ttl(k), -1, "TTL of a key without expiry")
        eq(rc.set(k, "v5", ex=100), True, "SET EX")
        in_range(rc.ttl(k), 95, 100, "TTL after SET EX 100")
        eq(rc.set(k, "v6", px=100000), True, "SET PX")
        in_range(rc.pttl(k), 95000, 100000, "PTTL after SET PX 100000")
        now = int(time.time())
        eq(rc.set(k, "v7", exat=now + 100), True, "SET EXAT")
        in_range(rc.ttl(k), 95, 100, "TTL after SET EXAT now+100")
        now_ms = int(time.time() * 1000)
        eq(rc.set(k, "v8", pxat=now_ms + 100000), True, "SET PXAT")
        in_range(rc.pttl(k), 95000, 100000, "PTTL after SET PXAT now+100000ms")
        eq(rc.set(k, "v9", keepttl=True), True, "SET KEEPTTL")
        in_range(rc.pttl(k), 90000, 100000, "PTTL kept by SET KEEPTTL")
        eq(rc.get(k), "v9", "GET after SET KEEPTTL")
        eq(rc.set(k, "v10"), True, "SET without KEEPTTL")
        eq(rc.ttl(k), -1, "TTL after a plain SET clears the expiry")
        eq(rc.set(k, "v11", xx=True, get=True, ex=50), "v10", "SET XX GET EX")
        in_range(rc.ttl(k), 45, 50, "TTL after SET XX GET EX 50")

    def setnx_setex(self):
        rc = self.rc
        eq(rc.setnx(P + "nx", "a"), True, "SETNX on a missing key")
        eq(rc.setnx(P + "nx", "b"), False, "SETNX on an existing key")
        eq(rc.get(P + "nx"), "a", "GET after SETNX")
        eq(rc.setex(P + "ex", 100, "e"), True, "SETEX")
        eq(rc.get(P + "ex"), "e", "GET after SETEX")
        in_range(rc.ttl(P + "ex"), 95, 100, "TTL after SETEX 100")
        eq(rc.psetex(P + "pex", 100000, "p"), True, "PSETEX")
        eq(rc.get(P + "pex"), "p", "GET after PSETEX")
        in_range(rc.pttl(P + "pex"), 95000, 100000, "PTTL after PSETEX 100000")
        raises(lambda: rc.setex(P + "ex", 0, "e"), ResponseError, "invalid expire", "SETEX 0")

    def getex_getdel_getset(self):
        rc, k = self.rc, P + "gx"
        rc.set(k, "g")
        eq(rc.getex(k), "g", "GETEX without options")
        eq(rc.ttl(k), -1, "TTL after GETEX without options")
        eq(rc.getex(k, ex=100), "g", "GETEX EX")
        in_range(rc.ttl(k), 95, 100, "TTL after GETEX EX 100")
        eq(rc.getex(k, px=200000), "g", "GETEX PX")
        in_range(rc.pttl(k), 195000, 200000, "PTTL after GETEX PX 200000")
        eq(rc.getex(k, exat=int(time.time()) + 300), "g", "GETEX EXAT")
        in_range(rc.ttl(k), 295, 300, "TTL after GETEX EXAT now+300")
        eq(rc.getex(k, pxat=int(time.time() * 1000) + 400000), "g", "GETEX PXAT")
        in_range(rc.ttl(k), 395, 400, "TTL after GETEX PXAT now+400s")
        eq(rc.getex(k, persist=True), "g", "GETEX PERSIST")
        eq(rc.ttl(k), -1, "TTL after GETEX PERSIST")
        eq(rc.getex(P + "missing"), None, "GETEX of a missing key")
        eq(rc.getset(k, "h"), "g", "GETSET returns the old value")
        eq(rc.get(k), "h", "GET after GETSET")
        eq(rc.getset(P + "gs-new", "n"), None, "GETSET on a missing key")
        eq(rc.getdel(k), "h", "GETDEL returns the value")
        eq(rc.exists(k), 0, "EXISTS after GETDEL")
        eq(rc.getdel(k), None, "GETDEL of a missing key")

    def mset_mget(self):
        rc = self.rc
        a, b, c, d = "{py-m}:a", "{py-m}:b", "{py-m}:c", "{py-m}:d"
        eq(rc.mset({a: "1", b: "2"}), True, "MSET in one slot")
        eq(rc.mget([a, b, c]), ["1", "2", None], "MGET in one slot")
        eq(rc.msetnx({b: "x", c: "3"}), False, "MSETNX with one key existing")
        eq(rc.mget([b, c]), ["2", None], "MGET after a refused MSETNX")
        eq(rc.msetnx({c: "3", d: "4"}), True, "MSETNX with all keys new")
        eq(rc.mget(a, b, c, d), ["1", "2", "3", "4"], "MGET after MSETNX")
        # The same commands across slots, split per slot by the library.
        keys = [f"{P}mx:{i}" for i in range(20)]
        check(len({key_slot(k.encode()) for k in keys}) > 5, "the cross-slot keys spread")
        rc.mset_nonatomic({k: str(i) for i, k in enumerate(keys)})
        eq(rc.mget_nonatomic(keys), [str(i) for i in range(20)], "MGET split over slots")

    def strings(self):
        rc, k = self.rc, P + "str"
        eq(rc.append(k, "Hello"), 5, "APPEND to a missing key")
        eq(rc.append(k, " World"), 11, "APPEND")
        eq(rc.get(k), "Hello World", "GET after APPEND")
        eq(rc.strlen(k), 11, "STRLEN")
        eq(rc.strlen(P + "missing"), 0, "STRLEN of a missing key")
        eq(rc.getrange(k, 0, 4), "Hello", "GETRANGE 0 4")
        eq(rc.getrange(k, -5, -1), "World", "GETRANGE -5 -1")
        eq(rc.getrange(k, 6, 1000), "World", "GETRANGE past the end")
        eq(rc.getrange(P + "missing", 0, 10), "", "GETRANGE of a missing key")
        eq(rc.setrange(k, 6, "Redis"), 11, "SETRANGE")
        eq(rc.get(k), "Hello Redis", "GET after SETRANGE")
        eq(rc.setrange(P + "sr", 3, "ab"), 5, "SETRANGE past the end of a missing key")
        eq(rc.get(P + "sr"), "\x00\x00\x00ab", "SETRANGE pads with zero bytes")

    def counters(self):
        rc, k = self.rc, P + "n"
        eq(rc.incr(k), 1, "INCR of a missing key")
        eq(rc.incr(k), 2, "INCR")
        eq(rc.incrby(k, 10), 12, "INCRBY 10")
        eq(rc.decr(k), 11, "DECR")
        eq(rc.decrby(k, 5), 6, "DECRBY 5")
        eq(rc.incrby(k, -10), -4, "INCRBY -10")
        eq(rc.get(k), "-4", "GET of a counter")
        eq(rc.incrbyfloat(k, 1.5), -2.5, "INCRBYFLOAT 1.5")
        eq(rc.incrbyfloat(P + "f", "10.25"), 10.25, "INCRBYFLOAT of a missing key")
        eq(rc.get(P + "f"), "10.25", "GET after INCRBYFLOAT")
        rc.set(P + "nan", "abc")
        raises(lambda: rc.incr(P + "nan"), ResponseError, "not an integer", "INCR of 'abc'")
        raises(lambda: rc.incrby(P + "nan", 2), ResponseError, "not an integer", "INCRBY of 'abc'")
        raises(lambda: rc.decr(P + "nan"), ResponseError, "not an integer", "DECR of 'abc'")
        raises(lambda: rc.incrbyfloat(P + "nan", 1), ResponseError, "not a valid float", "INCRBYFLOAT of 'abc'")
        rc.set(P + "max", str(2**63 - 1))
        raises(lambda: rc.incr(P + "max"), ResponseError, "overflow", "INCR past 2^63-1")
        eq(rc.get(P + "nan"), "abc", "a refused INCR leaves the value")

    def expiry(self):
        rc, k = self.rc, P + "e"
        rc.set(k, "v")
        eq(rc.expire(k, 100, xx=True), False, "EXPIRE XX on a key without expiry")
        eq(rc.expire(k, 100, nx=True), True, "EXPIRE NX on a key without expiry")
        in_range(rc.ttl(k), 95, 100, "TTL after EXPIRE 100")
        eq(rc.expire(k, 200, nx=True), False, "EXPIRE NX on a key with an expiry")
        eq(rc.expire(k, 200, xx=True), True, "EXPIRE XX on a key with an expiry")
        eq(rc.expire(k, 50, gt=True), False, "EXPIRE GT with a smaller TTL")
        eq(rc.expire(k, 300, gt=True), True, "EXPIRE GT with a larger TTL")
        eq(rc.expire(k, 400, lt=True), False, "EXPIRE LT with a larger TTL")
        eq(rc.expire(k, 150, lt=True), True, "EXPIRE LT with a smaller TTL")
        in_range(rc.ttl(k), 145, 150, "TTL after EXPIRE LT 150")
        eq(rc.expire(k, 100), True, "EXPIRE")
        in_range(rc.ttl(k), 95, 100, "TTL after EXPIRE 100")
        eq(rc.pexpire(k, 200000), True, "PEXPIRE")
        in_range(rc.pttl(k), 195000, 200000, "PTTL after PEXPIRE 200000")
        eq(rc.pexpire(k, 100000, lt=True), True, "PEXPIRE LT")
        in_range(rc.pttl(k), 95000, 100000, "PTTL after PEXPIRE LT 100000")
        at = int(time.time()) + 500
        eq(rc.expireat(k, at), True, "EXPIREAT")
        eq(rc.expiretime(k), at, "EXPIRETIME after EXPIREAT")
        eq(rc.expireat(k, at - 100, gt=True), False, "EXPIREAT GT with an earlier time")
        at_ms = int(time.time() * 1000) + 600000
        eq(rc.pexpireat(k, at_ms), True, "PEXPIREAT")
        eq(rc.pexpiretime(k), at_ms, "PEXPIRETIME after PEXPIREAT")
        # Redis rounds to the nearest second here; truncating is as good.
        in_range(rc.expiretime(k), at_ms // 1000, (at_ms + 500) // 1000, "EXPIRETIME after PEXPIREAT")
        eq(rc.pexpireat(k, at_ms + 1000, xx=True), True, "PEXPIREAT XX")
        eq(rc.persist(k), True, "PERSIST")
        eq(rc.ttl(k), -1, "TTL after PERSIST")
        eq(rc.pttl(k), -1, "PTTL after PERSIST")
        eq(rc.expiretime(k), -1, "EXPIRETIME of a key without expiry")
        eq(rc.pexpiretime(k), -1, "PEXPIRETIME of a key without expiry")
        eq(rc.persist(k), False, "PERSIST of a key without expiry")
        m = P + "missing"
        eq(rc.ttl(m), -2, "TTL of a missing key")
        eq(rc.pttl(m), -2, "PTTL of a missing key")
        eq(rc.expiretime(m), -2, "EXPIRETIME of a missing key")
        eq(rc.pexpiretime(m), -2, "PEXPIRETIME of a missing key")
        eq(rc.expire(m, 10), False, "EXPIRE of a missing key")
        eq(rc.persist(m), False, "PERSIST of a missing key")
        # An expiry in the past deletes the key.
        rc.set(P + "past", "v")
        eq(rc.expireat(P + "past", int(time.time()) - 10), True, "EXPIREAT in the past")
        eq(rc.exists(P + "past"), 0, "EXISTS after EXPIREAT in the past")

    def expire_observed(self):
        rc, k = self.rc, P + "gone"
        before = time.monotonic()
        eq(rc.set(k, "v", ex=1), True, "SET EX 1")
        t0 = time.monotonic()
        got, pttl = rc.get(k), rc.pttl(k)
        # Only a client stalled for most of the second could see the key gone already.
        if time.monotonic() - before < 0.8:
            eq(got, "v", "GET right after SET EX 1")
            in_range(pttl, 1, 1000, "PTTL right after SET EX 1")
        eq(rc.set(P + "gone-px", "v", px=300), True, "SET PX 300")
        deadline = t0 + 5.0
        while time.monotonic() < deadline:
            if rc.get(k) is None and rc.get(P + "gone-px") is None:
                break
            time.sleep(0.05)
        waited = time.monotonic() - t0
        eq(rc.get(k), None, f"GET of an EX 1 key after polling {waited:.1f} s")
        eq(rc.get(P + "gone-px"), None, "GET of a PX 300 key after expiry")
        eq(rc.exists(k), 0, "EXISTS of an expired key")
        eq(rc.ttl(k), -2, "TTL of an expired key")
        check(waited >= 0.5, f"the EX 1 key was gone after {waited:.2f} s, before its second")

    def keyspace(self):
        rc = self.rc
        a, b, c = "{py-k}:a", "{py-k}:b", "{py-k}:c"
        rc.mset({a: "1", b: "2"})
        eq(rc.exists(a, b, c), 2, "EXISTS of three keys in one slot")
        eq(rc.exists(a, a), 2, "EXISTS counts a repeated key twice")
        eq(rc.touch(a, b, c), 2, "TOUCH of three keys in one slot")
        eq(rc.type(a), "string", "TYPE of a string")
        eq(rc.type(c), "none", "TYPE of a missing key")
        eq(rc.delete(a, c), 1, "DEL of an existing and a missing key")
        eq(rc.unlink(b), 1, "UNLINK")
        eq(rc.exists(a, b), 0, "EXISTS after DEL and UNLINK")
        # Across slots, split per slot by the library.
        keys = [f"{P}k:{i}" for i in range(10)]
        rc.mset_nonatomic({k: "x" for k in keys})
        eq(rc.exists(*keys), 10, "EXISTS split over slots")
        eq(rc.touch(*keys), 10, "TOUCH split over slots")
        eq(rc.unlink(*keys[:5]), 5, "UNLINK split over slots")
        eq(rc.delete(*keys), 5, "DEL split over slots")
        eq(rc.exists(*keys), 0, "EXISTS after DEL over slots")

    def rename_copy(self):
        rc = self.rc
        src, dst, oth, cp = "{py-r}:src", "{py-r}:dst", "{py-r}:other", "{py-r}:copy"
        rc.set(src, "v", ex=100)
        eq(rc.rename(src, dst), True, "RENAME")
        eq(rc.get(dst), "v", "GET of the renamed key")
        eq(rc.exists(src), 0, "EXISTS of the old name")
        in_range(rc.ttl(dst), 95, 100, "RENAME keeps the TTL")
        raises(lambda: rc.rename(src, dst), ResponseError, "no such key", "RENAME of a missing key")
        rc.set(oth, "o")
        eq(rc.renamenx(dst, oth), False, "RENAMENX onto an existing key")
        eq(rc.get(oth), "o", "the target of a refused RENAMENX")
        eq(rc.renamenx(dst, src), True, "RENAMENX onto a free name")
        eq(rc.get(src), "v", "GET after RENAMENX")
        eq(rc.rename(src, oth), True, "RENAME onto an existing key")
        eq(rc.get(oth), "v", "RENAME overwrites")
        eq(rc.copy(oth, cp), True, "COPY")
        eq(rc.get(cp), "v", "GET of the copy")
        in_range(rc.ttl(cp), 95, 100, "COPY keeps the TTL")
        rc.set(dst, "d")
        eq(rc.copy(oth, dst), False, "COPY onto an existing key")
        eq(rc.get(dst), "d", "the target of a refused COPY")
        eq(rc.copy(oth, dst, replace=True), True, "COPY REPLACE")
        eq(rc.get(dst), "v", "GET after COPY REPLACE")
        eq(rc.copy("{py-r}:missing", "{py-r}:x"), False, "COPY of a missing key")

    def wrongtype(self):
        rc, k = self.rc, P + "wt"
        rc.set(k, "s")
        # RedisCluster sends only the commands a node's COMMAND table lists, and a KN lists
        # only what it serves: LPUSH goes through the key's node with a plain connection.
        node = rc.get_node_from_key(k).redis_connection
        raises(lambda: node.lpush(k, "x"), ResponseError, "WRONGTYPE", "LPUSH to a string key")
        eq(rc.get(k), "s", "the string after a refused LPUSH")

    def scan_whole(self):
        rc = self.rc
        n = 300
        written = {f"{P}scan:{i}" for i in range(n)}
        rc.mset_nonatomic({k: "v" for k in written})
        # Every key in the cluster right now (FLUSHALL at the start, then the steps above).
        everything = set(rc.scan_iter())
        missing = written - everything
        check(not missing, f"SCAN of the whole cluster missed {len(missing)} of {n} keys, e.g. {sorted(missing)[:3]}")
        total = self.primaries_dbsize()
        eq(len(everything), total, "distinct keys from SCAN vs DBSIZE summed over the primaries")
        matched = list(rc.scan_iter(match=P + "scan:*", count=50))
        eq(set(matched), written, "SCAN MATCH COUNT 50 finds exactly the written keys")
        typed = set(rc.scan_iter(match=P + "scan:*", _type="string"))
        eq(typed, written, "SCAN MATCH TYPE string")
        eq(list(rc.scan_iter(match=P + "scan:*", _type="list")), [], "SCAN TYPE list")
        cursors, page = rc.scan(0, match=P + "scan:*", count=10)
        check(isinstance(cursors, dict) and len(cursors) >= 3, f"SCAN answers per primary: {cursors!r}")
        keys = rc.keys(P + "scan:*", target_nodes=RedisCluster.PRIMARIES)
        eq(set(keys), written, "KEYS pattern over the primaries")
        eq(len(keys), n, "KEYS returns each key once")
        eq(len(rc.keys(target_nodes=RedisCluster.PRIMARIES)), total, "KEYS * over the primaries")
        per_node = [rc.dbsize(target_nodes=node) for node in rc.get_primaries()]
        check(all(x > 0 for x in per_node), f"every primary holds keys: {per_node}")
        eq(sum(per_node), total, "DBSIZE per primary adds up")
        node = rc.get_primaries()[0]
        rk = rc.randomkey(target_nodes=node)
        check(rk in everything, f"RANDOMKEY answered {rk!r}, not a key that exists")
        check(rc.get_node_from_key(rk).name == node.name, "RANDOMKEY returns a key the node owns")

    def cluster_cmds(self):
        rc = self.rc
        info = rc.cluster_info()
        eq(info.get("cluster_state"), "ok", "CLUSTER INFO cluster_state")
        eq(str(info.get("cluster_slots_assigned")), "16384", "CLUSTER INFO cluster_slots_assigned")
        slots = rc.cluster_slots()
        covered = sum(end - start + 1 for (start, end) in slots)
        eq(covered, 16384, "CLUSTER SLOTS covers every slot")
        shards = rc.cluster_shards()
        check(isinstance(shards, list) and len(shards) >= 3, f"CLUSTER SHARDS: {shards!r}"[:300])
        shard_slots = 0
        for s in shards:
            # redis-py parses the flat [start, end, ...] list into (start, end) pairs.
            shard_slots += sum(int(e) - int(b) + 1 for (b, e) in s.get("slots") or [])
            check(s.get("nodes"), "CLUSTER SHARDS entry with nodes")
        eq(shard_slots, 16384, "CLUSTER SHARDS covers every slot")
        nodes = rc.cluster_nodes()
        masters = [a for a, n in nodes.items() if "master" in n.get("flags", "")]
        check(len(masters) >= 3, f"CLUSTER NODES lists 3 masters: {list(nodes)}")
        ids = set()
        for node in rc.get_primaries():
            myid = rc.cluster_myid(node)
            check(isinstance(myid, str) and len(myid) == 40, f"CLUSTER MYID: {myid!r}")
            ids.add(myid)
        eq(ids, {n["node_id"] for n in nodes.values() if "master" in n.get("flags", "")},
           "CLUSTER MYID of each primary vs CLUSTER NODES")
        for k in ("foo", "{user1}:a", P + "scan:1"):
            eq(rc.cluster_keyslot(k), key_slot(k.encode()), f"CLUSTER KEYSLOT {k}")
        eq(rc.cluster_keyslot("{user1}:a"), rc.cluster_keyslot("{user1}:b"), "hash tags share a slot")
        tagged = [f"{{py-slot}}:{i}" for i in range(7)]
        rc.mset({k: "v" for k in tagged})
        slot = key_slot(b"{py-slot}:0")
        eq(rc.cluster_countkeysinslot(slot), 7, "CLUSTER COUNTKEYSINSLOT")
        eq(set(rc.cluster_get_keys_in_slot(slot, 100)), set(tagged), "CLUSTER GETKEYSINSLOT")
        eq(len(rc.cluster_get_keys_in_slot(slot, 3)), 3, "CLUSTER GETKEYSINSLOT count 3")

    def transactions(self):
        rc = self.rc
        k = "{py-tx}:a"
        with rc.pipeline(transaction=True) as pipe:
            pipe.set(k, "1")
            pipe.incr(k)
            pipe.incrby(k, 5)
            pipe.get(k)
            eq(ok_true(pipe.execute()), [True, 2, 7, "7"], "MULTI/EXEC of SET INCR INCRBY GET")
        # A queued command that fails at run time does not abort the rest.
        with rc.pipeline(transaction=True) as pipe:
            pipe.set("{py-tx}:s", "abc")
            pipe.incr("{py-tx}:s")
            pipe.set("{py-tx}:t", "after")
            res = pipe.execute(raise_on_error=False)
            eq(ok_true(res[0]), True, "EXEC first reply")
            check(isinstance(res[1], ResponseError) and "not an integer" in str(res[1]),
                  f"EXEC second reply is the INCR error: {res[1]!r}")
            eq(ok_true(res[2]), True, "EXEC third reply after an error")
        eq(rc.get("{py-tx}:t"), "after", "the command after a failed one ran")

    def watch_conflict(self):
        rc = self.rc
        other = self.client()
        try:
            w = "{py-tx}:w"
            rc.set(w, "10")
            with rc.pipeline(transaction=True) as pipe:
                pipe.watch(w)
                v = int(pipe.get(w))
                eq(v, 10, "GET while watching")
                eq(other.set(w, "changed"), True, "SET from a second client")
                pipe.multi()
                pipe.set(w, str(v + 1))
                try:
                    res = pipe.execute()
                except WatchError:
                    pass
                else:
                    raise Failure(f"EXEC after a conflicting write answered {res!r}, want WatchError")
            eq(rc.get(w), "changed", "the value after an aborted transaction")
            # No conflict: the same shape commits.
            with rc.pipeline(transaction=True) as pipe:
                pipe.watch(w)
                cur = pipe.get(w)
                pipe.multi()
                pipe.set(w, cur + "+1")
                eq(ok_true(pipe.execute()), [True], "EXEC with an untouched WATCH")
            eq(rc.get(w), "changed+1", "the value after a committed transaction")
            # UNWATCH: a later write by another client no longer aborts.
            with rc.pipeline(transaction=True) as pipe:
                pipe.watch(w)
                pipe.unwatch()  # redis-py 6.4 hands back None here; the EXEC below is the test
                other.set(w, "again")
                pipe.multi()
                pipe.set(w, "final")
                eq(ok_true(pipe.execute()), [True], "EXEC after UNWATCH")
            eq(rc.get(w), "final", "the value after UNWATCH and EXEC")
        finally:
            other.close()

    def discard(self):
        # redis-py's pipelines discard client-side; DISCARD on the wire needs one connection
        # to the slot's owner.
        rc, k = self.rc, "{py-tx}:d"
        rc.set(k, "kept")
        node = rc.get_node_from_key(k)
        r = redis.Redis(host=node.host, port=node.port, password=self.password,
                        decode_responses=True, single_connection_client=True, socket_timeout=10)
        try:
            eq(r.execute_command("MULTI"), "OK", "MULTI")
            eq(r.execute_command("SETRANGE", k, 0, "DROPPED"), "QUEUED", "SETRANGE inside MULTI")
            eq(r.execute_command("DISCARD"), "OK", "DISCARD")
            eq(r.get(k), "kept", "the value after DISCARD")
            raises(lambda: r.execute_command("EXEC"), ResponseError, "without MULTI", "EXEC without MULTI")
            raises(lambda: r.execute_command("DISCARD"), ResponseError, "without MULTI", "DISCARD without MULTI")
        finally:
            r.close()

    def concurrent_incr(self):
        k, threads, n = P + "counter", 8, self.args.incr_n
        self.rc.delete(k)
        errors = []
        barrier = threading.Barrier(threads)

        def work():
            c = self.client()
            try:
                barrier.wait(timeout=30)
                for _ in range(n):
                    c.incr(k)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))
            finally:
                c.close()

        ts = [threading.Thread(target=work) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        check(not errors, f"INCR from {threads} clients: {errors[:3]}")
        eq(int(self.rc.get(k)), threads * n, f"INCR from {threads} clients x {n}")

    def server_cmds(self):
        rc = self.rc
        acked = rc.wait(0, 100)
        check(isinstance(acked, int) and acked >= 0, f"WAIT 0 100: {acked!r}, want a replica count")
        count = rc.command_count()
        check(isinstance(count, int) and count > 20, f"COMMAND COUNT: {count!r}")
        cmds = rc.command()
        for name in ("get", "set", "incr", "mget"):
            check(name in cmds, f"COMMAND lists {name}")
        eq(cmds["get"]["arity"], 2, "COMMAND: arity of GET")
        eq(cmds["mget"]["first_key_pos"], 1, "COMMAND: first key of MGET")
        eq(cmds["mget"]["last_key_pos"], -1, "COMMAND: last key of MGET")
        listed = rc.command_list()
        check("get" in listed and "scan" in listed, "COMMAND LIST names get and scan")
        eq(rc.command_getkeys("SET", "k1", "v"), ["k1"], "COMMAND GETKEYS SET")
        eq(rc.command_getkeys("MSET", "{a}1", "v", "{a}2", "v"), ["{a}1", "{a}2"], "COMMAND GETKEYS MSET")
        # redis-py has no method for these two (it refuses command_info and command_docs);
        # "COMMAND INFO" as one name keeps the COMMAND reply parser off their replies.
        node = rc.get_default_node()
        info = rc.execute_command("COMMAND INFO", "get", "set", "no-such-command", target_nodes=node)
        eq([(e[0], e[1]) if e else None for e in info], [("get", 2), ("set", -3), None],
           "COMMAND INFO get set no-such-command: names and arities")
        docs = rc.execute_command("COMMAND DOCS", "get", target_nodes=node)
        check(isinstance(docs, list) and docs and docs[0] == "get", f"COMMAND DOCS get: {str(docs)[:200]}")
        fields = dict(zip(docs[1][::2], docs[1][1::2]))
        check("summary" in fields, f"COMMAND DOCS get has a summary: {sorted(fields)}")

    def info(self):
        rc = self.rc
        full = rc.info()
        check(isinstance(full, dict) and full, "INFO")
        srv = rc.info("server")
        check("redis_version" in srv, f"INFO server has redis_version: {sorted(srv)[:10]}")
        cl = rc.info("clients")
        check(int(cl.get("connected_clients", 0)) >= 1, "INFO clients connected_clients")
        st = rc.info("stats")
        check("total_commands_processed" in st, "INFO stats total_commands_processed")
        rep = rc.info("replication")
        eq(rep.get("role"), "master", "INFO replication role")
        clu = rc.info("cluster")
        eq(clu.get("cluster_enabled"), 1, "INFO cluster cluster_enabled")
        ks = rc.info("keyspace", target_nodes=RedisCluster.PRIMARIES)
        check(isinstance(ks, dict), "INFO keyspace on every primary")
        mem = rc.info("memory")
        check("used_memory" in mem, "INFO memory used_memory")

    def client_cmds(self):
        rc = self.rc
        cid = rc.client_id()
        check(isinstance(cid, int) and cid > 0, f"CLIENT ID: {cid!r}")
        eq(rc.client_setname("compat-py"), True, "CLIENT SETNAME")
        eq(rc.client_getname(), "compat-py", "CLIENT GETNAME")
        me = rc.client_info()
        eq(int(me.get("id", -1)), cid, "CLIENT INFO id")
        eq(me.get("name"), "compat-py", "CLIENT INFO name")
        lst = rc.client_list()
        check(any(int(c.get("id", -1)) == cid and c.get("name") == "compat-py" for c in lst),
              "CLIENT LIST shows this connection and its name")
        # client_no_evict() cannot be routed by RedisCluster (CLIENT's COMMAND entry has no
        # key step), so the same command goes through execute_command with a target node.
        node = rc.get_default_node()
        eq(rc.execute_command("CLIENT NO-EVICT", "on", target_nodes=node), "OK", "CLIENT NO-EVICT on")
        eq(rc.execute_command("CLIENT NO-EVICT", "off", target_nodes=node), "OK", "CLIENT NO-EVICT off")

    def client_setinfo(self):
        rc = self.rc
        eq(rc.client_setinfo("lib-name", "compat"), True, "CLIENT SETINFO lib-name")
        eq(rc.client_setinfo("lib-ver", "1.0"), True, "CLIENT SETINFO lib-ver")
        me = rc.client_info()
        eq((me.get("lib-name"), me.get("lib-ver")), ("compat", "1.0"), "CLIENT INFO after SETINFO")

    def config_cmds(self):
        rc = self.rc
        got = rc.config_get("maxclients")
        check("maxclients" in got and int(got["maxclients"]) > 0, f"CONFIG GET maxclients: {got!r}")
        many = rc.config_get("max*")
        check("maxclients" in many, "CONFIG GET with a glob")
        cur = rc.config_get("timeout")["timeout"]
        eq(rc.config_set("timeout", cur), True, "CONFIG SET timeout to its current value")
        eq(rc.config_get("timeout"), {"timeout": cur}, "CONFIG GET timeout after CONFIG SET")
        raises(lambda: rc.config_set("no-such-parameter", "1"), ResponseError, "", "CONFIG SET of an unknown parameter")

    def readonly_readwrite(self):
        rc = self.rc
        eq(rc.readonly(), True, "READONLY")
        eq(rc.readwrite(), True, "READWRITE")
        eq(rc.get(P + "s"), rc.get(P + "s"), "GET after READWRITE")

    def flush(self):
        rc = self.rc
        check(self.primaries_dbsize() > 0, "keys before FLUSHDB")
        all_ok(rc.flushdb(), "FLUSHDB on every primary")
        eq(self.primaries_dbsize(), 0, "DBSIZE after FLUSHDB")
        eq(list(rc.scan_iter()), [], "SCAN after FLUSHDB")
        rc.set(P + "after", "1")
        all_ok(rc.flushall(), "FLUSHALL")
        eq(self.primaries_dbsize(), 0, "DBSIZE after FLUSHALL")

    def run(self):
        steps = [
            ("start", ["PING", "FLUSHALL", "DBSIZE"], self.start),
            ("set/get", ["SET", "GET", "TTL", "PTTL", "EXISTS"], self.set_get),
            ("setnx/setex", ["SETNX", "SETEX", "PSETEX"], self.setnx_setex),
            ("getex/getdel/getset", ["GETEX", "GETDEL", "GETSET"], self.getex_getdel_getset),
            ("mset/mget", ["MSET", "MGET", "MSETNX"], self.mset_mget),
            ("strings", ["APPEND", "STRLEN", "GETRANGE", "SETRANGE"], self.strings),
            ("counters", ["INCR", "DECR", "INCRBY", "DECRBY", "INCRBYFLOAT"], self.counters),
            ("expiry", ["EXPIRE", "PEXPIRE", "EXPIREAT", "PEXPIREAT", "EXPIRETIME",
                        "PEXPIRETIME", "PERSIST"], self.expiry),
            ("expiry observed", ["SET EX 1"], self.expire_observed),
            ("keyspace", ["DEL", "UNLINK", "TOUCH", "TYPE"], self.keyspace),
            ("rename/copy", ["RENAME", "RENAMENX", "COPY"], self.rename_copy),
            ("wrongtype", ["LPUSH (WRONGTYPE)"], self.wrongtype),
            ("scan", ["SCAN", "KEYS", "RANDOMKEY"], self.scan_whole),
            ("cluster", ["CLUSTER INFO", "CLUSTER SLOTS", "CLUSTER SHARDS", "CLUSTER NODES",
                         "CLUSTER MYID", "CLUSTER KEYSLOT", "CLUSTER COUNTKEYSINSLOT",
                         "CLUSTER GETKEYSINSLOT"], self.cluster_cmds),
            ("multi/exec", ["MULTI", "EXEC"], self.transactions),
            ("watch conflict", ["WATCH", "UNWATCH"], self.watch_conflict),
            ("discard", ["DISCARD"], self.discard),
            ("concurrent incr", [f"INCR x8 clients x{self.args.incr_n}"], self.concurrent_incr),
            ("server", ["WAIT", "COMMAND", "COMMAND COUNT", "COMMAND LIST", "COMMAND GETKEYS",
                        "COMMAND INFO", "COMMAND DOCS"], self.server_cmds),
            ("info", ["INFO"], self.info),
            ("client", ["CLIENT ID", "CLIENT SETNAME", "CLIENT GETNAME", "CLIENT INFO",
                        "CLIENT LIST", "CLIENT NO-EVICT"], self.client_cmds),
            # CLIENT SETINFO came with Redis 7.2.
            ("client setinfo", ["CLIENT SETINFO"], self.client_setinfo, (7, 2)),
            ("config", ["CONFIG GET", "CONFIG SET"], self.config_cmds),
            ("readonly/readwrite", ["READONLY", "READWRITE"], self.readonly_readwrite),
            ("flush", ["FLUSHDB", "FLUSHALL"], self.flush),
        ]
        for name, commands, fn, *min_version in steps:
            self.step(name, commands, fn, *min_version)
        self.summary()
        self.rc.close()
        return 1 if self.failures else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("password_file", help="a file holding the password (as `dinomo up` writes it)")
    ap.add_argument("--keep-going", action="store_true", help="run every step, list all failures")
    ap.add_argument("--incr-n", type=int, default=500, help="INCRs per client of the 8 (default 500)")
    args = ap.parse_args()
    try:
        s = Session(args)
    except (OSError, RedisError) as e:
        print(f"redis_py_cluster: cannot start the session: {e}", file=sys.stderr)
        return 1
    return s.run()


if __name__ == "__main__":
    sys.exit(main())
