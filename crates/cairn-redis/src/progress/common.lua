-- Shared by every progress script. Key layout under prefix P (ARGV[1]):
--   P:pn:<key>  hash: client fields (JSON-encoded values) and server fields starting with '_':
--               _st start_time, _ut update_time, _sw Σw and _swp Σw·p over direct children,
--               _c:<status json> children by status, _lm last message (JSON), _eta and its
--               rate anchor _rt/_rp/_rate
--   P:pc:<key>  zset of direct child keys scored by their start_time (the ordered child index)
--   P:proots    zset of tree roots scored by their latest update_time (retention scans it)
local P = ARGV[1]
local EPS = 1e-9

local function nkey(k) return P .. ':pn:' .. k end
local function ckey(k) return P .. ':pc:' .. k end

local function num(x)
  -- %.17g round-trips a double exactly; Lua's tostring keeps only 14 digits.
  return string.format('%.17g', x)
end

-- The parent that progress rolls into, or nil at a tree root: a one-segment key, or a parent that
-- is a namespace (its last segment starts with '_').
local function parent_of(k)
  local pos = string.find(k, '%.[^%.]*$')
  if not pos then return nil end
  local p = string.sub(k, 1, pos - 1)
  local ppos = string.find(p, '%.[^%.]*$')
  local first = ppos and string.sub(p, ppos + 1, ppos + 1) or string.sub(p, 1, 1)
  if first == '_' then return nil end
  return p
end

local TERMINAL = { ['"finished"'] = true, ['"failed"'] = true, ['"canceled"'] = true }

-- Refreshes the ETA of a node whose progress moved to p at time t, from an exponential moving
-- average of its recent rate. `v` holds the node's _rt, _rp, _rate as read before the change.
-- Replaying an update at the same t changes nothing (no time passed).
local function eta_fields(out, t, p, status, rt, rp, rate)
  if (status and TERMINAL[status]) or p >= 1 then
    return true -- caller deletes the ETA fields
  end
  rt, rp, rate = tonumber(rt), tonumber(rp), tonumber(rate)
  if not rt or p < rp then
    out[#out + 1] = '_rt'; out[#out + 1] = t
    out[#out + 1] = '_rp'; out[#out + 1] = num(p)
    return false
  end
  if t > rt and p > rp then
    local inst = (p - rp) / (t - rt)
    if rate then rate = 0.3 * inst + 0.7 * rate else rate = inst end
    out[#out + 1] = '_rt'; out[#out + 1] = t
    out[#out + 1] = '_rp'; out[#out + 1] = num(p)
    out[#out + 1] = '_rate'; out[#out + 1] = num(rate)
    out[#out + 1] = '_eta'; out[#out + 1] = math.floor(t + (1 - p) / rate)
  end
  return false
end

local function clear_eta(k)
  redis.call('HDEL', nkey(k), '_eta', '_rt', '_rp', '_rate')
end

-- Carries one child's change into its ancestors, one level at a time: O(depth), never O(children).
--   child: key whose contribution changed; created: the child did not exist before;
--   dw, dwp: change of the child's weight and weight·progress (for a new child, its full values);
--   s_from, s_to: its status before and after (JSON text or false); lm: message to bubble or false.
-- Returns the root of the tree.
--   removed: the child was just deleted (it leaves the parent's child index).
local function propagate(child, created, removed, child_start, dw, dwp, s_from, s_to, lm, t)
  local parent = parent_of(child)
  while parent do
    local pk = nkey(parent)
    local v = redis.call('HMGET', pk, '_st', 'progress', 'weight', '_sw', '_swp', 'status', '_rt', '_rp', '_rate')
    local p_created = not v[1]
    local sw = (tonumber(v[4]) or 0) + dw
    local swp = (tonumber(v[5]) or 0) + dwp
    local out = { '_ut', t }
    if p_created then out[#out + 1] = '_st'; out[#out + 1] = t end
    if created then
      redis.call('ZADD', ckey(parent), child_start, child)
    elseif removed then
      redis.call('ZREM', ckey(parent), child)
      -- no children left: the sums are exactly zero, whatever rounding accumulated
      if redis.call('ZCARD', ckey(parent)) == 0 then sw = 0; swp = 0 end
    end
    if s_from ~= s_to then
      if s_from then
        if redis.call('HINCRBY', pk, '_c:' .. s_from, -1) <= 0 then redis.call('HDEL', pk, '_c:' .. s_from) end
      end
      if s_to then redis.call('HINCRBY', pk, '_c:' .. s_to, 1) end
    end
    out[#out + 1] = '_sw'; out[#out + 1] = num(sw)
    out[#out + 1] = '_swp'; out[#out + 1] = num(swp)
    local pp_old = tonumber(v[2]) or 0
    local pp_new = pp_old
    local clear = false
    if sw > EPS then
      pp_new = swp / sw
      if pp_new < 0 then pp_new = 0 elseif pp_new > 1 then pp_new = 1 end
      out[#out + 1] = 'progress'; out[#out + 1] = num(pp_new)
      if pp_new ~= pp_old or not v[2] then
        clear = eta_fields(out, t, pp_new, v[6], v[7], v[8], v[9])
      end
    end
    if lm then out[#out + 1] = '_lm'; out[#out + 1] = lm end
    redis.call('HSET', pk, unpack(out))
    if clear then clear_eta(parent) end
    local pw = tonumber(v[3]) or 1
    if p_created then
      dw = pw; dwp = pw * pp_new
    else
      dw = 0; dwp = pw * pp_new - pw * (tonumber(v[2]) or 0)
    end
    created = p_created
    removed = false
    child_start = t
    s_from = false; s_to = false
    child = parent
    parent = parent_of(child)
  end
  return child
end
