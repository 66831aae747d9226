-- Helpers prepended to every script by store.LuaScript (Lua scripts cannot
-- import one another).

-- Protobuf varint of a non-negative integer.
local function varint(n)
  local out = {}
  while n >= 128 do
    out[#out + 1] = string.char(n % 128 + 128)
    n = math.floor(n / 128)
  end
  out[#out + 1] = string.char(n)
  return table.concat(out)
end
