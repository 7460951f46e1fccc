#!lua name=pulse

--[[
Pulse's server-side functions (a Valkey function library, loaded by the store writer).

pulse_apply applies one Kafka partition's batch atomically together with the partition's
applied offset. KEYS[1] is the partition's progress hash; the other keys are the window and
entity-registry keys the payload refers to by index (2..#KEYS, each index used once). Every key
shares the partition's hash tag, so the function runs unchanged on a cluster.

ARGV[1] is a JSON object (pipeline.store_writer.payload builds it):
  expect   integer >= -1: the offset the writer believes is applied (-1: none); any other value
           aborts the call before a single write, so a redelivered or concurrently applied batch
           counts once
  offset   integer > expect: last offset of this batch
  mx, wm   integers, both or neither: partition max event time after the batch and its watermark
  ev, late, dead   integers >= 0: counters to add
  now      integer >= 0: wall clock (ms) of the apply
  topic    string: the Kafka topic the offsets belong to (stored as the progress field "topic")
  owner    string: the applying worker's name (stored as the progress field "owner")
  nf       5 or 11: numeric fields per aggregate row (sensor 5, application logs 11)
  a        aggregate blocks {key index, expire-at (s), rows}; a row is {entity, n, sum, sumsq, min,
           max [, 1xx, 2xx, 3xx, 4xx, 5xx, err]} (n and the counts integers >= 0, every number
           finite, min <= max); each row merges into the entity's one packed field
           "n sum sumsq min max[ 1xx 2xx 3xx 4xx 5xx err]" (schemas.keys.pack_stats)
  s        sketch blocks {key index, expire-at (s), rows}; a row is {entity, code, count, code,
           count, ...} (codes integers, counts integers > 0) adding to the fields "<entity>#<code>"
  e        entity-registry blocks {key index, {score, entity, score, entity, ...}}: a sorted set
           per dim, scored by the entity's last-seen 1m window start (epoch ms), raised only
           (ZADD GT)
  ecut     integer (when e is not empty): registry members scored at or below it are removed
           (every 1m window they were seen in has expired)
  ecap     integer >= 1 (when e is not empty): a registry keeps at most its ecap newest members
Returns {1, new applied offset} when applied, {0, applied offset} when the expectation failed, and
an error reply "ERR pulse_apply: <what is wrong>" for a malformed payload or a malformed stored
value it would merge with.

No partial writes: a function's writes are not rolled back when it fails half-way, so the call
runs in two phases. The first validates the whole payload (a malformed one is an error whatever
the store holds), checks the expected offset, reads every value it merges with (HMGET per key) and
computes the results, writing nothing; any problem ends the call there with an error. The second only writes (one HSET per window key, chunked, instead of a command per
entity or sketch bucket), and none of its commands can fail on what the first phase accepted.
--]]

local MAX_INT = 9007199254740992 -- 2^53: integers beyond it are not exact in a Lua number
local MAX_CODE = 2147483648 -- sketch codes fit well within +-2^23
local INF = 1 / 0
local CHUNK = 500 -- fields per HMGET/HSET and members per ZADD: unpack() is bounded by the C stack
-- nf -> format of a packed aggregate field (libraries cannot call string.* at load time)
local G = '%.17g'
local PACK = {[5] = G .. ' ' .. G .. ' ' .. G .. ' ' .. G .. ' ' .. G}
PACK[11] = PACK[5] .. ' ' .. PACK[5] .. ' ' .. G

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

-- HMGET in chunks: the values of `fields` (false where absent), in order
local function hmget(k, fields)
  local out = {}
  for i = 1, #fields, CHUNK do
    local got = redis.call('HMGET', k, unpack(fields, i, math.min(i + CHUNK - 1, #fields)))
    for j = 1, #got do
      out[i + j - 1] = got[j]
    end
  end
  return out
end

-- HSET in chunks; `flat` is {field, value, field, value, ...}
local function hset(k, flat)
  for i = 1, #flat, 2 * CHUNK do
    redis.call('HSET', k, unpack(flat, i, math.min(i + 2 * CHUNK - 1, #flat)))
  end
end

-- a block {key index, ...} of payload array `name`: its key, checked (2..#KEYS, used once)
local function block_key(p, name, i, size, keys, used)
  local blk = p[name][i]
  local where = string.format('%s[%d]', name, i)
  if not is_array(blk) or #blk ~= size then
    bad('%s: a block must be an array of %d elements', where, size)
  end
  local idx = blk[1]
  if not is_int(idx) or idx < 2 or idx > #keys then
    bad('%s: key index %s is not within 2..%d', where, tostring(idx), #keys)
  end
  if used[idx] then
    bad('%s: key index %d is used twice', where, idx)
  end
  used[idx] = true
  if size == 3 then
    if not is_int(blk[2]) then bad('%s: expire-at must be an integer', where) end
    if not is_array(blk[3]) then bad('%s: rows must be an array', where) end
  end
  return blk, keys[idx], where
end

-- check an aggregate row {entity, n, sum, sumsq, min, max [, 1xx..5xx, err]} of nf statistics
local function check_row(r, nf, what)
  if type(r) ~= 'table' or #r ~= nf + 1 then
    bad('%s: must be an entity and %d statistics', what, nf)
  end
  if type(r[1]) ~= 'string' or r[1] == '' then bad('%s: entity is not a name', what) end
  for i = 2, nf + 1 do
    local x = r[i]
    if type(x) ~= 'number' or x ~= x or x == INF or x == -INF then
      bad('%s: statistic %d is not a finite number', what, i - 1)
    end
    if (i == 2 or i > 6) and (x < 0 or x > MAX_INT or x ~= math.floor(x)) then
      bad('%s: count %d is not an integer >= 0 (%s)', what, i - 1, tostring(x))
    end
  end
  if r[5] > r[6] then
    bad('%s: min %s > max %s', what, tostring(r[5]), tostring(r[6]))
  end
end

-- fold aggregate row `src` into row `dst` (same layout): min of mins, max of maxes, else add
local function merge_row(dst, src)
  for i = 2, #src do
    if i == 5 then
      if src[5] < dst[5] then dst[5] = src[5] end
    elseif i == 6 then
      if src[6] > dst[6] then dst[6] = src[6] end
    else
      dst[i] = dst[i] + src[i]
    end
  end
end

-- Phase 1: validate, read, compute. Writes nothing; raises a message on any problem.
local function prepare(keys, args)
  if #keys < 1 then bad('no keys: KEYS[1] must be the progress hash') end
  if #args ~= 1 or type(args[1]) ~= 'string' then bad('expected one argument, the JSON payload') end
  local okj, p = pcall(cjson.decode, args[1])
  if not okj then bad('payload is not JSON: %s', tostring(p)) end
  if type(p) ~= 'table' then bad('payload must be a JSON object') end

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
  local nf = p.nf
  if not PACK[nf] then bad('nf must be 5 or 11, got %s', tostring(nf)) end
  for _, name in ipairs({'a', 's', 'e'}) do
    if not is_array(p[name]) then bad('%s must be an array', name) end
  end
  if #p.e > 0 then
    plan.ecut = int_field(p, 'ecut')
    plan.ecap = int_field(p, 'ecap', 1)
  end

  local used = {}
  -- aggregates: check each row, fold the rows of one entity
  plan.a = {}
  for i = 1, #p.a do
    local blk, k, where = block_key(p, 'a', i, 3, keys, used)
    local rows, ents, merged = blk[3], {}, {}
    for j = 1, #rows do
      local r = rows[j]
      check_row(r, nf, where .. ' row ' .. j)
      local m = merged[r[1]]
      if m then
        merge_row(m, r)
      else
        ents[#ents + 1] = r[1]
        merged[r[1]] = r
      end
    end
    plan.a[i] = {k, blk[2], ents, merged}
  end
  -- sketches: check each (code, count) pair, add up the increments per field
  plan.s = {}
  for i = 1, #p.s do
    local blk, k, where = block_key(p, 's', i, 3, keys, used)
    local rows, fields, inc = blk[3], {}, {}
    for j = 1, #rows do
      local r = rows[j]
      if type(r) ~= 'table' or type(r[1]) ~= 'string' or r[1] == '' then
        bad('%s row %d: must start with an entity name', where, j)
      end
      if #r < 3 or #r % 2 == 0 then
        bad('%s row %d: needs (code, count) pairs after the entity', where, j)
      end
      local prefix = r[1] .. '#'
      for c = 2, #r, 2 do
        local code, n = r[c], r[c + 1]
        if type(code) ~= 'number' or code ~= math.floor(code)
            or code < -MAX_CODE or code > MAX_CODE then
          bad('%s row %d: code %s is not an integer', where, j, tostring(code))
        end
        if type(n) ~= 'number' or n ~= math.floor(n) or n <= 0 or n > MAX_INT then
          bad('%s row %d: count %s is not an integer > 0', where, j, tostring(n))
        end
        local f = prefix .. code
        local old = inc[f]
        if old then
          inc[f] = old + n
        else
          fields[#fields + 1] = f
          inc[f] = n
        end
      end
    end
    plan.s[i] = {k, blk[2], fields, inc}
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

  -- the payload is sound: check the expectation, read what it merges with, compute the writes
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
    plan.counters[#plan.counters + 1] = name
    plan.counters[#plan.counters + 1] = fmt_int(x + add[name])
  end
  -- each window key: one HMGET of the fields it touches, the merged values to write
  for _, b in ipairs(plan.a) do
    local k, ents, merged = b[1], b[3], b[4]
    local stored = hmget(k, ents)
    local flat = {}
    for j = 1, #ents do
      local ent = ents[j]
      local v = merged[ent]
      local s = stored[j]
      if s then
        local old = {ent}
        for x in string.gmatch(s, '%S+') do
          old[#old + 1] = tonumber(x)
        end
        check_row(old, nf, string.format('stored field %q of %s', ent, k))
        merge_row(v, old)
      end
      flat[2 * j - 1] = ent
      flat[2 * j] = string.format(PACK[nf], unpack(v, 2, nf + 1))
    end
    b[3], b[4] = flat, nil
  end
  for _, b in ipairs(plan.s) do
    local k, fields, inc = b[1], b[3], b[4]
    local stored = hmget(k, fields)
    local flat = {}
    for j = 1, #fields do
      local f = fields[j]
      local n = inc[f]
      local s = stored[j]
      if s then
        local old = tonumber(s)
        if not is_int(old) then bad('stored field %q of %s is not an integer', f, k) end
        n = n + old
      end
      flat[2 * j - 1] = f
      flat[2 * j] = n
    end
    b[3], b[4] = flat, nil
  end
  for _, b in ipairs(plan.e) do
    local t = redis.call('TYPE', b[1])
    t = type(t) == 'table' and t.ok or t
    if t ~= 'none' and t ~= 'zset' and t ~= 'set' then
      bad('entity registry %s holds a %s, not a sorted set', b[1], t)
    end
    b[3] = t == 'set' -- a registry from before they were scored: replaced
  end
  return plan
end

-- Phase 2: writes only.
local function write(plan)
  for _, w in ipairs(plan.a) do
    if #w[3] > 0 then hset(w[1], w[3]) end
    redis.call('EXPIREAT', w[1], w[2])
  end
  for _, w in ipairs(plan.s) do
    if #w[3] > 0 then hset(w[1], w[3]) end
    redis.call('EXPIREAT', w[1], w[2])
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
  return {1, write(plan)}
end

redis.register_function('pulse_apply', apply_batch)
