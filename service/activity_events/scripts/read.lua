-- Read a page of one deployment's history, shaped for the wire.
--
-- History is the hot read path: done in Python, every event costs a dict
-- from redis-py and a few byte joins. Here Redis concatenates the page
-- (table.concat runs in C) and the server forwards the result unchanged.
-- Read-only.
--
-- KEYS[1]  ae:{d:N}:events  stream; entry field "e" = EventRequest bytes
--
-- ARGV[1]  start: "-" (from the oldest) or "(<entry id>" (strictly after it)
-- ARGV[2]  most entries to read
-- ARGV[3]  shape: "watch" or "list"
-- ARGV[4]  "watch": cursor prefix "<deployment>:"
-- ARGV[5]  "watch": byte budget of the page (at least one entry is returned)
--
-- Returns {n, last entry id ("" if none), more (1/0), body}:
--   "watch": body = WatchEventsResponse bytes of the n events: repeated field 1
--            (StoredEvent { event = 1: the payload; cursor = 2: prefix .. id })
--   "list":  body is absent; elements 4.. are the n payloads
-- more = 1 when the page was cut short (count or budget reached), so more may follow.

-- varint() comes from lib.lua.

local function payload_of(row)
  local fields = row[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'e' then return fields[i + 1] end
  end
  -- not written by this service: refuse rather than send an empty event
  error('CORRUPT stream entry ' .. row[1] .. ' has no event field')
end

local count = tonumber(ARGV[2])
local rows = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', count)
local more = 0
if #rows == count then more = 1 end

if ARGV[3] == 'list' then
  local out = {#rows, '', more}
  for i, row in ipairs(rows) do
    out[3 + i] = payload_of(row)
  end
  if #rows > 0 then out[2] = rows[#rows][1] end
  return out
end

local prefix = ARGV[4]
local budget = tonumber(ARGV[5])
local parts = {}
local size = 0
local last = ''
for _, row in ipairs(rows) do
  local payload = payload_of(row)
  local cursor = prefix .. row[1]
  local body = '\10' .. varint(#payload) .. payload .. '\18' .. varint(#cursor) .. cursor
  local piece = '\10' .. varint(#body) .. body
  if #parts > 0 and size + #piece > budget then
    more = 1
    break
  end
  parts[#parts + 1] = piece
  size = size + #piece
  last = row[1]
end
return {#parts, last, more, table.concat(parts)}
