-- Deduplicate and append events of ONE deployment, atomically.
--
-- KEYS[1]  ae:{d:N}:events  stream; entry field "e" = EventRequest bytes
-- KEYS[2]  ae:{d:N}:ids     hash: event id -> "<entry id> <message digest>"
-- KEYS[3]  ae:{d:N}:meta    hash: maxid (largest id used), trimmed (last entry id removed)
--
-- ARGV[1]  retention max length; "0" = off
-- ARGV[2]  retention: drop entries older than this Unix ms; "0" = off
-- ARGV[3]  channel to PUBLISH the stream key on after appending; "" = none
--          (Redis Cluster, where followers' hubs cannot block on many slots)
-- ARGV[4]  n, the number of events that follow
-- then, per event i (0-based), at ARGV[5 + 3*i ..]:
--   id       event id; "0" asks for the next free id (maxid + 1)
--   digest   digest of the message (the event's identity besides its id)
--   payload  EventRequest bytes of every field but id (field 1), prepended here
--
-- Returns a flat array: per event {code, id, entry id}, then a final 1 when the
-- deployment received its very first event in this call (else 0).
--   code 0 created, 1 duplicate (entry id of the stored one), 2 conflict
--   (entry id of the stored one), 3 no free id left (id and entry id empty)

local INT32_MAX = 2147483647

-- varint() comes from lib.lua.

local maxlen = tonumber(ARGV[1])
local min_ms = tonumber(ARGV[2])
local channel = ARGV[3]
local n = tonumber(ARGV[4])

local maxid = tonumber(redis.call('HGET', KEYS[3], 'maxid') or '0')
local fresh = redis.call('EXISTS', KEYS[3]) == 0
local result = {}
local created = 0

for i = 0, n - 1 do
  local id = tonumber(ARGV[5 + 3 * i])
  local digest = ARGV[6 + 3 * i]
  local payload = ARGV[7 + 3 * i]
  local code, entry = 0, ''
  if id == 0 then
    if maxid >= INT32_MAX then
      code = 3
    else
      id = maxid + 1
    end
  end
  if code == 0 then
    local known = redis.call('HGET', KEYS[2], id)
    if known then
      local sep = string.find(known, ' ', 1, true)
      entry = string.sub(known, 1, sep - 1)
      if string.sub(known, sep + 1) == digest then code = 1 else code = 2 end
    else
      entry = redis.call('XADD', KEYS[1], '*', 'e', '\8' .. varint(id) .. payload)
      redis.call('HSET', KEYS[2], id, entry .. ' ' .. digest)
      if id > maxid then maxid = id end
      created = created + 1
    end
  else
    id = ''
  end
  result[#result + 1] = code
  result[#result + 1] = id
  result[#result + 1] = entry
end

if created > 0 then
  redis.call('HSET', KEYS[3], 'maxid', maxid)
  -- Retention. The last removed entry id is kept in meta.trimmed, so a reader
  -- resuming from an older cursor gets a clear error instead of a silent gap.
  if maxlen > 0 then
    local len = redis.call('XLEN', KEYS[1])
    local slack = math.max(1, math.floor(maxlen / 10))
    if len >= maxlen + slack then
      -- the newest entry to remove, then an exact MINID trim just past it
      local last = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', len - maxlen)
      last = last[#last][1]
      local sep = string.find(last, '-', 1, true)
      local next_id = string.sub(last, 1, sep - 1) .. '-' .. (tonumber(string.sub(last, sep + 1)) + 1)
      redis.call('XTRIM', KEYS[1], 'MINID', next_id)
      redis.call('HSET', KEYS[3], 'trimmed', last)
    end
  end
  if min_ms > 0 then
    local old = redis.call('XREVRANGE', KEYS[1], '(' .. min_ms .. '-0', '-', 'COUNT', 1)
    if #old > 0 then
      redis.call('XTRIM', KEYS[1], 'MINID', min_ms .. '-0')
      redis.call('HSET', KEYS[3], 'trimmed', old[1][1])
    end
  end
end

if created > 0 and channel ~= '' then
  redis.call('PUBLISH', channel, KEYS[1])
end

if fresh and created > 0 then result[#result + 1] = 1 else result[#result + 1] = 0 end
return result
