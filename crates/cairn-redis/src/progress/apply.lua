-- Applies a batch of updates in order, atomically (one script call). KEYS[1]: the node key of the
-- first update's root (it fixes the layout and, on a cluster, the slot: every update of a tagged
-- call is of that one tree). The reply goes through `deferred`.
-- ARGV: prefix, n, then per update: key, time_ms, nfields, name1, json1, ...; then read_depth,
-- read_limit: when read_depth > 0, every update's node is returned (as `read` returns it, after
-- the whole batch), in update order.
local n = tonumber(ARGV[2])
local depth = tonumber(ARGV[#ARGV - 1])
local i = 3
local keys = {} -- only kept when the nodes are read back
for _ = 1, n do
  local k, t, nf = ARGV[i], time_of(ARGV[i + 1]), number_of(ARGV[i + 2])
  apply_update(k, t, ARGV, i + 3, nf)
  i = i + 3 + 2 * nf
  if depth > 0 then keys[#keys + 1] = k end
end
flush()
if depth > 0 then
  local nodes = {}
  budget = READ_BUDGET
  for j, k in ipairs(keys) do nodes[j] = read_node(k, depth, tonumber(ARGV[i + 1]), '') end
  return deferred(nodes)
end
return deferred(n)
