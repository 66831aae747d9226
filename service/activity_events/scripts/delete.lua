-- Remove one deployment's events, dedup index and metadata, atomically.
--
-- KEYS[1]  ae:{d:N}:events
-- KEYS[2]  ae:{d:N}:ids
-- KEYS[3]  ae:{d:N}:meta
--
-- Returns the number of events removed, or -1 when the deployment has no keys.

if redis.call('EXISTS', KEYS[1], KEYS[2], KEYS[3]) == 0 then
  return -1
end
local n = 0
if redis.call('EXISTS', KEYS[1]) == 1 then n = redis.call('XLEN', KEYS[1]) end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return n
