-- Applies a batch of updates in order, atomically (one script call).
-- ARGV: prefix, n, then per update: key, time_ms, nfields, name1, json1, ...; then read_depth,
-- read_limit: when read_depth > 0, every update's node is returned (as `read` returns it, after
-- the whole batch), in update order.
local n = tonumber(ARGV[2])
local depth = tonumber(ARGV[#ARGV - 1])
local i = 3
local keys = {} -- only kept when the nodes are read back
local roots = {}
for _ = 1, n do
  local k, t, nf = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  i = i + 3
  local node = load(k)
  -- fields are set in place (what `set` does, without a call per field)
  local f, dirty = node.f, node.dirty
  local created = not f._st
  local p_old, w_old, s_old = tonumber(f.progress) or 0, tonumber(f.weight) or 1, f.status
  local p_new, w_new, s_new, lm = p_old, w_old, s_old, false
  local p_set = false
  f._ut = t; dirty._ut = true
  if created then f._st = t; dirty._st = true end
  for _ = 1, nf do
    local name, value = ARGV[i], ARGV[i + 1]
    i = i + 2
    f[name] = value; dirty[name] = true
    if name == 'progress' then
      p_new = tonumber(value); p_set = true
      if f._sw then set(node, '_op', value) end
    elseif name == 'weight' then w_new = tonumber(value)
    elseif name == 'status' then s_new = value
    elseif name == 'msg' then lm = value
    end
  end
  if lm then set(node, '_lm', lm) end
  if p_set or s_new ~= s_old then update_eta(node, t, p_new, s_new) end
  local root
  if created then
    root = propagate(k, true, false, t, w_new, w_new * p_new, false, s_new, lm, t)
  else
    root = propagate(k, false, false, t, w_new - w_old, w_new * p_new - w_old * p_old, s_old, s_new, lm, t)
  end
  roots[root] = t
  if depth > 0 then keys[#keys + 1] = k end
end
flush()
for root, t in pairs(roots) do redis.call('ZADD', P .. ':proots', t, root) end
if depth > 0 then
  local nodes = {}
  for j, k in ipairs(keys) do nodes[j] = read_node(k, depth, tonumber(ARGV[i + 1]), '') end
  return nodes
end
return n
