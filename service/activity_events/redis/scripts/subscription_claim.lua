-- Redeliver or dead-letter a subscription's events whose visibility timeout
-- expired, atomically, on ONE stream of ONE deployment (one slot on Cluster).
--
-- KEYS[1]  ae:{d:N}:events, or ae:{d:N}:replay:<group>   the source stream
-- KEYS[2]  ae:{d:N}:dlq:<group>                           the dead letters
--
-- ARGV[1]  group: the subscription name
-- ARGV[2]  consumer that takes over the expired events
-- ARGV[3]  visibility timeout in ms: events idle at least this long expired
-- ARGV[4]  most events to take over (the consumer's free in-flight slots)
-- ARGV[5]  max deliveries: an expired event delivered this often is dead-lettered
-- ARGV[6]  "1" when KEYS[1] is a replay stream: its entries are deleted once
--          handled, and the original entry id is in their field "c"
-- ARGV[7]  approximate length cap of the dead-letter stream
--
-- Dead letter fields: e = EventRequest bytes, c = original entry id,
-- n = deliveries made, o = consumer that held it last.
--
-- Returns {dead_lettered, then per event taken over: entry id, EventRequest
-- bytes, original entry id, delivery count (this delivery included)}.

local group, consumer = ARGV[1], ARGV[2]
local idle = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local max_deliveries = tonumber(ARGV[5])
local replay = ARGV[6] == '1'

local function field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end

local out = {0}
local dead = 0
local taken = 0
local expired = redis.call('XPENDING', KEYS[1], group, 'IDLE', idle, '-', '+', want)
for _, p in ipairs(expired) do
  local id, owner, deliveries = p[1], p[2], tonumber(p[4])
  if deliveries >= max_deliveries then
    local rows = redis.call('XRANGE', KEYS[1], id, id)
    if #rows > 0 then
      local fields = rows[1][2]
      local origin = id
      if replay then origin = field(fields, 'c') or id end
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*',
        'e', field(fields, 'e') or '', 'c', origin, 'n', deliveries, 'o', owner)
      dead = dead + 1
    end
    redis.call('XACK', KEYS[1], group, id)
    if replay then redis.call('XDEL', KEYS[1], id) end
  elseif taken < want then
    local rows = redis.call('XCLAIM', KEYS[1], group, consumer, idle, id)
    local row = rows[1]
    if type(row) == 'table' and type(row[2]) == 'table' then
      local fields = row[2]
      local origin = id
      if replay then origin = field(fields, 'c') or id end
      out[#out + 1] = id
      out[#out + 1] = field(fields, 'e') or ''
      out[#out + 1] = origin
      out[#out + 1] = deliveries + 1
      taken = taken + 1
    end
  end
end
out[1] = dead
return out
