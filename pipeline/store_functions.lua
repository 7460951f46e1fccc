#!lua name=pulse

--[[
Pulse's server-side functions (a Valkey function library, loaded by the store writer).

pulse_apply applies one Kafka partition's batch atomically together with the partition's
applied offset. KEYS[1] is the partition's progress hash; the other keys are the window keys
the payload refers to by index. Every key shares the partition's hash tag, so the function runs
unchanged on a cluster.

ARGV[1] is a JSON payload:
  expect   offset the writer believes is applied (-1: none); any other value aborts the call
           before a single write, so a redelivered or concurrently applied batch counts once
  offset   last offset of this batch
  mx, wm   partition max event time after the batch and its watermark (absent: no event yet)
  ev, late, dead   counters to add; now   wall clock (ms) of the apply
  a        aggregate blocks  {key index, expire-at (s), rows {entity, n, sum, sumsq, min, max
           [, 1xx, 2xx, 3xx, 4xx, 5xx, err]}}; each row merges into the entity's one packed
           field "n sum sumsq min max[ 1xx 2xx 3xx 4xx 5xx err]" (schemas.keys.pack_stats):
           one HGET and one HSET per entity instead of a command per statistic
  s        sketch blocks     {key index, expire-at (s), rows {entity, code, count, code, count...}}
  e        entity blocks     {key index, {entity...}}
Returns {1, new applied offset} when applied, {0, applied offset} when the expectation failed.
--]]

local function apply_batch(keys, args)
  local p = cjson.decode(args[1])
  local progress = keys[1]
  local applied = redis.call('HGET', progress, 'offset') or '-1'
  if tonumber(applied) ~= p.expect then
    return {0, applied}
  end

  for _, blk in ipairs(p.a) do
    local k = keys[blk[1]]
    for _, r in ipairs(blk[3]) do
      -- r = {entity, n, sum, sumsq, min, max [, 1xx, 2xx, 3xx, 4xx, 5xx, err]}
      local ent = r[1]
      local v = {}
      for i = 2, #r do
        v[i - 1] = r[i]
      end
      local cur = redis.call('HGET', k, ent)
      if cur then
        local i = 0
        for x in string.gmatch(cur, '%S+') do
          i = i + 1
          local y = tonumber(x)
          if i == 4 then
            if y < v[4] then v[4] = y end
          elseif i == 5 then
            if y > v[5] then v[5] = y end
          else
            v[i] = v[i] + y
          end
        end
      end
      for i = 1, #v do
        v[i] = string.format('%.17g', v[i])
      end
      redis.call('HSET', k, ent, table.concat(v, ' '))
    end
    redis.call('EXPIREAT', k, blk[2])
  end

  for _, blk in ipairs(p.s) do
    local k = keys[blk[1]]
    for _, r in ipairs(blk[3]) do
      local f = r[1] .. '#'
      for i = 2, #r, 2 do
        redis.call('HINCRBY', k, f .. r[i], r[i + 1])
      end
    end
    redis.call('EXPIREAT', k, blk[2])
  end

  for _, blk in ipairs(p.e) do
    local k = keys[blk[1]]
    local ents = blk[2]
    -- unpack() is bounded by Lua's C stack: add in chunks
    for i = 1, #ents, 1000 do
      redis.call('SADD', k, unpack(ents, i, math.min(i + 999, #ents)))
    end
  end

  redis.call('HSET', progress, 'offset', p.offset, 'updated_ms', p.now)
  if p.mx then
    redis.call('HSET', progress, 'max_event_time', p.mx, 'watermark', p.wm)
  end
  redis.call('HINCRBY', progress, 'events', p.ev)
  redis.call('HINCRBY', progress, 'late', p.late)
  redis.call('HINCRBY', progress, 'dead', p.dead)
  redis.call('HINCRBY', progress, 'batches', 1)
  return {1, redis.call('HGET', progress, 'offset')}
end

redis.register_function('pulse_apply', apply_batch)
