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
  h        hash blocks {key index, expire-at (s), n}: the next n (field, value) pairs of
           ARGV[2..] are set in that hash, whose expiry is set to expire-at; a value must be a
           packed value (version byte 1, at least 8 bytes)
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
ARGV[2..] are the fields and values of the h blocks, in order: 1 + 2 * sum(n) arguments in all.
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
  -- hashes: {key, expire-at, first ARGV index, last ARGV index}, every pair checked
  plan.h = {}
  local at = 2
  for i = 1, #p.h do
    local blk, k, where = block_key(p, 'h', i, 3, keys, used)
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
      if #v < 8 or string.byte(v, 1) ~= PACKED_VERSION then
        bad('%s: the value of %q is not a packed value', where, f)
      end
    end
    plan.h[i] = {k, blk[2], at, last}
    at = last + 1
  end
  if at ~= #args + 1 then
    bad('the header accounts for %d arguments, the call has %d', at - 1, #args)
  end
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
  return plan
end

-- Phase 2: writes only.
local function write(plan, args)
  for _, w in ipairs(plan.h) do
    local k = w[1]
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

local function apply_batch(keys, args)
  local ok, plan = pcall(prepare, keys, args)
  if not ok then
    local msg = type(plan) == 'table' and (plan.err or 'store error') or tostring(plan)
    return redis.error_reply('ERR pulse_apply: ' .. msg)
  end
  if plan.applied then
    return {0, plan.applied}
  end
  return {1, write(plan, args)}
end

redis.register_function('pulse_apply', apply_batch)
