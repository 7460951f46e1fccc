#!lua name=pulse

--[[
Pulse's server-side functions (a Valkey function library, loaded by the store writer).

pulse_apply writes one Kafka partition's checkpoint atomically together with the partition's
applied offset. The worker owns the partition's open windows, so what it writes are absolute
values (schemas.packed), not increments: the function merges nothing and reads only the
progress hash. KEYS[1] is the partition's progress hash; the other keys are the hashes and
entity registries the header refers to by index (2..#KEYS, each index used once). Every key
shares the partition's hash tag, so the function runs unchanged on a cluster.

ARGV[1] is a JSON header (pipeline.store_writer.payload builds it):
  expect   integer >= -1: the offset the writer believes is applied (-1: none); any other value
           aborts the call before a single write, so a redelivered or concurrently applied batch
           counts once
  offset   integer > expect: last offset of this batch
  mx, wm   integers, both or neither: partition max event time after the batch and its watermark
  ev, late, dead   integers >= 0: counters to add
  now      integer >= 0: wall clock (ms) of the apply
  topic    string: the Kafka topic the offsets belong to (stored as the progress field "topic")
  owner    string: the applying worker's name (stored as the progress field "owner")
  h        hash blocks {key index, expire-at (s), n[, "replace"]}: the next n (field, value)
           pairs of ARGV[2..] are set in that hash (with "replace": the hash becomes exactly
           them), whose expiry is set to expire-at; a value must be a
           packed value (version byte 1, at least 8 bytes), or, in a field "@<offset>", a
           bundle of them (version byte 2, at least 12 bytes)
  e        entity-registry blocks {key index, {score, entity, score, entity, ...}}: a sorted set
           per dim, scored by the entity's last-seen 1m window start (epoch ms), raised only
           (ZADD GT)
  ecut     integer (when e is not empty): registry members scored at or below it are removed
           (every 1m window they were seen in has expired)
  ecap     integer >= 1 (when e is not empty): a registry keeps at most its ecap newest members
  g        optional device positions {geo key index, seen key index, {t, lat, lon, device, ...}}:
           each device whose event time t is newer than the one in the "seen" sorted set (ZADD
           GT CH) gets that time there and its position in the geo set (|lat| <= 85.05112878,
           |lon| <= 180)
  z        optional leaderboard blocks {key index, expire-at (s), mode, {score, member, ...}}:
           sorted sets whose scores are set ("set"), raised only ("gt") or incremented
           ("incr", counts: exact because the whole call applies once) by finite numbers
  d        optional detector-state block {key index, n[, m]}: the next n (field, value)
           pairs of ARGV after the h pairs are set in that hash (values: non-empty), then the
           next m fields (forgotten entities' states) are deleted from it
  a        optional anomalies block {record key, index key, feed key, cut, cap,
           {id, t, entity, signal, cause, score, value, ...}}: one record per id follows in
           ARGV after the d pairs; each is set in the record hash, indexed by t in the index
           sorted set and added to the feed stream (MAXLEN ~ cap); then ids indexed at or
           below cut (expired) are removed from the index and the record hash
ARGV[2..] are the fields and values of the h blocks, then the d pairs and fields, then the anomaly
records.
Returns {1, new applied offset} when applied, {0, applied offset} when the expectation failed, and
an error reply "ERR pulse_apply: <what is wrong>" for a malformed call.

No partial writes: a function's writes are not rolled back when it fails half-way, so the call
runs in two phases. The first validates the whole call and checks the expected offset, writing
nothing; any problem ends the call there with an error. The second only writes (one HSET per
hash, chunked), and none of its commands can fail on what the first phase accepted.
--]]

local MAX_INT = 9007199254740992 -- 2^53: integers beyond it are not exact in a Lua number
local CHUNK = 500 -- fields per HSET and members per ZADD: unpack() is bounded by the C stack
local PACKED_VERSION = 1
local BUNDLE_VERSION = 2 -- a bundle of packed values, in a field "@<offset>" (schemas.packed)
local BUNDLE_MARK = 64 -- '@'
local GEO_MAX_LAT = 85.05112878 -- the geo index's latitude range (Web Mercator)

local function bad(fmt, ...)
  error(string.format(fmt, ...), 0)
end

local function is_int(x)
  return type(x) == 'number' and x >= -MAX_INT and x <= MAX_INT and x == math.floor(x)
end

local function is_array(t)
  return type(t) == 'table' and (next(t) == nil or t[1] ~= nil)
end

local function int_field(p, name, min)
  local x = p[name]
  if not is_int(x) or (min and x < min) then
    bad('%s must be an integer%s, got %s', name, min and (' >= ' .. min) or '', tostring(x))
  end
  return x
end

local function str_field(p, name)
  if type(p[name]) ~= 'string' then
    bad('%s must be a string, got %s', name, type(p[name]))
  end
  return p[name]
end

local function fmt_int(x)
  return string.format('%d', x)
end

-- the key at index `idx` (2..#KEYS, each index and name used once)
local function key_at(idx, where, keys, used)
  if not is_int(idx) or idx < 2 or idx > #keys then
    bad('%s: key index %s is not within 2..%d', where, tostring(idx), #keys)
  end
  if used[idx] then
    bad('%s: key index %d is used twice', where, idx)
  end
  used[idx] = true
  -- a name given twice (or the progress hash's) would be written as two types, or overwrite it
  local name = keys[idx]
  if used[name] then
    bad('%s: key %s is named twice', where, name)
  end
  used[name] = true
  return name
end

-- a block {key index, ...} of header array `name`: its key, checked (2..#KEYS, used once)
local function block_key(p, name, i, size, keys, used)
  local blk = p[name][i]
  local where = string.format('%s[%d]', name, i)
  if not is_array(blk) or #blk ~= size then
    bad('%s: a block must be an array of %d elements', where, size)
  end
  return blk, key_at(blk[1], where, keys, used), where
end

-- the header's hash blocks h (see the header docs): plan.h gets {key, expire-at, first ARGV
-- index, last ARGV index} per block, every (field, packed value) pair checked; returns the next
-- ARGV index
local function hash_blocks(p, keys, used, args, at, plan)
  for i = 1, #p.h do
    local given = p.h[i]
    local whole = is_array(given) and #given == 4 and given[4] == 'replace'
    local blk, k, where = block_key(p, 'h', i, whole and 4 or 3, keys, used)
    if not is_int(blk[2]) then bad('%s: expire-at must be an integer', where) end
    local n = blk[3]
    if not is_int(n) or n < 1 then bad('%s: n must be an integer >= 1', where) end
    local last = at + 2 * n - 1
    if last > #args then
      bad('%s: needs %d field/value pairs, the call has %d arguments', where, n, #args)
    end
    for a = at, last, 2 do
      local f, v = args[a], args[a + 1]
      if #f == 0 then bad('%s: field %d is empty', where, (a - at) / 2 + 1) end
      if string.byte(f, 1) == BUNDLE_MARK then
        if #v < 12 or string.byte(v, 1) ~= BUNDLE_VERSION then
          bad('%s: the value of %q is not a bundle of packed values', where, f)
        end
      elseif #v < 8 or string.byte(v, 1) ~= PACKED_VERSION then
        bad('%s: the value of %q is not a packed value', where, f)
      end
    end
    plan.h[i] = {k, blk[2], at, last, whole}
    at = last + 1
  end
  return at
end

local function is_coord(x, limit)
  return type(x) == 'number' and x == x and x >= -limit and x <= limit
end

-- the header's optional positions block g (see the header doc), or nil
local function positions(p, keys, used)
  local g = p.g
  if g == nil then return nil end
  if not is_array(g) or #g ~= 3 then bad('g must be {geo key index, seen key index, positions}') end
  local geo = key_at(g[1], 'g (geo)', keys, used)
  local seen = key_at(g[2], 'g (seen)', keys, used)
  local m = g[3]
  if not is_array(m) or #m == 0 or #m % 4 ~= 0 then
    bad('g: needs (time, lat, lon, device) quadruples')
  end
  for c = 1, #m, 4 do
    local at = (c + 3) / 4
    if not is_int(m[c]) then bad('g: time %d is not an integer', at) end
    if not is_coord(m[c + 1], GEO_MAX_LAT) then bad('g: latitude %d is not within +-%s', at, GEO_MAX_LAT) end
    if not is_coord(m[c + 2], 180) then bad('g: longitude %d is not within +-180', at) end
    if type(m[c + 3]) ~= 'string' or m[c + 3] == '' then bad('g: device %d is not a name', at) end
  end
  return {geo, seen, m}
end

local function expect_type(key, want)
  local t = redis.call('TYPE', key)
  t = type(t) == 'table' and t.ok or t
  if t ~= 'none' and t ~= want then bad('%s holds a %s, not a %s', key, t, want) end
end

local function is_score(x)
  return type(x) == 'number' and x == x and x > -1e300 and x < 1e300
end

-- the header's optional leaderboard blocks z (see the header doc)
local function boards(p, keys, used)
  local out = {}
  if p.z == nil then return out end
  if not is_array(p.z) then bad('z must be an array') end
  for i = 1, #p.z do
    local blk, k, where = block_key(p, 'z', i, 4, keys, used)
    if not is_int(blk[2]) then bad('%s: expire-at must be an integer', where) end
    local mode = blk[3]
    if mode ~= 'set' and mode ~= 'gt' and mode ~= 'incr' then
      bad('%s: mode must be set, gt or incr', where)
    end
    local m = blk[4]
    if not is_array(m) or #m == 0 or #m % 2 == 1 then bad('%s: needs (score, member) pairs', where) end
    for c = 1, #m, 2 do
      if not is_score(m[c]) then bad('%s: score %d is not a finite number', where, (c + 1) / 2) end
      if type(m[c + 1]) ~= 'string' or m[c + 1] == '' then
        bad('%s: member %d is not a name', where, (c + 1) / 2)
      end
      m[c] = string.format('%.17g', m[c])
    end
    out[i] = {k, blk[2], mode, m}
  end
  return out
end

-- the optional detector-state block d: {key, first ARGV index, last set, last deleted};
-- returns the next index
local function detector_states(p, keys, used, args, at, plan)
  if p.d == nil then return at end
  if not is_array(p.d) or (#p.d ~= 2 and #p.d ~= 3) then bad('d must be {key index, n[, m]}') end
  local k = key_at(p.d[1], 'd', keys, used)
  local n, m = p.d[2], p.d[3] or 0
  if not is_int(n) or n < 1 then bad('d: n must be an integer >= 1') end
  if not is_int(m) or m < 0 then bad('d: m must be an integer >= 0') end
  local last = at + 2 * n - 1
  if last + m > #args then
    bad('d: needs %d field/value pairs and %d fields, the call has %d arguments', n, m, #args)
  end
  for a = at, last, 2 do
    if #args[a] == 0 or #args[a + 1] == 0 then bad('d: field or value %d is empty', (a - at) / 2 + 1) end
  end
  for a = last + 1, last + m do
    if #args[a] == 0 then bad('d: field to delete %d is empty', a - last) end
  end
  plan.d = {k, at, last, last + m}
  return last + m + 1
end

-- the optional anomalies block a (see the header doc); returns the next ARGV index
local function anomalies(p, keys, used, args, at, plan)
  if p.a == nil then return at end
  if not is_array(p.a) or #p.a ~= 6 then
    bad('a must be {record key, index key, feed key, cut, cap, entries}')
  end
  local rec = key_at(p.a[1], 'a (records)', keys, used)
  local idx = key_at(p.a[2], 'a (index)', keys, used)
  local feed = key_at(p.a[3], 'a (feed)', keys, used)
  if not is_int(p.a[4]) then bad('a: cut must be an integer') end
  if not is_int(p.a[5]) or p.a[5] < 1 then bad('a: cap must be an integer >= 1') end
  local m = p.a[6]
  if not is_array(m) or #m == 0 or #m % 7 ~= 0 then bad('a: needs 7 elements per anomaly') end
  local n = #m / 7
  if at + n - 1 > #args then bad('a: needs %d records, the call has %d arguments', n, #args) end
  for c = 1, #m, 7 do
    local i = (c + 6) / 7
    if type(m[c]) ~= 'string' or m[c] == '' then bad('a: id %d is not a name', i) end
    if not is_int(m[c + 1]) then bad('a: time %d is not an integer', i) end
    for j = 2, 6 do
      if type(m[c + j]) ~= 'string' then bad('a: field %d of anomaly %d is not a string', j + 1, i) end
    end
    if #args[at + i - 1] == 0 then bad('a: record %d is empty', i) end
  end
  plan.a = {rec, idx, feed, p.a[4], p.a[5], m, at}
  return at + n
end

-- Phase 1: validate and check the expectation. Writes nothing; raises a message on any problem.
local function prepare(keys, args)
  if #keys < 1 then bad('no keys: KEYS[1] must be the progress hash') end
  if #args < 1 or type(args[1]) ~= 'string' then bad('expected a JSON header first') end
  local okj, p = pcall(cjson.decode, args[1])
  if not okj then bad('header is not JSON: %s', tostring(p)) end
  if type(p) ~= 'table' then bad('header must be a JSON object') end

  local plan = {progress = keys[1]}
  plan.expect = int_field(p, 'expect', -1)
  plan.offset = int_field(p, 'offset')
  if plan.offset <= plan.expect then
    bad('offset %d must be greater than expect %d', plan.offset, plan.expect)
  end
  local add = {events = int_field(p, 'ev', 0), late = int_field(p, 'late', 0),
               dead = int_field(p, 'dead', 0), batches = 1}
  plan.now = int_field(p, 'now', 0)
  plan.topic = str_field(p, 'topic')
  plan.owner = str_field(p, 'owner')
  if (p.mx == nil) ~= (p.wm == nil) then bad('mx and wm must be given together') end
  if p.mx ~= nil then
    plan.mx = int_field(p, 'mx')
    plan.wm = int_field(p, 'wm')
  end
  for _, name in ipairs({'h', 'e'}) do
    if not is_array(p[name]) then bad('%s must be an array', name) end
  end
  if #p.e > 0 then
    plan.ecut = int_field(p, 'ecut')
    plan.ecap = int_field(p, 'ecap', 1)
  end

  local used = {[keys[1]] = true}
  plan.h = {}
  local at = hash_blocks(p, keys, used, args, 2, plan)
  -- entity registries: (score, name) pairs
  plan.e = {}
  for i = 1, #p.e do
    local blk, k, where = block_key(p, 'e', i, 2, keys, used)
    local m = blk[2]
    if not is_array(m) or #m == 0 or #m % 2 == 1 then
      bad('%s: needs (score, entity) pairs', where)
    end
    for c = 1, #m, 2 do
      if not is_int(m[c]) then bad('%s: score %s is not an integer', where, tostring(m[c])) end
      if type(m[c + 1]) ~= 'string' or m[c + 1] == '' then
        bad('%s: entity %d is not a name', where, (c + 1) / 2)
      end
    end
    plan.e[i] = {k, m}
  end
  plan.g = positions(p, keys, used)
  plan.z = boards(p, keys, used)
  at = detector_states(p, keys, used, args, at, plan)
  at = anomalies(p, keys, used, args, at, plan)
  if at ~= #args + 1 then
    bad('the header accounts for %d arguments, the call has %d', at - 1, #args)
  end

  -- the call is sound: check the expectation and the stored values it adds to
  local cur = redis.call('HMGET', plan.progress, 'offset', 'events', 'late', 'dead', 'batches')
  local applied = cur[1] or '-1'
  if tonumber(applied) ~= plan.expect then
    plan.applied = applied
    return plan
  end
  plan.counters = {}
  for i, name in ipairs({'events', 'late', 'dead', 'batches'}) do
    local x = 0
    if cur[i + 1] then x = tonumber(cur[i + 1]) end
    if not is_int(x) then bad('stored progress field %s is not an integer', name) end
    if x > MAX_INT - add[name] then bad('progress field %s would pass 2^53', name) end
    plan.counters[#plan.counters + 1] = name
    plan.counters[#plan.counters + 1] = fmt_int(x + add[name])
  end
  for _, b in ipairs(plan.h) do
    local t = redis.call('TYPE', b[1])
    t = type(t) == 'table' and t.ok or t
    if t ~= 'none' and t ~= 'hash' then bad('window key %s holds a %s, not a hash', b[1], t) end
  end
  for _, b in ipairs(plan.e) do
    local t = redis.call('TYPE', b[1])
    t = type(t) == 'table' and t.ok or t
    if t ~= 'none' and t ~= 'zset' and t ~= 'set' then
      bad('entity registry %s holds a %s, not a sorted set', b[1], t)
    end
    b[3] = t == 'set' -- a registry from before they were scored: replaced
  end
  if plan.g then
    for i = 1, 2 do
      local t = redis.call('TYPE', plan.g[i])
      t = type(t) == 'table' and t.ok or t
      if t ~= 'none' and t ~= 'zset' then bad('position key %s holds a %s, not a sorted set', plan.g[i], t) end
    end
  end
  for _, b in ipairs(plan.z) do expect_type(b[1], 'zset') end
  if plan.d then expect_type(plan.d[1], 'hash') end
  if plan.a then
    expect_type(plan.a[1], 'hash')
    expect_type(plan.a[2], 'zset')
    expect_type(plan.a[3], 'stream')
  end
  return plan
end

-- Phase 2: writes only.
local function write(plan, args)
  for _, w in ipairs(plan.h) do
    local k = w[1]
    if w[5] then redis.call('UNLINK', k) end
    for i = w[3], w[4], 2 * CHUNK do
      redis.call('HSET', k, unpack(args, i, math.min(i + 2 * CHUNK - 1, w[4])))
    end
    redis.call('EXPIREAT', k, w[2])
  end
  for _, w in ipairs(plan.e) do
    local k, m = w[1], w[2]
    if w[3] then
      redis.call('UNLINK', k)
    end
    for i = 1, #m, 2 * CHUNK do
      redis.call('ZADD', k, 'GT', unpack(m, i, math.min(i + 2 * CHUNK - 1, #m)))
    end
    redis.call('ZREMRANGEBYSCORE', k, '-inf', fmt_int(plan.ecut))
    redis.call('ZREMRANGEBYRANK', k, 0, -plan.ecap - 1)
  end
  if plan.g then
    local geo, seen, m = plan.g[1], plan.g[2], plan.g[3]
    for c = 1, #m, 4 do
      if redis.call('ZADD', seen, 'GT', 'CH', m[c], m[c + 3]) == 1 then
        redis.call('GEOADD', geo, m[c + 2], m[c + 1], m[c + 3])
      end
    end
  end
  for _, w in ipairs(plan.z) do
    local k, mode, m = w[1], w[3], w[4]
    if mode == 'incr' then
      for c = 1, #m, 2 do redis.call('ZINCRBY', k, m[c], m[c + 1]) end
    else
      for i = 1, #m, 2 * CHUNK do
        local chunk = {unpack(m, i, math.min(i + 2 * CHUNK - 1, #m))}
        if mode == 'gt' then
          redis.call('ZADD', k, 'GT', unpack(chunk))
        else
          redis.call('ZADD', k, unpack(chunk))
        end
      end
    end
    redis.call('EXPIREAT', k, w[2])
  end
  if plan.d then
    local k, first, last, gone = plan.d[1], plan.d[2], plan.d[3], plan.d[4]
    for i = first, last, 2 * CHUNK do
      redis.call('HSET', k, unpack(args, i, math.min(i + 2 * CHUNK - 1, last)))
    end
    for i = last + 1, gone, CHUNK do
      redis.call('HDEL', k, unpack(args, i, math.min(i + CHUNK - 1, gone)))
    end
  end
  if plan.a then
    local rec, idx, feed, cut, cap, m, at = unpack(plan.a)
    for c = 1, #m, 7 do
      local i = (c + 6) / 7
      redis.call('HSET', rec, m[c], args[at + i - 1])
      redis.call('ZADD', idx, fmt_int(m[c + 1]), m[c])
      redis.call('XADD', feed, 'MAXLEN', '~', cap, '*', 'id', m[c], 'entity', m[c + 2],
                 'signal', m[c + 3], 'cause', m[c + 4], 'score', m[c + 5], 't', fmt_int(m[c + 1]),
                 'value', m[c + 6])
    end
    local gone = redis.call('ZRANGEBYSCORE', idx, '-inf', fmt_int(cut), 'LIMIT', 0, CHUNK)
    if #gone > 0 then
      redis.call('HDEL', rec, unpack(gone))
      redis.call('ZREM', idx, unpack(gone))
    end
  end
  local offset = fmt_int(plan.offset)
  local fields = {'offset', offset, 'updated_ms', fmt_int(plan.now), 'topic', plan.topic,
                  'owner', plan.owner}
  if plan.mx then
    fields[#fields + 1] = 'max_event_time'
    fields[#fields + 1] = fmt_int(plan.mx)
    fields[#fields + 1] = 'watermark'
    fields[#fields + 1] = fmt_int(plan.wm)
  end
  for _, x in ipairs(plan.counters) do
    fields[#fields + 1] = x
  end
  redis.call('HSET', plan.progress, unpack(fields))
  return offset
end

-- the error reply of function `name` for what a pcall caught (a message, or a store error)
local function failure(name, err)
  local msg = type(err) == 'table' and (err.err or 'store error') or tostring(err)
  return redis.error_reply('ERR ' .. name .. ': ' .. msg)
end

-- a partition's pulse_apply reply, once its call was checked (passed: the pcall's status)
local function outcome(passed, plan, args)
  if not passed then
    return failure('pulse_apply', plan)
  end
  if plan.applied then
    return {0, plan.applied}
  end
  return {1, write(plan, args)}
end

local function apply_batch(keys, args)
  local passed, plan = pcall(prepare, keys, args)
  return outcome(passed, plan, args)
end

--[[
pulse_apply_many is pulse_apply for several partitions in one call: a worker's poll on one
node. The store then reads, runs and fsyncs the poll once: as separate calls, each one ended
an event-loop turn of its own with an AOF fsync (appendfsync always), and a poll's last
partition was applied tens of milliseconds after its first.

ARGV[1] is a JSON array with one {keys, arguments} count pair per partition, in order; KEYS
and ARGV[2..] are the partitions' pulse_apply KEYS and ARGV, one partition after another. A
key may appear in one partition only. Every partition is checked first, as pulse_apply checks
its call; then the partitions that passed are written. Returns an array with each partition's
pulse_apply reply in order: {1, offset}, {0, applied offset}, or the error "ERR pulse_apply:
<what is wrong>" for a partition that is refused (which writes nothing). A malformed split is
an error reply "ERR pulse_apply_many: <what is wrong>" for the whole call, which writes nothing.
--]]

local function split_call(keys, args)
  local okj, counts = pcall(cjson.decode, args[1] or '')
  if not okj or not is_array(counts) or #counts == 0 then
    bad('ARGV[1] must be a non-empty JSON array of {keys, arguments} counts')
  end
  local parts, seen = {}, {}
  local k, a = 1, 2
  for i, c in ipairs(counts) do
    if not is_array(c) or #c ~= 2 or not is_int(c[1]) or not is_int(c[2]) or c[1] < 1 or c[2] < 1 then
      bad('part %d: counts must be {keys >= 1, arguments >= 1}', i)
    end
    if k + c[1] - 1 > #keys or a + c[2] - 1 > #args then
      bad('part %d: needs %d keys and %d arguments, the call has %d and %d left', i, c[1],
        c[2], #keys - k + 1, #args - a + 1)
    end
    local pk, pa = {}, {}
    for j = 1, c[1] do
      local name = keys[k + j - 1]
      if seen[name] and seen[name] ~= i then bad('key %s is in parts %d and %d', name, seen[name], i) end
      seen[name] = i
      pk[j] = name
    end
    for j = 1, c[2] do
      pa[j] = args[a + j - 1]
    end
    parts[i] = {pk, pa}
    k, a = k + c[1], a + c[2]
  end
  if k ~= #keys + 1 or a ~= #args + 1 then
    bad('the counts account for %d keys and %d arguments, the call has %d and %d', k - 1, a - 1,
      #keys, #args)
  end
  return parts
end

local function apply_many(keys, args)
  local ok, parts = pcall(split_call, keys, args)
  if not ok then
    return failure('pulse_apply_many', parts)
  end
  local plans = {}
  for i, part in ipairs(parts) do
    plans[i] = {pcall(prepare, part[1], part[2])}
  end
  local out = {}
  for i, p in ipairs(plans) do
    out[i] = outcome(p[1], p[2], parts[i][2])
  end
  return out
end

--[[
pulse_replace rebuilds whole keys of one partition atomically (``pulse replay``,
pipeline/replay.py builds the call). KEYS[1] is the partition's progress hash, only read: the
call refuses unless its watermark is at or past ``closed``, so the live worker can no longer
change any key it replaces. KEYS[2..] are the keys the header refers to by index (each used
once); every key must carry the hash tag of KEYS[1] (one partition, one slot).

ARGV[1] is a JSON header:
  closed   integer: the end (epoch ms) of the rebuilt range; the partition's stored watermark
           must be >= closed, else nothing is written and the reply is {0, watermark or ''}
  h        hash blocks {key index, expire-at (s), n}: the key's content becomes exactly the next
           n (field, value) pairs of ARGV[2..] (packed values or bundles, as apply takes), then
           it expires at expire-at
  z        sorted-set blocks {key index, expire-at (s), {score, member, ...}}: the key's content
           becomes exactly these members (finite scores), then it expires at expire-at
  x        key indexes to delete (keys of the range with nothing left to hold)
  a        optional anomalies block {record key index, index key index, from, to, {id, t, ...}}:
           the partition's anomalies indexed within [from, to) (to <= closed) become exactly
           these: each (id, t) pair, t within [from, to), takes the next record of ARGV after
           the h pairs into the record hash and is indexed by t; ids indexed within [from, to)
           and not given are removed from the index and the record hash. Records of an id
           given again are overwritten in place, so the same call twice leaves the same
           store. The live feed stream is not touched.
Returns {1, keys written, keys deleted, anomalies written, anomalies removed}, {0, stored
watermark} when the range is not closed, or an error reply "ERR pulse_replace: <what is
wrong>" for a malformed call; like pulse_apply it validates everything first and writes
nothing on any problem.
--]]

local function tag_of(key)
  local a = string.find(key, '{', 1, true)
  if not a then return nil end
  local b = string.find(key, '}', a + 1, true)
  if not b or b == a + 1 then return nil end
  return string.sub(key, a + 1, b - 1)
end

-- the optional anomalies block a of pulse_replace (see its header doc); returns the next ARGV
-- index
local function replaced_anomalies(p, keys, used, args, at, plan)
  if p.a == nil then return at end
  if not is_array(p.a) or #p.a ~= 5 then
    bad('a must be {record key index, index key index, from, to, entries}')
  end
  local rec = key_at(p.a[1], 'a (records)', keys, used)
  local idx = key_at(p.a[2], 'a (index)', keys, used)
  local from, to = p.a[3], p.a[4]
  if not is_int(from) or not is_int(to) or from >= to then
    bad('a: from and to must be integers, from < to')
  end
  if to > plan.closed then bad('a: to %s is after closed %s', fmt_int(to), fmt_int(plan.closed)) end
  local m = p.a[5]
  if not is_array(m) or #m % 2 == 1 then bad('a: needs (id, t) pairs') end
  local n = #m / 2
  if at + n - 1 > #args then bad('a: needs %d records, the call has %d arguments', n, #args) end
  local seen = {}
  for c = 1, #m, 2 do
    local i = (c + 1) / 2
    local id, t = m[c], m[c + 1]
    if type(id) ~= 'string' or id == '' then bad('a: id %d is not a name', i) end
    if seen[id] then bad('a: id %s is given twice', id) end
    seen[id] = true
    if not is_int(t) or t < from or t >= to then bad('a: time of %s is not within [from, to)', id) end
    if #args[at + i - 1] == 0 then bad('a: record %d is empty', i) end
  end
  plan.a = {rec, idx, from, to, m, at, seen}
  return at + n
end

local function prepare_replace(keys, args)
  if #keys < 1 then bad('no keys: KEYS[1] must be the progress hash') end
  if #args < 1 or type(args[1]) ~= 'string' then bad('expected a JSON header first') end
  local okj, p = pcall(cjson.decode, args[1])
  if not okj then bad('header is not JSON: %s', tostring(p)) end
  if type(p) ~= 'table' then bad('header must be a JSON object') end
  local tag = tag_of(keys[1])
  if not tag then bad('KEYS[1] %s has no hash tag', keys[1]) end
  for i = 2, #keys do
    if tag_of(keys[i]) ~= tag then bad('key %s is not of partition {%s}', keys[i], tag) end
  end
  local plan = {progress = keys[1], closed = int_field(p, 'closed'), h = {}, z = {}, x = {}}
  for _, name in ipairs({'h', 'z', 'x'}) do
    if p[name] == nil then p[name] = {} end
    if not is_array(p[name]) then bad('%s must be an array', name) end
  end
  local used = {[keys[1]] = true}
  local at = hash_blocks(p, keys, used, args, 2, plan)
  at = replaced_anomalies(p, keys, used, args, at, plan)
  if at ~= #args + 1 then
    bad('the header accounts for %d arguments, the call has %d', at - 1, #args)
  end
  for i = 1, #p.z do
    local blk, k, where = block_key(p, 'z', i, 3, keys, used)
    if not is_int(blk[2]) then bad('%s: expire-at must be an integer', where) end
    local m = blk[3]
    if not is_array(m) or #m == 0 or #m % 2 == 1 then bad('%s: needs (score, member) pairs', where) end
    for c = 1, #m, 2 do
      if not is_score(m[c]) then bad('%s: score %d is not a finite number', where, (c + 1) / 2) end
      if type(m[c + 1]) ~= 'string' or m[c + 1] == '' then
        bad('%s: member %d is not a name', where, (c + 1) / 2)
      end
      m[c] = string.format('%.17g', m[c])
    end
    plan.z[i] = {k, blk[2], m}
  end
  for i = 1, #p.x do
    plan.x[i] = key_at(p.x[i], string.format('x[%d]', i), keys, used)
  end
  local referred = #plan.h + #plan.z + #plan.x + (plan.a and 2 or 0)
  if #keys ~= 1 + referred then
    bad('the header refers to %d keys, the call has %d', referred, #keys - 1)
  end
  for _, b in ipairs(plan.h) do expect_type(b[1], 'hash') end
  for _, b in ipairs(plan.z) do expect_type(b[1], 'zset') end
  if plan.a then
    expect_type(plan.a[1], 'hash')
    expect_type(plan.a[2], 'zset')
  end
  local wm = redis.call('HGET', plan.progress, 'watermark')
  if not wm or not tonumber(wm) or tonumber(wm) < plan.closed then
    plan.refused = wm or ''
  end
  return plan
end

local function write_replace(plan, args)
  for _, w in ipairs(plan.h) do
    local k = w[1]
    redis.call('UNLINK', k)
    for i = w[3], w[4], 2 * CHUNK do
      redis.call('HSET', k, unpack(args, i, math.min(i + 2 * CHUNK - 1, w[4])))
    end
    redis.call('EXPIREAT', k, w[2])
  end
  for _, w in ipairs(plan.z) do
    local k, m = w[1], w[3]
    redis.call('UNLINK', k)
    for i = 1, #m, 2 * CHUNK do
      redis.call('ZADD', k, unpack(m, i, math.min(i + 2 * CHUNK - 1, #m)))
    end
    redis.call('EXPIREAT', k, w[2])
  end
  for _, k in ipairs(plan.x) do
    redis.call('UNLINK', k)
  end
  local written, removed = 0, 0
  if plan.a then
    local rec, idx, from, to, m, at, given = unpack(plan.a)
    local old = redis.call('ZRANGEBYSCORE', idx, fmt_int(from), '(' .. fmt_int(to))
    local gone = {}
    for _, id in ipairs(old) do
      if not given[id] then gone[#gone + 1] = id end
    end
    for i = 1, #gone, CHUNK do
      local part = {unpack(gone, i, math.min(i + CHUNK - 1, #gone))}
      redis.call('HDEL', rec, unpack(part))
      redis.call('ZREM', idx, unpack(part))
    end
    for c = 1, #m, 2 do
      redis.call('HSET', rec, m[c], args[at + (c - 1) / 2])
      redis.call('ZADD', idx, fmt_int(m[c + 1]), m[c])
    end
    written, removed = #m / 2, #gone
  end
  return {1, #plan.h + #plan.z, #plan.x, written, removed}
end

local function replace_keys(keys, args)
  local ok, plan = pcall(prepare_replace, keys, args)
  if not ok then
    return failure('pulse_replace', plan)
  end
  if plan.refused then
    return {0, plan.refused}
  end
  return write_replace(plan, args)
end

redis.register_function('pulse_apply', apply_batch)
redis.register_function('pulse_apply_many', apply_many)
redis.register_function('pulse_replace', replace_keys)
