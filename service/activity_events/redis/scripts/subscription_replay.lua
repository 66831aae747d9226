-- Move dead letters of ONE deployment back to delivery, atomically: each one
-- becomes an entry of the subscription's replay stream (read by the same
-- consumer group) and leaves the dead letters.
--
-- KEYS[1]  ae:{d:N}:dlq:<group>      the dead letters
-- KEYS[2]  ae:{d:N}:replay:<group>   the replay stream
--
-- ARGV[1]  group: the subscription name
-- ARGV[2]  "all": replay the oldest ARGV[3] dead letters; "ids": replay ARGV[4..]
-- ARGV[3]  most dead letters to move with "all"
-- ARGV[4..] dead letter entry ids with "ids"
--
-- Replay entry fields: e = EventRequest bytes, c = original entry id.
-- Returns the number of dead letters moved.

redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[1], '0', 'MKSTREAM')

local function field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end

local rows = {}
if ARGV[2] == 'all' then
  rows = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', tonumber(ARGV[3]))
else
  for i = 4, #ARGV do
    local found = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
    if #found > 0 then rows[#rows + 1] = found[1] end
  end
end

local moved = 0
for _, row in ipairs(rows) do
  local fields = row[2]
  redis.call('XADD', KEYS[2], '*', 'e', field(fields, 'e') or '', 'c', field(fields, 'c') or row[1])
  redis.call('XDEL', KEYS[1], row[1])
  moved = moved + 1
end
return moved
