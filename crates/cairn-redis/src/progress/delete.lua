-- Removes the subtree at a key and takes its contribution out of its ancestors.
-- KEYS[1]: the node key of the tree's root. ARGV: prefix, key, time_ms. The reply goes through
-- `deferred`. Returns the number of nodes removed. The tree's change feed gets
-- one entry naming the deleted key (`d`) and the ancestors it changed (`k`).
local k, t = ARGV[2], tonumber(ARGV[3])
local state = redis.call('HGET', nkey(k), '_s')
if not state then return deferred(0) end
local _, _, _, p, w, _, _, rate, status = decode(state)
local removed = 0
local stack = { k }
while #stack > 0 do
  local x = table.remove(stack)
  for _, child in ipairs(redis.call('ZRANGE', ckey(x), 0, -1)) do stack[#stack + 1] = child end
  redis.call('DEL', nkey(x), ckey(x))
  removed = removed + 1
end
p = p or 0
FEED_DELETED[root_of(k)] = { k }
if parent_of(k) then
  propagate(k, false, true, t, 0, w, 0, w * p, 0, w * (rate or 0), status, false, false, t)
  flush()
else
  unindex_root(k)
  feed_write({ [k] = {} })
end
return deferred(removed)
