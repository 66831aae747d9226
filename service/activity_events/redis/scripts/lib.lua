-- Helpers prepended to every script by store.LuaScript (Lua scripts cannot
-- import one another).

-- Protobuf varint of a non-negative integer. Values below 2^21 (ids and
-- lengths, mostly) take a path without a table: this runs per stored event.
local function varint(n)
  if n < 128 then return string.char(n) end
  if n < 16384 then return string.char(n % 128 + 128, math.floor(n / 128)) end
  if n < 2097152 then
    return string.char(n % 128 + 128, math.floor(n / 128) % 128 + 128, math.floor(n / 16384))
  end
  local out = {}
  while n >= 128 do
    out[#out + 1] = string.char(n % 128 + 128)
    n = math.floor(n / 128)
  end
  out[#out + 1] = string.char(n)
  return table.concat(out)
end

-- Decode the varint at position pos of s; returns the value and the position after it.
local function unvarint(s, pos)
  local n, scale = 0, 1
  while true do
    local b = string.byte(s, pos)
    pos = pos + 1
    if b < 128 then return n + b * scale, pos end
    n = n + (b - 128) * scale
    scale = scale * 128
  end
end
