-- Stream id arithmetic on the decimal text Redis returns ('<ms>-<seq>', both up to 2^64-1, no
-- leading zeros), exact where Lua's doubles would round.
local function id_parts(id)
  return string.match(id, '^(%d+)-(%d+)$')
end

local function num_cmp(a, b)
  if #a ~= #b then return #a < #b and -1 or 1 end
  if a == b then return 0 end
  return a < b and -1 or 1
end

local function id_cmp(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  local c = num_cmp(am, bm)
  if c ~= 0 then return c end
  return num_cmp(as, bs)
end

-- nil stands for "no bound" in both.
local function id_min(a, b)
  if not a then return b end
  if not b then return a end
  if id_cmp(a, b) <= 0 then return a end
  return b
end

local function id_max(a, b)
  if not a then return b end
  if not b then return a end
  if id_cmp(a, b) >= 0 then return a end
  return b
end

local function num_incr(n)
  local digits = {}
  for i = 1, #n do digits[i] = string.byte(n, i) - 48 end
  local i = #digits
  while i >= 1 do
    if digits[i] < 9 then
      digits[i] = digits[i] + 1
      break
    end
    digits[i] = 0
    i = i - 1
  end
  local out = {}
  if i == 0 then out[1] = '1' end
  for j = 1, #digits do out[#out + 1] = string.char(digits[j] + 48) end
  return table.concat(out)
end

-- The smallest id greater than `id`: MINID <successor> removes `id` itself and keeps everything
-- after it.
local function id_succ(id)
  local ms, seq = id_parts(id)
  if seq == '18446744073709551615' then return num_incr(ms) .. '-0' end
  return ms .. '-' .. num_incr(seq)
end
