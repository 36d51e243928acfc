-- Reads nodes to depth 1 (the node and its first `limit` child keys), false for a missing one:
-- the newest state of every node a live event names, in one call.
-- ARGV: prefix, limit, key1, key2, ...
local limit = tonumber(ARGV[2])
local out = {}
budget = READ_BUDGET
for i = 3, #ARGV do out[i - 2] = read_node(ARGV[i], 1, limit, '') end
return out
