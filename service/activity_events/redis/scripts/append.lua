-- Deduplicate and append events of ONE deployment, atomically.
--
-- KEYS[1]  ae:{d:N}:events   stream; entry field "e" = EventRequest bytes
-- KEYS[2]  ae:{d:N}:meta     hash: maxid (largest id used), trimmed (last entry id
--          removed), epoch (ms of the deployment's first entry id)
-- KEYS[3]  ae:{d:N}:buckets  set of the dedup bucket numbers in use
-- KEYS[4..3+nb]  ae:{d:N}:ids:<b>  the dedup buckets this call may touch, b = id >> 7:
--          hash (id & 127) -> <6-byte digest><varint t><varint seq>, where the
--          stored entry id is <epoch + t/2>-<seq> for even t (always, as stream ids
--          only grow) and <(t-1)/2>-<seq> for odd t. Small integer fields and
--          ~9-byte values keep a bucket a listpack of ~13 bytes an event.
--
-- ARGV[1]  retention max length; "0" = off
-- ARGV[2]  retention: drop entries older than this Unix ms; "0" = off
-- ARGV[3]  channel to PUBLISH the stream key on after appending; "" = none
--          (Redis Cluster, where followers' hubs cannot block on many slots)
-- ARGV[4]  nb, the number of bucket keys; ARGV[5..4+nb] their bucket numbers
-- ARGV[5+nb]  n, the number of events that follow
-- then, per event i (0-based), at ARGV[6 + nb + 3*i ..]:
--   id       event id; "0" asks for the next free id (maxid + 1)
--   digest   6-byte digest of the message (the event's identity besides its id)
--   payload  EventRequest bytes of every field but id (field 1), prepended here
--
-- Returns a flat array: per event handled {code, id, entry id}, then a final 1
-- when the deployment received its very first event in this call (else 0).
--   code 0 created, 1 duplicate (entry id of the stored one), 2 conflict
--   (entry id of the stored one), 3 no free id left (id and entry id empty),
--   4 stop: the event's bucket was not among KEYS (an assigned id moved on
--   since the caller guessed); id = the id it needs, nothing done for it or
--   the events after it, which the caller sends again with that bucket.

local INT32_MAX = 2147483647

-- varint() and unvarint() come from lib.lua.

local maxlen = tonumber(ARGV[1])
local min_ms = tonumber(ARGV[2])
local channel = ARGV[3]
local nb = tonumber(ARGV[4])
local bucket_keys = {}
for j = 1, nb do
  bucket_keys[tonumber(ARGV[4 + j])] = KEYS[3 + j]
end
local n = tonumber(ARGV[5 + nb])
local used = {}

local meta = redis.call('HMGET', KEYS[2], 'maxid', 'epoch')
local maxid = tonumber(meta[1] or '0')
local epoch = tonumber(meta[2] or '-1')
local fresh = redis.call('EXISTS', KEYS[2]) == 0

-- The dedup value of a stream entry id, and back.
local function pack(entry, digest)
  local ms_text, seq_text = string.match(entry, '^(%d+)-(%d+)$')
  local ms, seq = tonumber(ms_text), tonumber(seq_text)
  if epoch < 0 then epoch = ms end
  local t = (ms >= epoch) and (ms - epoch) * 2 or ms * 2 + 1
  return digest .. varint(t) .. varint(seq)
end

local function unpack_entry(value)
  local t, pos = unvarint(value, 7)
  local seq = unvarint(value, pos)
  local ms = (t % 2 == 0) and (epoch + t / 2) or (t - 1) / 2
  return string.format('%d-%d', ms, seq)
end
local result = {}
local created = 0

for i = 0, n - 1 do
  local base = 6 + nb + 3 * i
  local id = tonumber(ARGV[base])
  local digest = ARGV[base + 1]
  local payload = ARGV[base + 2]
  local code, entry = 0, ''
  if id == 0 then
    if maxid >= INT32_MAX then
      code = 3
    else
      id = maxid + 1
    end
  end
  local key = nil
  if code == 0 then
    local bucket = math.floor(id / 128)
    key = bucket_keys[bucket]
    if key == nil then
      result[#result + 1] = 4
      result[#result + 1] = id
      result[#result + 1] = ''
      break
    end
    local slot = id % 128
    local known = redis.call('HGET', key, slot)
    if known then
      entry = unpack_entry(known)
      if string.sub(known, 1, 6) == digest then code = 1 else code = 2 end
    else
      entry = redis.call('XADD', KEYS[1], '*', 'e', '\8' .. varint(id) .. payload)
      redis.call('HSET', key, slot, pack(entry, digest))
      if not used[bucket] then
        used[bucket] = true
        redis.call('SADD', KEYS[3], bucket)
      end
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
  redis.call('HSET', KEYS[2], 'maxid', maxid, 'epoch', epoch)  -- epoch: set by pack() if new
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
      redis.call('HSET', KEYS[2], 'trimmed', last)
    end
  end
  if min_ms > 0 then
    local old = redis.call('XREVRANGE', KEYS[1], '(' .. min_ms .. '-0', '-', 'COUNT', 1)
    if #old > 0 then
      redis.call('XTRIM', KEYS[1], 'MINID', min_ms .. '-0')
      redis.call('HSET', KEYS[2], 'trimmed', old[1][1])
    end
  end
end

if created > 0 and channel ~= '' then
  redis.call('PUBLISH', channel, KEYS[1])
end

if fresh and created > 0 then result[#result + 1] = 1 else result[#result + 1] = 0 end
return result
