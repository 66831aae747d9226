-- Remove one deployment's events, dedup index and metadata, atomically.
--
-- KEYS[1]  ae:{d:N}:events
-- KEYS[2]  ae:{d:N}:meta
-- KEYS[3]  ae:{d:N}:buckets   set of the dedup bucket numbers in use
-- KEYS[4..]  ae:{d:N}:ids:<b>  every dedup bucket (the caller read the set)
--
-- Returns the number of events removed; -1 when the deployment has no keys;
-- -2 when the bucket set no longer matches the buckets passed (a create
-- added one since the caller read it): nothing removed, read again and retry.

if redis.call('EXISTS', KEYS[1], KEYS[2], KEYS[3]) == 0 then
  return -1
end
if redis.call('SCARD', KEYS[3]) ~= #KEYS - 3 then
  return -2
end
local n = 0
if redis.call('EXISTS', KEYS[1]) == 1 then n = redis.call('XLEN', KEYS[1]) end
for first = 1, #KEYS, 1000 do  -- DEL in chunks: unpack() has a stack limit
  redis.call('DEL', unpack(KEYS, first, math.min(first + 999, #KEYS)))
end
return n
